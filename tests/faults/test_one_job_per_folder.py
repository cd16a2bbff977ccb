"""One job per folder (uniar_ray/runlock.py): a GRPO run_dir or an eval / sweep out_dir is claimed atomically at
start and held for the job's life; a second job is refused in one line naming the running one; a lock whose owner
is provably gone is taken over, one on another machine never is. Real processes started together."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from uniar_ray import runlock
from uniar_ray.runlock import FolderInUse

from faults_helpers import REPO, Job, job_env

HOLDER = textwrap.dedent("""
    import sys
    from uniar_ray import runlock
    print("ready", flush=True)
    sys.stdin.readline()  # "go": every process claims at once
    try:
        lock = runlock.claim(sys.argv[1], "out_dir", "eval")
    except runlock.FolderInUse as e:
        print("refused:", e, flush=True)
        sys.exit(0)
    print("won", flush=True)
    sys.stdin.readline()  # held until the test has seen every answer
    lock.release()
""")


def _holders(folder, n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, env=job_env(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    return procs


def test_processes_started_together_exactly_one_gets_the_folder(tmp_path):
    folder = tmp_path / "out"
    procs = _holders(folder, 4)
    for p in procs:  # as close to together as four processes can be told
        p.stdin.write("go\n")
        p.stdin.flush()
    answers = [p.stdout.readline().strip() for p in procs]
    assert answers.count("won") == 1, answers
    winner = procs[answers.index("won")]
    for a in answers:
        if a != "won":
            assert a.startswith(f"refused: out_dir={folder} is in use by a running job: jobs.eval (pid {winner.pid} "
                                f"on host ") and "Wait for it to finish or stop it, or choose another out_dir" in a
    winner.stdin.write("\n")
    winner.stdin.flush()
    for p in procs:
        p.communicate(timeout=60)
    assert not folder.exists() or not any(folder.iterdir())  # released; nothing else was written
    runlock.claim(folder, "out_dir").release()  # free again


def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    (proc,) = _holders(folder, 1)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "won"
    proc.kill()
    proc.wait()
    stale = json.loads((folder / runlock.LOCK_NAME).read_text())
    assert stale["pid"] == proc.pid and stale["job"] == "jobs.eval"
    with runlock.claim(folder, "run_dir", "grpo"):
        assert json.loads((folder / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a job that is gone (pid {proc.pid} is not running)" in capsys.readouterr().err


def test_a_reused_pid_or_a_reboot_is_gone_another_host_is_never_guessed(tmp_path, capsys):
    me, parent = runlock._owner_record("grpo"), os.getppid()  # the parent: a live process that is not the owner
    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / runlock.LOCK_NAME
    for changed, why in [({"start": runlock._start_time(parent) - 1}, f"pid {parent} is now another process"),
                         ({"boot_id": "another-boot"}, f"pid {parent} ran before this machine rebooted")]:
        lock.write_text(json.dumps({**me, "pid": parent, "start": runlock._start_time(parent), **changed}))
        runlock.claim(folder, "run_dir").release()
        assert why in capsys.readouterr().err
    lock.write_text(json.dumps({**me, "pid": parent, "start": runlock._start_time(parent)}))
    with pytest.raises(FolderInUse, match=rf"run_dir={folder} is in use by a running job: jobs.grpo \(pid "
                                          rf"{parent} on host "):
        runlock.claim(folder, "run_dir")
    lock.write_text(json.dumps({**me, "host": "gpu-node-7", "pid": 1}))
    with pytest.raises(FolderInUse, match=rf"on host gpu-node-7.*on another machine \(it cannot be checked from "
                                          rf"here\).*if that job is gone, delete {lock}"):
        runlock.claim(folder, "run_dir")
    lock.write_text("{not json")
    with pytest.raises(FolderInUse, match="has a lock file that cannot be read"):
        runlock.claim(folder, "run_dir")
    assert lock.read_text() == "{not json"  # a refused claim never touches a lock it could not judge


def test_a_job_claiming_its_own_folder_again_shares_the_lock(tmp_path):
    first = runlock.claim(tmp_path / "out", "out_dir")
    second = runlock.claim(tmp_path / "out", "out_dir")  # a sweep's cell, or a test that makes two plans
    second.release()
    assert (tmp_path / "out" / runlock.LOCK_NAME).exists()
    first.release()
    assert not (tmp_path / "out").exists()


def test_a_run_dir_that_is_a_file_is_refused_in_one_line(run_job, tmp_path):
    from jobs import grpo as grpo_job

    (tmp_path / "run").write_text("my notes")
    code, err = run_job(grpo_job.main, "grpo", ["--config", str(REPO / "configs/grpo_demo.yaml"),
                                               f"run_dir={tmp_path / 'run'}"])
    assert code == 2 and f"[grpo] error: run_dir={tmp_path / 'run'} is a file, not a folder: choose another " \
                         "run_dir" in err and "Traceback" not in err
    assert (tmp_path / "run").read_text() == "my notes"


@pytest.mark.slow
def test_a_second_eval_on_a_running_eval_folder_is_refused_naming_it(tmp_path, tiny_cache):
    """Two real ``jobs.eval`` processes: the second starts while the first holds the folder (it has said so)."""
    args = ["--config", "configs/eval/quick_tiny.yaml", "benchmark.name=longtext", f"tiny_cache={tiny_cache}",
            f"out_dir={tmp_path / 'out'}", "progress=false", "benchmark.limit=2"]
    first = Job("eval", *args, home=tmp_path / "home")
    try:
        first.wait_for("[ray] started an embedded local Ray")  # the folder is claimed before Ray starts
        second = subprocess.run([sys.executable, "-m", "jobs.eval", *args, "settings.seed=7"], cwd=REPO,
                                env=job_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    finally:
        first.signal(signal.SIGTERM)
        code, out = first.finish(timeout_s=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"[eval] error: out_dir={tmp_path / 'out'} is in use by a running job: jobs.eval (pid {first.pid} on " \
           "host " in second.stderr and "Traceback" not in second.stderr
    assert code == 143, out[-3000:]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["identity"]["settings.seed"] == 0
