"""One job per output folder: a lock file in the folder, claimed atomically at start and held for the job's life,
naming its owner (host, PID, process start time, command); released on exit.

    with claim("runs/grpo-demo", what="run_dir", job="grpo"):   # FolderInUse (one line) when another job holds it
        ...
A lock is taken over only when its owner is provably gone: on the same machine (host name, boot and PID namespace)
its PID is dead or belongs to a process started at another time. An owner on another host is never guessed at: the
message says which lock file to delete once that job is known to be gone. The lock file is created with a hard
link from a complete private file, so no reader ever sees it half-written, also on NFS.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".uniar-job.lock"  # inside the folder; eval's "is this folder empty?" and clean-ups skip it


class FolderInUse(RuntimeError):
    """Another job holds the folder (or the folder cannot be a job's folder); the message names it and what to do."""


def claim(folder: str | Path, what: str = "out_dir", job: str = "") -> "FolderLock":
    """Create ``folder`` if needed and hold its lock; raises FolderInUse when another live job holds it. A process
    that already holds it gets it again (counted: released by the last release)."""
    return FolderLock(Path(folder), what, job).acquire()


def lock_path(folder: str | Path) -> Path:
    return Path(folder) / LOCK_NAME


class FolderLock:
    def __init__(self, folder: Path, what: str, job: str):
        self.folder, self.what, self.job = Path(os.path.abspath(folder)), what, job
        self.path = self.folder / LOCK_NAME
        self.created_folder = False
        self.held = False

    # -- claiming ---------------------------------------------------------------------------------------------------

    def acquire(self) -> "FolderLock":
        existing = next(p for p in (self.folder, *self.folder.parents) if p.exists())
        if not existing.is_dir():
            where = "" if existing == self.folder else f": {existing}"
            raise FolderInUse(f"{self.what}={self.folder}{where} is a file, not a folder: choose another {self.what}")
        with _HELD_GUARD:
            if self.path in _HELD:  # this process holds it already (a sweep's cell, a test calling twice)
                _HELD[self.path][1] += 1
                self.held = True
                return self
        if not self.folder.is_dir():
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.folder.mkdir()
                self.created_folder = True
            except FileExistsError:  # made meanwhile by a job started at the same time
                pass
        try:
            self._create_or_take_over()
        except BaseException:
            self._remove_folder_if_empty()
            raise
        with _HELD_GUARD:
            _HELD[self.path] = [self, 1]
        self.held = True
        return self

    def _create_or_take_over(self) -> None:
        mine = _owner_record(self.job)
        if _link_new(self.path, mine):
            return
        with _folder_flock(self.folder):  # two jobs that find the same stale lock: one takes it, the other is refused
            owner = _read(self.path)
            if owner is None and not self.path.exists():  # released meanwhile
                if _link_new(self.path, mine):
                    return
                owner = _read(self.path)
            gone = _gone(owner)
            if not gone:
                raise FolderInUse(self._busy_message(owner))
            print(f"[lock] {self.folder}: taking over the lock of a job that is gone ({gone})", file=sys.stderr,
                  flush=True)
            self.path.unlink(missing_ok=True)
            if not _link_new(self.path, mine):
                raise FolderInUse(self._busy_message(_read(self.path)))

    def _busy_message(self, owner: dict[str, Any] | None) -> str:
        if owner is None:
            return (f"{self.what}={self.folder} has a lock file that cannot be read ({self.path}); if no job uses this "
                    f"folder, delete that file, or choose another {self.what}")
        who = (f"{owner.get('job') or 'a job'} (pid {owner.get('pid')} on host {owner.get('host')}, started "
               f"{owner.get('since', '?')}: {owner.get('command', '')})")
        if _same_machine(owner):
            return (f"{self.what}={self.folder} is in use by a running job: {who}. Wait for it to finish or stop it, "
                    f"or choose another {self.what}")
        return (f"{self.what}={self.folder} is in use by {who}, on another machine (it cannot be checked from here). "
                f"Wait for it, choose another {self.what}, or, if that job is gone, delete {self.path}")

    # -- releasing --------------------------------------------------------------------------------------------------

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _HELD_GUARD:
            entry = _HELD.get(self.path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self.path]
            first = entry[0]
        owner = _read(first.path)
        if owner is not None and _is_me(owner):  # never delete a lock a later job took over
            first.path.unlink(missing_ok=True)
        first._remove_folder_if_empty()

    def _remove_folder_if_empty(self) -> None:
        """A start refused before it wrote anything leaves no folder behind (the folder it had to create)."""
        if self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass  # something was written: keep it

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[Path, list] = {}  # lock file -> [the FolderLock that made it, holders in this process]
_HELD_GUARD = threading.Lock()


@atexit.register
def _release_all() -> None:
    """A job that ends without its finally blocks (sys.exit from a thread, an unhandled error) frees its folders."""
    for path in list(_HELD):
        entry = _HELD.get(path)
        if entry is not None:
            entry[1], entry[0].held = 1, True
            entry[0].release()


# -- the owner record ----------------------------------------------------------------------------------------------


def _owner_record(job: str) -> dict[str, Any]:
    return {"job": f"jobs.{job}" if job else "", "pid": os.getpid(), "start": _start_time(os.getpid()),
            **_machine(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def _machine() -> dict[str, Any]:
    """What makes a PID meaningful: the host, its boot, and the PID namespace (containers on one host)."""
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace()}


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None when unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _same_machine(owner: dict[str, Any]) -> bool:
    here = _machine()
    return owner.get("host") == here["host"] and owner.get("pid_ns") == here["pid_ns"]


def _is_me(owner: dict[str, Any]) -> bool:
    return (_same_machine(owner) and owner.get("boot_id") == _machine()["boot_id"] and owner.get("pid") == os.getpid()
            and owner.get("start") == _start_time(os.getpid()))


def _gone(owner: dict[str, Any] | None) -> str:
    """Why the owner is provably gone, or '' when it may be running (another host, an unreadable lock)."""
    if owner is None or not _same_machine(owner):
        return ""
    pid = owner.get("pid")
    if owner.get("boot_id") != _machine()["boot_id"]:
        return f"pid {pid} ran before this machine rebooted"
    if not isinstance(pid, int) or pid <= 0:
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not running"
    except PermissionError:
        pass  # alive, another user's
    start = _start_time(pid)
    if start is not None and owner.get("start") is not None and start != owner["start"]:
        return f"pid {pid} is now another process"
    return ""


# -- files ---------------------------------------------------------------------------------------------------------


def _link_new(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` holding ``record`` unless it exists: written to a private file, then hard-linked (atomic, and
    a reader never sees a partial file)."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _folder_flock:
    """An exclusive flock on the folder itself, for the few lines that judge and replace a stale lock (no extra
    file). A file system without flock (some network mounts) goes without: the hard link still decides."""

    def __init__(self, folder: Path):
        self.folder, self.fd = folder, None

    def __enter__(self):
        try:
            self.fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
