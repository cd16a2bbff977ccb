"""The shared entry point of every job: a user error (config, data, model files, permissions, a full or read-only
disk) is printed as a few lines naming the file, key or record, the exit status is 2, and no traceback is shown
unless asked for. SIGTERM and SIGINT stop the job the same way wherever it is: one line, status 143 / 130.

    if __name__ == "__main__":
        from jobs import eval as job
        entry.run(job.main, "eval")        # --debug or UNIAR_DEBUG=1: the full traceback
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import threading
from typing import Any, Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# File-system errors a person fixes (a full or read-only disk, a link loop, a path through a file), with what to do.
FS_ERRORS = {errno.ENOSPC: "free some space or choose another folder", errno.EDQUOT: "free some space (disk quota)",
             errno.EROFS: "choose a folder on a writable file system", errno.ELOOP: "fix the symbolic link",
             errno.ENAMETOOLONG: "choose a shorter path", errno.EEXIST: "choose another path",
             errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "give a file, not a folder",
             errno.EACCES: "check the file's permissions", errno.ENOENT: "check the path"}
STOP_GRACE_S = 45.0  # after a stop signal the shutdown (actors, Ray) gets this long, then its processes are killed


class UserError(Exception):
    """A problem the person fixes (a bad argument, an unreadable input), named in its message: one line, exit 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors a person fixes by changing a config, a data file, a model folder or a permission; anything else is a
    bug and keeps its traceback."""
    from benchmarks.common import PromptFileError
    from uniar_ray.checkpoint import ResumeError
    from uniar_ray.config import ConfigError
    from uniar_ray.data import DataError
    from uniar_ray.limits import LimitError
    from uniar_ray.model.loading import CheckpointMismatch, CorruptWeightFile
    from uniar_ray.paths import PathOutsideRoot
    from uniar_ray.run_identity import RunIdentityError
    from uniar_ray.runlock import FolderInUse

    return (UserError, ConfigError, DataError, PromptFileError, LimitError, CheckpointMismatch, CorruptWeightFile,
            PathOutsideRoot, RunIdentityError, ResumeError, FolderInUse, FileNotFoundError, PermissionError,
            IsADirectoryError, NotADirectoryError, UnicodeDecodeError)


def is_fs_error(err: BaseException) -> bool:
    """A file-system error a person fixes (see FS_ERRORS), raised here or inside Ray."""
    return isinstance(err, OSError) and err.errno in FS_ERRORS


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("UNIAR_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str]], Any], job: str, argv: list[str] | None = None) -> None:
    """Call ``main(argv)`` (``--debug`` removed); on a user error print it and exit 2; on SIGINT / SIGTERM (once the
    job's own clean-up has run) one line and exit 130 / 143."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    with stop_on_signals(job):
        try:
            main([a for a in argv if a != "--debug"])
            raise_if_stopped()  # a job that finished after a signal whose exception was swallowed still stops
        except KeyboardInterrupt as e:
            print(f"[{job}] {describe_stop(e)}", file=sys.stderr, flush=True)
            sys.exit(exit_status(e))
        except Exception as e:  # noqa: BLE001 (sorted into user errors and bugs below)
            message = user_message(e)
            if debug or message is None:
                raise
            print(f"[{job}] error: {message}", file=sys.stderr)
            print(f"[{job}] (--debug or UNIAR_DEBUG=1 shows the traceback)", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)


def close_all(job: str, *steps: Callable[[], Any]) -> None:
    """Run every shutdown step even when one fails. While an error is on its way out (called from ``finally``) it
    stays the one the user sees and each failure here is one warning line; otherwise the first failure is raised."""
    primary = sys.exc_info()[1]
    first = None
    for step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - reported below, never hiding the first error
            if primary is None and first is None:
                first = e
            else:
                print(f"[{job}] warning: while shutting down: {user_message(e) or f'{type(e).__name__}: {e}'}",
                      file=sys.stderr, flush=True)
    if first is not None:
        raise first


# ----------------------------------------------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------------------------------------------


class Stopped(KeyboardInterrupt):
    """A stop signal, raised once in the main thread wherever the job is (a wait on Ray, a save, a background step's
    result): the job's ``finally`` blocks stop its actors and its Ray on the way out. A KeyboardInterrupt, so code
    that handles Ctrl-C handles SIGTERM the same way."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(e: BaseException) -> int:
    """128 + the signal's number: 143 for SIGTERM, 130 for SIGINT (and a KeyboardInterrupt of Python's own)."""
    return 128 + e.signum if isinstance(e, Stopped) else EXIT_INTERRUPTED


def describe_stop(e: BaseException) -> str:
    """``interrupted`` (Ctrl-C) or ``stopped by SIGTERM``: the start of the job's last line."""
    if isinstance(e, Stopped) and e.signum != signal.SIGINT:
        return f"stopped by {signal.Signals(e.signum).name}"
    return "interrupted"


