"""Monitoring proven with real parts: a Ray head with its dashboard runs a short GRPO job submitted through the job
API while Debian's Prometheus scrapes the endpoints Ray lists in its service-discovery file; then every query of
monitoring/grafana/uniar.json (as the file is now) returns a series through Prometheus' HTTP API, and the Ray
dashboard's jobs page, rendered in headless Chromium with the token cookie, shows the job."""
from __future__ import annotations

import json
import shutil
from urllib.parse import urlparse

import pytest

from monitoring.panels import load_panels, promql
from monitoring.stack import SHORT_GRPO, LocalRay, Prometheus
from tests.monitoring.conftest import require

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The head, Prometheus (when installed) scraping it from before the job starts, and the finished job."""
    root = tmp_path_factory.mktemp("live")
    with LocalRay(root) as head:
        prom = Prometheus(head.discovery_file) if shutil.which("prometheus") else None
        try:
            if prom is not None:  # Ray's file lists the node once it is up: scrape it before the job starts
                prom.wait_for_series(f'up{{instance=~".*:{head.metrics_port}"}} == 1', timeout_s=120)
            job = head.run_grpo(root / "run", SHORT_GRPO, timeout_s=900)
            assert job.status == "SUCCEEDED", job.logs[-4000:]
            yield head, prom, job
        finally:
            if prom is not None:
                prom.stop()


def test_every_dashboard_query_returns_a_series(live):
    require("prometheus", "prometheus")
    head, prom, job = live
    scraped = {urlparse(u).port for u in prom.targets_up()}
    assert head.metrics_port in scraped and scraped <= head.metrics_ports(), (scraped, head.metrics_ports())
    panels = load_panels()
    queries = [(p.title, expr) for p in panels for expr, _ in p.targets]
    assert len(panels) >= 12 and len(queries) >= len(panels)
    empty = [f"{title}: {expr}" for title, expr in queries
             if not prom.query_range(promql(expr, 1, job.end - job.start), job.start, job.end, step_s=1.0)]
    assert not empty, "queries with no series over the job's run:\n  " + "\n  ".join(empty)
    # the figures are this job's: its reward curve's values are among what Prometheus saw
    rows = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward_mean"] for m in rows if "reward_mean" in m]  # the final validation's row has val/* only
    seen = {round(float(v), 6) for s in prom.query_range("ray_uniar_grpo_reward_mean", job.start, job.end)
            for _, v in s["values"]}
    assert {round(r, 6) for r in rewards} & seen, (rewards, seen)


def test_the_job_dumped_every_step_for_inspection(live):
    _, _, job = live
    from uniar_ray import gallery

    root = job.run_dir / "rollouts"
    assert gallery.dumped_steps(root) == [0, 1, 2]
    recs = gallery.load(root, 2)
    assert len(recs) == 8 and all((root / "step-000002" / r["image"]).is_file() for r in recs if r["image"])
    assert {r["weight_version"] for r in recs} == {1}  # one_step: step 2 sampled with the weights of step 1
    assert all(set(r["rewards"]) == {"target_color"} and r["advantage"] is not None for r in recs)


def test_ray_dashboard_jobs_page_shows_the_job(live, browser):
    head, _, job = live
    head.open_dashboard(browser, "#/jobs", wait_text=job.job_id, timeout_s=120)
    text = browser.evaluate("document.body.innerText")
    assert "SUCCEEDED" in text and job.job_id in text
