"""A local monitoring stack on 127.0.0.1, every port free-picked, every process in a group of its own that ``stop``
ends (nothing else): a Ray head with its dashboard and metrics endpoint (``ray start --head --block``), Prometheus
scraping it through the service-discovery file Ray writes into its session folder, and GRPO jobs submitted to the
head's job API. Used by tests/monitoring and ``python -m monitoring.snapshot``.

    with LocalRay(tmp) as head, Prometheus(tmp, head.discovery_file) as prom:
        job = head.submit("python -m jobs.grpo --config configs/grpo_demo.yaml cluster.address=auto steps=3")
        head.wait_job(job, timeout_s=600); prom.query_range("ray_uniar_grpo_reward_mean", t0, t1)
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class StackError(RuntimeError):
    pass


def free_port() -> int:
    """A port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """A child in a process group of its own, its output read by a thread (so a wait never blocks on a pipe)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log: Path | None = None):
        self.args = args
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.log = open(log, "w") if log else None
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        threading.Thread(target=self._read, daemon=True, name=f"out-{Path(args[0]).name}").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if self.log:
                self.log.write(line)
                self.log.flush()
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                why = "exited" if line is None else f"printed no line matching {pattern!r} within {timeout_s:.0f} s"
                raise StackError(f"{' '.join(self.args[:3])} {why}; its output:\n{''.join(self.output)[-3000:]}")
            if m := re.search(pattern, line):
                return m

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, then SIGKILL to the group after ``timeout_s``; also the group's leftovers once the leader is out."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this object started, nothing else
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        if self.log:
            self.log.close()


def _http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None, timeout_s: float = 30.0):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return r.status, r.read()


def _wait_http(url: str, timeout_s: float, headers: dict[str, str] | None = None, proc: _Process | None = None):
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        if proc is not None and proc.proc.poll() is not None:
            raise StackError(f"{proc.args[0]} exited; its output:\n{''.join(proc.output)[-3000:]}")
        try:
            status, body = _http(url, headers=headers, timeout_s=5)
            if status == 200:
                return body
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise StackError(f"{url} did not answer within {timeout_s:.0f} s ({last})")


# A GRPO job short enough for a test: the demo's tiny models, 3 steps of 2 prompts x 4 samples, one_step mode (so the
# prefetch wait is measured too), every step's samples dumped
SHORT_GRPO = ["steps=3", "async_mode=one_step", "data.prompts_per_step=2", "grpo.num_generations=4",
              "trainer.micro_batch_size=4", "decoder.max_batch=8", "grpo.decode_num_inference_steps=2",
              "save_every=100", "grid_every=1", "rollouts.dump_every=1"]


@dataclasses.dataclass
class JobRun:
    job_id: str
    status: str
    start: float  # unix seconds: submitted
    end: float  # unix seconds: seen ended
    run_dir: Path
    logs: str


class LocalRay:
    """A Ray head on 127.0.0.1 with the dashboard (job API) and a metrics endpoint, token authentication on (the
    token: ``token`` or RAY_AUTH_TOKEN from the environment or a new one), in a temp dir of its own."""

    def __init__(self, root: Path | None = None, num_cpus: int = 2, token: str | None = None,
                 start_timeout_s: float = 180.0):
        # short: Ray's socket paths must fit 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="uray-", dir="/tmp"))
        self.root = Path(root) if root else self.temp_dir
        self.token = token or os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
        self.gcs_port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
        # The dashboard's and the autoscaler's own metrics ports are fixed by default (44227, 44217): another Ray on
        # the machine may hold them, and Prometheus would scrape that one's figures as this head's
        self.own_metrics_ports = {"DASHBOARD_METRIC_PORT": free_port(), "AUTOSCALER_METRIC_PORT": free_port()}
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0", **{k: str(v) for k, v in self.own_metrics_ports.items()},
                    # every process reports its metrics each second (Ray's default: 10 s), so a short job's figures
                    # reach the endpoint before it exits
                    "RAY_metrics_report_interval_ms": "1000"}
        self.env.pop("RAY_ADDRESS", None)
        args = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={self.metrics_port}",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        self.proc = _Process(args, env=self.env, log=self.root / "ray-head.log")
        try:
            self.proc.wait_line(r"Ray runtime started", timeout_s=start_timeout_s)
            _wait_http(f"{self.dashboard_url}/api/version", timeout_s=start_timeout_s, proc=self.proc,
                       headers=self.auth_headers)
        except BaseException:
            self.stop()
            raise

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def discovery_file(self) -> Path:
        """The Prometheus file service discovery Ray keeps up to date (what ``ray metrics launch-prometheus``
        scrapes): every node's metrics endpoint."""
        return self.temp_dir / "session_latest" / "prom_metrics_service_discovery.json"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.auth_headers)

    def submit(self, entrypoint: str, env: dict[str, str] | None = None) -> str:
        """Submit a job (the repository as its working dir, as ``ray job submit --working-dir .`` does)."""
        runtime_env = {"working_dir": str(REPO), "env_vars": env or {}}
        return self.client().submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    def wait_job(self, job_id: str, timeout_s: float) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED); raises with its logs' tail when it is not done in
        time (and stops it)."""
        from ray.job_submission import JobStatus

        client, deadline = self.client(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return str(status.value)
            time.sleep(1.0)
        client.stop_job(job_id)
        raise StackError(f"job {job_id} not done within {timeout_s:.0f} s; its log:\n"
                         f"{client.get_job_logs(job_id)[-3000:]}")

    def metrics_ports(self) -> set[int]:
        """Every metrics endpoint this head may list for Prometheus: the node's, the dashboard's, the autoscaler's."""
        return {self.metrics_port, *self.own_metrics_ports.values()}

    def run_grpo(self, run_dir: Path, overrides: list[str], timeout_s: float) -> "JobRun":
        """Submit the GRPO demo config with ``overrides`` (joining this head) and wait for it to end."""
        entry = " ".join([sys.executable, "-m", "jobs.grpo", "--config", "configs/grpo_demo.yaml", "cluster.address=auto",
                          f"run_dir={run_dir}", *overrides])
        start = time.time()
        job_id = self.submit(entry)
        status = self.wait_job(job_id, timeout_s)
        return JobRun(job_id, status, start, time.time(), Path(run_dir), self.client().get_job_logs(job_id))

    def open_dashboard(self, browser, page: str = "#/jobs", wait_text: str = "", timeout_s: float = 120.0) -> None:
        """Open a page of the Ray dashboard in ``browser`` (monitoring.chromium) as a signed-in user would (the
        token in Ray's cookie) and wait until its text shows ``wait_text``."""
        browser.set_cookie(self.dashboard_url, "ray-authentication-token", self.token)
        browser.open(f"{self.dashboard_url}/{page}")
        if wait_text:
            browser.wait_for(f"document.body && document.body.innerText.includes({json.dumps(wait_text)})",
                             timeout_s=timeout_s)

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRay":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class PrometheusAPI:
    """Prometheus' HTTP API at ``url`` (any Prometheus: one ``Prometheus`` started, or a cluster's)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def api(self, path: str, **params) -> Any:
        """``/api/v1/<path>``: its ``data``, or StackError with Prometheus' error."""
        try:
            _, raw = _http(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        except urllib.error.HTTPError as e:
            raw = e.read()
        reply = json.loads(raw)
        if reply.get("status") != "success":
            raise StackError(f"Prometheus {path} {params}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step_s:g}")["result"]

    def targets_up(self) -> list[str]:
        return [t["scrapeUrl"] for t in self.api("targets")["activeTargets"] if t["health"] == "up"]

    def wait_for_series(self, expr: str, timeout_s: float) -> list[dict]:
        """Poll an instant query until it returns a series."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result := self.api("query", query=expr)["result"]:
                return result
            time.sleep(1.0)
        raise StackError(f"no series for {expr} within {timeout_s:.0f} s (targets up: {self.targets_up()})")


class Prometheus(PrometheusAPI):
    """Debian's ``prometheus`` on 127.0.0.1 scraping every target of a file service discovery (Ray's), every
    ``scrape_interval_s``; its data in a temp dir removed at ``stop``."""

    def __init__(self, discovery_file: Path, scrape_interval_s: float = 1.0, binary: str | None = None,
                 start_timeout_s: float = 60.0):
        binary = binary or shutil.which("prometheus")
        if not binary:
            raise StackError("prometheus is not installed (apt-get install -y prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="uniar-prom-"))
        super().__init__(f"http://127.0.0.1:{free_port()}")
        config = self.dir / "prometheus.yml"
        # Ray's own template (<session>/metrics/prometheus/prometheus.yml) with a shorter interval
        every = f"{round(scrape_interval_s * 1000)}ms"
        config.write_text(f"global:\n  scrape_interval: {every}\n  evaluation_interval: {every}\n"
                          f"scrape_configs:\n- job_name: ray\n  file_sd_configs:\n"
                          f"  - files: ['{discovery_file}']\n    refresh_interval: {every}\n")
        args = [binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}", "--storage.tsdb.retention.time=1d"]
        self.proc = _Process(args)
        try:
            _wait_http(f"{self.url}/-/ready", timeout_s=start_timeout_s, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
