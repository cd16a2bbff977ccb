"""The jobs on a three-node Ray cluster (head with CPU: 0, two workers, each in its own network namespace), submitted
with ``ray job submit`` from inside the head's namespace with the cluster's token.

Tests run in file order on one shared cluster: the GRPO run of the first test is the uninterrupted reference that
the node-loss test resumes against, and the node-loss test comes last because it takes a worker down.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import REPO, bring_back_workers
from tests.cluster.test_monitoring import dashboard_metrics

pytestmark = pytest.mark.slow

DATA = REPO.parent / "shared" / "data" / "uniar" / "rl_demo" / "demo_mix.yaml"  # absolute: not in the upload
GRPO = ["steps=3", "save_every=1", "grid_every=3", "data.prompts_per_step=2", "grpo.num_generations=4",
        "trainer.micro_batch_size=2", "trainer.world_size=2", "trainer.placement_strategy=STRICT_SPREAD",
        "grpo.decode_num_inference_steps=2", "cluster.address=auto", f"data.path={DATA}", "validation.every=0",
        "rewards.models.target_color.delay_s=3"]  # steps of >= 3 s: a kill after step 0 lands inside step 1
STEP_KEYS = ("reward_mean", "train/loss", "train/kl", "train/grad_norm")


def grpo_cmd(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.grpo", "--config", str(config), f"run_dir={run_dir}", *GRPO, *extra]


@pytest.fixture(scope="module")
def one_reward(tmp_path_factory) -> Path:
    """The demo config with its colour reward only: OCR would add a model load and seconds per step on 2 cores."""
    path = tmp_path_factory.mktemp("config") / "grpo_one_reward.yaml"
    demo = (REPO / "configs" / "grpo_demo.yaml").read_text()
    path.write_text(demo.replace("    ocr: {weight: 1.0, num_cpus: 0.25}\n", ""))
    assert "ocr" not in path.read_text()
    return path


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the job did not finish within {timeout:.0f} s:\n{out[-3000:]}")
    return out


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def checkpointed(run_dir: Path, step: int) -> bool:
    """A complete checkpoint (its driver_state.json is written last)."""
    return (run_dir / "checkpoints" / f"step-{step:06d}" / "driver_state.json").exists()


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(1)


def scrape(cluster, node: str) -> str:
    code, body = cluster.http_get(node, cluster.metrics_url(node), token=False)
    return body if code == 200 else ""


@pytest.fixture(scope="module")
def reference_run(cluster, one_reward, tmp_path_factory):
    """The uninterrupted 3-step GRPO run over both workers, with the head's metrics endpoint scraped while it runs."""
    healthy = bring_back_workers(cluster)
    run_dir = tmp_path_factory.mktemp("grpo") / "full"
    t0 = time.monotonic()
    proc = healthy.submit(grpo_cmd(one_reward, run_dir), REPO)
    seen = ""
    while proc.poll() is None and not ("uniar_grpo_reward_mean" in seen and "uniar_grpo_time_update" in seen):
        time.sleep(3)
        seen = scrape(healthy, "head")  # the driver (and so its gauges) runs on the head
    out = finish(proc, timeout=900)
    return {"run_dir": run_dir, "out": out, "rc": proc.returncode, "scraped": seen, "seconds": time.monotonic() - t0}


