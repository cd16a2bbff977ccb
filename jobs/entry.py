"""The shared entry point of every job: a user error (config, data, model files, permissions) is printed as a few
lines naming the file, key or record, the exit status is 2, and no traceback is shown unless asked for.

    if __name__ == "__main__":
        from jobs import eval as job
        entry.run(job.main, "eval")        # --debug or UNIAR_DEBUG=1: the full traceback
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors a person fixes by changing a config, a data file, a model folder or a permission; anything else is a
    bug and keeps its traceback."""
    from benchmarks.common import PromptFileError
    from uniar_ray.config import ConfigError
    from uniar_ray.data import DataError
    from uniar_ray.limits import LimitError
    from uniar_ray.model.loading import CheckpointMismatch, CorruptWeightFile
    from uniar_ray.paths import PathOutsideRoot
    from uniar_ray.run_identity import RunIdentityError

    return (ConfigError, DataError, PromptFileError, LimitError, CheckpointMismatch, CorruptWeightFile,
            PathOutsideRoot, RunIdentityError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError, UnicodeDecodeError)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("UNIAR_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str]], Any], job: str, argv: list[str] | None = None) -> None:
    """Call ``main(argv)`` (``--debug`` removed); on a user error print it and exit 2, on Ctrl-C exit 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        main([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        print(f"[{job}] interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 (sorted into user errors and bugs below)
        message = user_message(e)
        if debug or message is None:
            raise
        print(f"[{job}] error: {message}", file=sys.stderr)
        print(f"[{job}] (--debug or UNIAR_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


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
        elif isinstance(err, types):
            return _describe(err)
        # Ray's .cause and explicit ``raise ... from``; never __context__: a bug raised while handling a user error
        # must keep its traceback.
        todo += [getattr(err, "cause", None), err.__cause__]
    # An actor that died in its constructor keeps only the text of the cause: find its last "Type: message" line.
    names = "|".join(t.__name__ for t in types)
    lines = re.findall(rf"^(?:\S+\.)?({names}): (.+)$", "\n".join(texts), flags=re.MULTILINE)
    return lines[-1][1] if lines else None


def _is_ray_error(err: BaseException) -> bool:
    # RayTaskError subclasses the cause's type (as_instanceof_cause): its str() is the whole remote traceback.
    return type(err).__module__.startswith("ray.")


def _describe(err: BaseException) -> str:
    """OSErrors carry the path in ``filename``: name it and say what to do."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        hint = "check the file's permissions" if isinstance(err, PermissionError) else "check the path"
        return f"{err.filename}: {err.strerror}; {hint}"
    if isinstance(err, UnicodeDecodeError):
        return f"{err}; save the file as UTF-8"
    return str(err)