class stop_on_signals:
    """While a job runs: SIGTERM and SIGINT raise ``Stopped`` once (a second signal during the shutdown is ignored),
    and a watchdog kills the job's processes if the shutdown takes over STOP_GRACE_S. A SIGINT that the job inherited
    ignored (started in the background by a shell script) stays ignored, as the shell meant. Outside the main thread
    (nothing to install) it does nothing; on exit the previous handlers come back."""

    active: list["stop_on_signals"] = []

    def __init__(self, job: str):
        self.job, self.saved, self.signum = job, {}, None
        self.done = threading.Event()

    def __enter__(self) -> "stop_on_signals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            old = signal.getsignal(sig)
            if sig == signal.SIGINT and old == signal.SIG_IGN:
                continue
            self.saved[sig] = old
            signal.signal(sig, self._handle)
        stop_on_signals.active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for sig, old in self.saved.items():
            signal.signal(sig, old)
        if self in stop_on_signals.active:
            stop_on_signals.active.remove(self)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        threading.Thread(target=self._watchdog, name="stop-watchdog", daemon=True).start()
        raise Stopped(signum)

    def _watchdog(self) -> None:
        if self.done.wait(STOP_GRACE_S):
            return
        print(f"[{self.job}] the shutdown did not finish within {STOP_GRACE_S:.0f} s; killing its processes",
              file=sys.stderr, flush=True)
        kill_descendants()
        os._exit(128 + self.signum)


def raise_if_stopped() -> None:
    """Raise ``Stopped`` again if a stop signal arrived. Python runs a signal handler wherever the main thread is,
    also inside a finalizer (Ray's ``ActorHandle.__del__``, for one), where a raised exception is printed and
    dropped; the jobs call this at points of their normal flow (each GRPO step, each batch an eval writes), so a
    signal is never lost there."""
    for handler in stop_on_signals.active:
        if handler.signum is not None:
            raise Stopped(handler.signum)


def kill_descendants() -> None:
    """SIGKILL every process this one started (an embedded Ray's GCS, raylet, agents and workers)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def keep_stop_handlers():
    """Around ``ray.init`` in a job's driver: Ray installs SIGTERM handlers of its own there (a Python one that
    exits with status 15 or 1, and a C++ one that prints ``*** SIGTERM received ***`` and aborts with 134). With a
    job's handlers active, both are kept out of this process (workers keep their crash dumps) and ours stay."""
    if not stop_on_signals.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.ray_constants as ray_constants
    import ray._private.utils as ray_utils

    handler, setter = signal.getsignal(signal.SIGTERM), ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda _handler: None
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read when the driver's core worker starts
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = setter
        signal.signal(signal.SIGTERM, handler)


def user_message(e: BaseException) -> str | None:
    """The message of the user error behind ``e``, also when Ray wrapped it (an actor's or a Ray Data stage's
    exception arrives as RayTaskError / ActorDiedError / UserCodeException); None when it is not a user error."""
    types = user_error_types()
    seen, texts = set(), []
    todo = [e]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if _is_ray_error(err):
            texts.append(str(err))
        elif isinstance(err, types) or is_fs_error(err):
            return _describe(err)
        # Ray's .cause and explicit ``raise ... from``; never __context__: a bug raised while handling a user error
        # must keep its traceback.
        todo += [getattr(err, "cause", None), err.__cause__]
    # An actor that died in its constructor keeps only the text of the cause: find its last "Type: message" line.
    names = "|".join(t.__name__ for t in types)
    text = "\n".join(texts)
    lines = re.findall(rf"^(?:\S+\.)?({names}): (.+)$", text, flags=re.MULTILINE)
    codes = "|".join(str(code) for code in FS_ERRORS)
    fs = re.findall(rf"^(?:\S+\.)?\w*(?:OS|IO)?Error: (\[Errno (?:{codes})\] .+)$", text, flags=re.MULTILINE)
    return lines[-1][1] if lines else fs[-1] if fs else None


def _is_ray_error(err: BaseException) -> bool:
    # RayTaskError subclasses the cause's type (as_instanceof_cause): its str() is the whole remote traceback.
    return type(err).__module__.startswith("ray.")


def _describe(err: BaseException) -> str:
    """OSErrors carry the path in ``filename``: name it and say what to do."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        hint = FS_ERRORS.get(err.errno, "check the file's permissions" if isinstance(err, PermissionError)
                             else "check the path")
        return f"{err.filename}: {err.strerror}; {hint}"
    if isinstance(err, UnicodeDecodeError):
        return f"{err}; save the file as UTF-8"
    return str(err)
