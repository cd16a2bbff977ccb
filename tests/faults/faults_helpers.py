"""Plain helpers of the fault suite (fixtures are in conftest.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("UNIAR_DATA_MIRROR") or REPO.parent / "shared" / "data")  # as tests/conftest.py


def prompt_lines(name: str, n: int = 3) -> list[str]:
    return (SHARED / "uniar" / "eval_prompts" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what a refused run must leave exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def record(idx: int, prompt: str, **meta) -> str:
    return json.dumps({"idx": idx, "prompt": prompt, "meta": meta})


# ---------------------------------------------------------------------------------------------------------------
# Jobs as real processes: output read unbuffered, waited on by line; the default signal handlers; what is left
# ---------------------------------------------------------------------------------------------------------------


def job_env(home: Path | None = None) -> dict[str, str]:
    """The environment of a job the tests start: this checkout's code, unbuffered output, never the user's Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "UNIAR_DEBUG")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if home is not None:  # Ray writes under $HOME/.ray when it has no token: never the user's
        home.mkdir(parents=True, exist_ok=True)
        env["HOME"] = str(home)
    return env


def _default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a terminal would give them. A suite started in the background by a
    script has SIGINT ignored, and a child would inherit that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Job:
    """``python -m jobs.<name> ...`` in a session of its own (so that everything it starts can be found), its merged
    output read line by line in a thread: ``wait_for(text)`` blocks until a line holds it (or the job ends)."""

    def __init__(self, job: str, *args: str, home: Path | None = None):
        import queue
        import subprocess
        import sys
        import threading

        self.proc = subprocess.Popen([sys.executable, "-m", f"jobs.{job}", *args], cwd=REPO, env=job_env(home),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, preexec_fn=_default_signals)
        self.pid, self.lines, self._queue = self.proc.pid, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout_s: float = 600) -> str:
        import queue
        import time

        import pytest

        end = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                pytest.fail(f"no line with {text!r} (exit {self.proc.poll()}); output:\n{self.output[-4000:]}")
            self.lines.append(line)
            if text in line:
                return line

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def signal(self, signum) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout_s: float = 60) -> tuple[int, str]:
        """Wait for the exit (killing the whole session past ``timeout_s``); (status, everything it printed)."""
        import subprocess

        import pytest

        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not exit within {timeout_s} s; output:\n{self.output[-4000:]}")
        import queue

        try:  # the rest of its output; a process it left behind may hold the pipe open (leftovers() names it)
            while (line := self._queue.get(timeout=30)) is not None:
                self.lines.append(line)
        except queue.Empty:
            pass
        return self.proc.returncode, self.output

    def kill(self) -> None:
        import signal

        for pid in session_processes(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftovers(self, timeout_s: float = 30) -> list[str]:
        """The processes of the job's session still alive ``timeout_s`` after it exited (a raylet's workers notice
        its end on their own): their command lines; [] as soon as there are none."""
        import time

        end = time.monotonic() + timeout_s
        while (left := session_processes(self.pid)) and time.monotonic() < end:
            time.sleep(0.5)
        return [_cmdline(pid) for pid in left]


def session_processes(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    found.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"pid {pid} (gone)"