def test_grpo_job_over_two_worker_nodes(reference_run, healthy):
    r = reference_run
    assert r["rc"] == 0 and "succeeded" in r["out"] and "[grpo] step    2" in r["out"], r["out"][-3000:]
    rows = metrics(r["run_dir"])
    assert [m["step"] for m in rows] == [0, 1, 2]
    assert all(m["train/loss"] == m["train/loss"] for m in rows)  # finite, not NaN
    placement = json.loads((r["run_dir"] / "placement.json").read_text())
    workers = {healthy.ip(w) for w in healthy.workers}
    assert placement["driver_node_ip"] == healthy.ip("head")
    assert sorted(placement["trainer_node_ips"]) == sorted(workers), placement  # one rank on each worker
    digests = placement["trainer_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1], "data-parallel ranks ended with different parameters"
    print(f"[cluster] 3-step GRPO job (world_size 2 over two nodes): {r['seconds']:.1f} s; "
          f"step times {[round(m['step_time_s'], 2) for m in rows]}")


def test_metrics_endpoint_shows_grpo_figures(reference_run):
    scraped = reference_run["scraped"]
    for name in ("uniar_grpo_reward_mean", "uniar_grpo_time_rollout", "uniar_grpo_time_decode",
                 "uniar_grpo_time_score", "uniar_grpo_time_update", "uniar_grpo_time_sync"):
        assert name in scraped, f"{name} not exported on the head's metrics endpoint"
    charted = {m for m in dashboard_metrics() if m.startswith("uniar_grpo_")} - {"uniar_grpo_time_wait_prefetch"}
    assert not [m for m in charted if m not in scraped], "the Grafana dashboard charts GRPO figures nobody exports"


def test_collective_weight_sync_reaches_an_engine_on_another_node(healthy, one_reward, tmp_path):
    """rollout.weight_sync=collective over gloo between nodes: one trainer rank, two engines that cannot share a
    worker (1.25 of its 2 CPUs each), so one of them is on a node other than rank 0's."""
    run_dir = tmp_path / "run"
    proc = healthy.submit(grpo_cmd(one_reward, run_dir, "steps=2", "trainer.world_size=1",
                                   "trainer.placement_strategy=PACK", "rollout.weight_sync=collective",
                                   "rollout.num_actors=2", "rollout.num_cpus=1.25", "decoder.num_cpus=0.25",
                                   "rewards.models.target_color.delay_s=0"), REPO)
    out = finish(proc, timeout=900)
    assert proc.returncode == 0 and "succeeded" in out, out[-3000:]
    placement = json.loads((run_dir / "placement.json").read_text())
    rank0 = placement["trainer_node_ips"][0]
    assert len(placement["rollout_node_ips"]) == 2, placement
    assert [ip for ip in placement["rollout_node_ips"] if ip != rank0], placement  # one engine across the network
    assert placement["rollout_param_sha256"] == [placement["trainer_param_sha256"][0]] * 2  # both took step 2's
    assert "weight broadcast of version" not in out and "missed weights version" not in out, out[-3000:]


def test_eval_job_on_workers_writes_what_a_local_run_writes(healthy, tmp_path):
    prompts = REPO.parent / "shared" / "data" / "uniar" / "eval_prompts" / "geneval_long.jsonl"  # not uploaded
    args = ["--config", "configs/eval/quick_tiny.yaml", "benchmark.limit=2", f"benchmark.prompt_file={prompts}",
            "progress=false", f"tiny_cache={tmp_path / 'tiny'}"]
    job = healthy.submit([sys.executable, "-m", "jobs.eval", *args, f"out_dir={tmp_path / 'cluster'}",
                          "cluster.address=auto"], REPO)
    out = finish(job, timeout=600)
    assert job.returncode == 0 and "succeeded" in out, out[-3000:]
    # the same run on an embedded local Ray, in its own HOME, without the cluster's Ray address or token
    env = {k: v for k, v in healthy.env("head").items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path / "home"), RAY_ADDRESS=healthy.gcs_address)  # jobs.eval must not join it
    local = subprocess.run([sys.executable, "-m", "jobs.eval", *args, f"out_dir={tmp_path / 'local'}"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    assert "started an embedded local Ray" in local.stderr
    a, b = _file_hashes(tmp_path / "cluster"), _file_hashes(tmp_path / "local")
    assert len(a) >= 8 and a == b


def _file_hashes(out_dir: Path) -> dict[str, str]:
    """Images and per-prompt metadata (config.json and results.json carry paths and timings)."""
    files = [*out_dir.glob("images/**/*"), out_dir / "preview.png"]
    return {str(f.relative_to(out_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_tokens_are_enforced(healthy, tmp_path):
    code, body = healthy.http_get("head", f"{healthy.dashboard}/api/jobs/", token=False)
    assert code in (401, 403), (code, body[:300])
    assert healthy.http_get("head", f"{healthy.dashboard}/api/jobs/")[0] == 200
    other = tmp_path / "other_token"
    other.write_text("0" * 64)
    # a fourth raylet in w2's namespace (own temp dir) with another token: the head refuses it, and says why
    out = healthy.run("w2", [healthy.ray, "start", f"--address={healthy.gcs_address}",
                             f"--node-ip-address={healthy.ip('w2')}", "--num-cpus=1", f"--temp-dir={tmp_path / 'r'}",
                             "--disable-usage-stats"], timeout=180, env=healthy.env("w2", other))
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "InvalidAuthToken" in text and "token" in text.lower(), text[-2000:]
    assert len(healthy.alive_node_ips()) == len(healthy.nodes)


def listening_ports(cluster, node: str) -> set[int]:
    out = cluster.run(node, ["ss", "-ltnH"], timeout=30, check=True)
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.stdout.splitlines() if line.strip()}


def test_each_node_opens_only_the_documented_ports_and_only_metrics_without_a_token(healthy):
    """README "Ports": every TCP port a node listens on is a fixed one (or a worker's, in the pinned range), and of the
    HTTP ones only the Prometheus endpoints answer without the token."""
    from tests.cluster.netns import CLIENT_PORT, DASHBOARD_PORT, GCS_PORT, METRICS_PORT, NODE_PORT_FLAGS

    pinned = dict(f.lstrip("-").split("=") for f in NODE_PORT_FLAGS)
    workers = range(int(pinned.pop("min-worker-port")), int(pinned.pop("max-worker-port")) + 1)
    every_node = {METRICS_PORT, *map(int, pinned.values())}
    head_only = {GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, 44217, 44227}  # the last two: Ray's fixed metrics ports
    for node in healthy.nodes:
        allowed = every_node | (head_only if node == "head" else set())
        assert {p for p in listening_ports(healthy, node) if p not in allowed and p not in workers} == set(), node
    for node in healthy.nodes:
        assert healthy.http_get("head", f"http://{healthy.ip(node)}:{METRICS_PORT}/metrics", token=False)[0] == 200
    open_on_head = {port: healthy.http_get("w1", f"http://{healthy.ip('head')}:{port}/metrics", token=False)[0]
                    for port in (44217, 44227)}
    assert open_on_head == {44217: 200, 44227: 200}  # unauthenticated, as README says: a firewall's job
    agent = f"http://{healthy.ip('w1')}:{pinned['dashboard-agent-listen-port']}/api/job_agent/jobs/"
    assert healthy.http_get("head", agent, token=False)[0] in (401, 403)


def _kill_reward_actors(cluster) -> int:
    killed = 0
    for w in cluster.workers:
        for pid in cluster.pids(w):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"RewardActor" in title:
                subprocess.run(["kill", "-9", str(pid)], capture_output=True)
                killed += 1
    return killed


def test_dead_reward_pool_stops_the_job_within_the_failure_budget(healthy, one_reward, tmp_path):
    run_dir = tmp_path / "run"  # the colour reward only, never restarted: killed once, it stays dead
    proc = healthy.submit(grpo_cmd(one_reward, run_dir, "steps=8", "rewards.max_restarts=0",
                                   "rewards.max_task_retries=0", "grpo.max_excluded_fraction=0.5",
                                   "grpo.failure_window=3"), REPO)
    wait_for(lambda: checkpointed(run_dir, 1), 900, "checkpoint of step 1", proc)
    assert _kill_reward_actors(healthy) >= 1
    out = finish(proc, timeout=600)
    assert proc.returncode != 0 and "target_color" in out, out[-3000:]
    rows = metrics(run_dir)
    dead = [m["step"] for m in rows if m.get("excluded_groups") == 2]  # both groups of a step had no reward
    assert dead and len(rows) < 8, rows
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert kept and all(int(k.split("-")[1]) <= min(dead) for k in kept), (kept, dead)  # none after the death


def readme_cluster_commands() -> list[str]:
    """The ``ray job submit ... --working-dir . -- <entrypoint>`` commands of the README that run on any cluster
    (those with your own checkpoint paths left out): their entrypoints, as written."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "README.md").read_text(encoding="utf-8"))  # join continued lines
    found = set()
    for line in text.splitlines():
        if "ray job submit" in line and "--working-dir . -- python -m jobs." in line:
            entry = line.split("--working-dir . -- ", 1)[1].split("#")[0].strip()
            if "/ckpt/" not in entry and "/FILL/IN" not in entry:
                found.add(entry)
    return sorted(found)


def test_the_readme_cluster_commands_run_as_written(healthy):
    """The README's cluster command, exactly (default relative run_dir, no extra flags): the driver resolves the run
    folder once, both ranks find its marker, and every save (the decoder linked into each checkpoint) works."""
    commands = readme_cluster_commands()
    assert commands == ["python -m jobs.grpo --config configs/grpo_demo.yaml cluster.address=auto "
                        "trainer.world_size=2"], commands  # the README and this test change together
    proc = healthy.submit(shlex.split(commands[0]), REPO)
    out = finish(proc, timeout=1800)
    assert proc.returncode == 0 and "succeeded" in out and "[grpo] step   29" in out, out[-3000:]
    run_dir = Path(re.findall(r"^(/\S+/runs/grpo-demo\S*)\s*$", out, flags=re.MULTILINE)[-1])
    assert run_dir.is_absolute() and not list(run_dir.glob(".driver-marker*"))  # checked at start, then removed
    last = run_dir / "checkpoints" / "step-000030" / "model"
    for part in ("ar_model", "bsq_encoder", "sd3_transformer", "sd3_pipeline"):
        assert (last / part).resolve().is_dir(), part  # the decoder links resolve from the checkpoint
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if "reward_mean" in m] == list(range(30))
    assert "val/reward_mean" in rows[-1] and rows[-1]["step"] == 30  # and the trained policy's validation


def test_node_loss_then_resume_continues_like_the_uninterrupted_run(reference_run, healthy, one_reward, tmp_path):
    run_dir = tmp_path / "run"
    proc = healthy.submit(grpo_cmd(one_reward, run_dir), REPO)
    wait_for(lambda: checkpointed(run_dir, 1), 900, "step 0 with its checkpoint", proc)
    lost = "w2"
    healthy.kill_node(lost)  # every process of the node, at once: what a dead machine looks like to the others
    t_kill = time.monotonic()
    out = finish(proc, timeout=180)  # continues on what is left, or stops; never hangs
    assert not checkpointed(run_dir, 3), "the run had finished before the node was lost"
    print(f"[cluster] job after losing {lost}: rc {proc.returncode} after {time.monotonic() - t_kill:.1f} s")
    if proc.returncode != 0:
        assert healthy.ip(lost) in out and "checkpoint" in out, out[-3000:]
    healthy.start_worker(lost)
    healthy.wait_nodes(len(healthy.nodes))
    again = healthy.submit(grpo_cmd(one_reward, run_dir, "--resume"), REPO)
    out = finish(again, timeout=900)
    assert again.returncode == 0, out[-3000:]
    ref = {m["step"]: m for m in metrics(reference_run["run_dir"])}
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == [0, 1, 2]
    for m in rows[1:]:
        for key in STEP_KEYS:
            assert m[key] == pytest.approx(ref[m["step"]][key], rel=1e-4, abs=1e-6), (m["step"], key)
