"""The README's monitoring pictures, made from a real run on this machine: a local Ray head with its dashboard, a
local Prometheus scraping it (Ray's service discovery), a short GRPO demo job submitted through the job API; then

    <out>/grafana_panels.png     every panel of monitoring/grafana/uniar.json drawn from Prometheus (monitoring.panels)
    <out>/ray_dashboard_jobs.png the Ray dashboard's jobs page with the job (headless Chromium)
    <out>/rollouts_gallery.png   the job's last dumped step, rollouts/step-N/index.html (uniar_ray.gallery)

    python -m monitoring.snapshot [--out docs/images] [--keep-run runs/snapshot] [a.b=c overrides for the job ...]

The job: monitoring.stack.SHORT_GRPO (the demo config, 2 prompts x 4 samples a step, one_step, every step's samples
dumped) with steps=30, samples dumped every 10 steps.

Needs Debian's prometheus and chromium (apt-get install -y prometheus chromium). Everything listens on 127.0.0.1
ports picked free, and stops at the end.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from monitoring import panels
from monitoring.chromium import Browser
from monitoring.stack import SHORT_GRPO, LocalRay, Prometheus, StackError


PICTURE = ["steps=30", "rollouts.dump_every=10"]  # the tests' short job, longer: curves with some points


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/images", help="folder for the PNGs")
    ap.add_argument("--keep-run", default="", help="also copy the job's run folder here")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds the job may take")
    ap.add_argument("overrides", nargs="*", help="a.b=c settings for the job, after the short defaults")
    args = ap.parse_args(argv)
    for binary, package in (("prometheus", "prometheus"), ("chromium", "chromium")):
        if not shutil.which(binary):
            raise SystemExit(f"[snapshot] {binary} is not installed: apt-get install -y {package}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="uniar-snapshot-"))
    try:
        with LocalRay(work) as head, Prometheus(head.discovery_file) as prom, Browser(1280, 800) as browser:
            print(f"[snapshot] Ray dashboard {head.dashboard_url}, Prometheus {prom.url}", flush=True)
            prom.wait_for_series(f'up{{instance=~".*:{head.metrics_port}"}} == 1', timeout_s=120)
            job = head.run_grpo(work / "run", [*SHORT_GRPO, *PICTURE, *args.overrides], timeout_s=args.timeout)
            if job.status != "SUCCEEDED":
                raise SystemExit(f"[snapshot] job {job.job_id} {job.status}:\n{job.logs[-3000:]}")
            print(f"[snapshot] job {job.job_id} {job.status} in {job.end - job.start:.0f} s", flush=True)
            written = [_panels(prom, job, out / "grafana_panels.png")]
            head.open_dashboard(browser, "#/jobs", wait_text=job.job_id)
            written.append(browser.screenshot(out / "ray_dashboard_jobs.png"))
            last = max((job.run_dir / "rollouts").glob("step-*/index.html"))
            browser.open(last.as_uri())
            written.append(browser.screenshot(out / "rollouts_gallery.png"))
            if args.keep_run:
                shutil.copytree(job.run_dir, args.keep_run, dirs_exist_ok=True)
    except StackError as e:
        raise SystemExit(f"[snapshot] {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for p in written:
        print(p)
    return written


def _panels(prom, job, path: Path) -> Path:
    """The panels from 30 s before the first step's figures (the start-up before them is minutes of flat lines)."""
    first = [float(v[0]) for s in prom.query_range("ray_uniar_grpo_step", job.start, job.end) for v in s["values"]]
    start, end = max(job.start, min(first, default=job.start) - 30), job.end
    step = max(1.0, (end - start) / 300)
    dash = panels.load_panels()
    results = panels.evaluate(prom, dash, start, end, step)
    return panels.render(dash, results, path, f"uniar.json panels: GRPO demo job {job.job_id} "
                         f"({len(dash)} panels, Prometheus query_range)", start)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
