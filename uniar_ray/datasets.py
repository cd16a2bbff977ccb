"""The public data files the project reads, by registry name: found in a local mirror, the cache, or downloaded from
their source repository at a pinned commit, and always verified by sha256 (registry: ``data_registry.json``).

    path = fetch("uniar/eval_prompts/geneval.jsonl")     # a file; ``fetch_folder("uniar/imgedit_images")`` a folder
    UNIAR_DATA_MIRROR=/data/uniar-mirror  UNIAR_CACHE_DIR=~/.cache/uniar-ray  UNIAR_OFFLINE=1   (environment)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

logger = logging.getLogger(__name__)

REGISTRY_FILE = Path(__file__).with_name("data_registry.json")
MIRROR_ENV = "UNIAR_DATA_MIRROR"  # a folder laid out by registry name, searched first
CACHE_ENV = "UNIAR_CACHE_DIR"  # default ~/.cache/uniar-ray (data under data/, tiny checkpoints under tiny/)
OFFLINE_ENV = "UNIAR_OFFLINE"  # 1: never download
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
DOWNLOAD_TIMEOUT_S = 30.0

# Opens a URL for reading (urllib.request.urlopen by default); tests inject their own.
Opener = Callable[[str], BinaryIO]


class DataFileError(FileNotFoundError):
    """A registered data file is missing everywhere it was looked for, or has the wrong hash; the message names the
    file, the places tried and how to provide it."""


@dataclasses.dataclass(frozen=True)
class DataFile:
    name: str  # registry name = path under a mirror or the cache, e.g. uniar/eval_prompts/geneval.jsonl
    repo: str  # GitHub owner/name
    commit: str
    path: str  # path inside the source repository
    sha256: str
    requires: tuple[str, ...] = ()  # files that must sit beside it (a mix YAML's JSONL files)

    @property
    def url(self) -> str:
        return RAW_URL.format(repo=self.repo, commit=self.commit, path=urllib.parse.quote(self.path))

    @property
    def source(self) -> str:
        return f"{self.repo}@{self.commit[:7]}:{self.path}"


@functools.lru_cache(maxsize=None)
def registry() -> dict[str, DataFile]:
    raw = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    out = {}
    for name, entry in raw["files"].items():
        src = raw["sources"][entry["source"]]
        out[name] = DataFile(name, src["repo"], src["commit"], entry["path"], entry["sha256"],
                             tuple(entry.get("requires", ())))
    return out


def is_registered(name: str | Path) -> bool:
    """A file name, or a folder holding registered files."""
    name = _name(name)
    return name in registry() or any(n.startswith(name + "/") for n in registry())


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "uniar-ray").expanduser()


def mirror_root() -> Path | None:
    value = os.environ.get(MIRROR_ENV, "")
    return Path(value).expanduser() if value else None


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes")


# ----------------------------------------------------------------------------------------------------------------
# Lookup
# ----------------------------------------------------------------------------------------------------------------


def fetch(name: str | Path, *, mirror: Path | None = None, cache: Path | None = None,
          download: bool | None = None, opener: Opener | None = None) -> Path:
    """The verified local path of registered file ``name`` (and of the files it requires, in the same folder).
    ``mirror`` / ``cache`` / ``download`` default to the environment (``UNIAR_DATA_MIRROR``, ``UNIAR_CACHE_DIR``,
    not ``UNIAR_OFFLINE``)."""
    name = _name(name)
    entry = registry().get(name)
    if entry is None:
        raise DataFileError(f"{name!r} is not a registered data file (see {REGISTRY_FILE.name}); "
                            "give a path to an existing file instead")
    return fetch_many([name, *entry.requires], mirror=mirror, cache=cache, download=download, opener=opener) / name


def fetch_folder(name: str | Path, **kw) -> Path:
    """Every registered file under folder ``name`` (e.g. ``uniar/imgedit_images``), in one root; returns the folder."""
    name = _name(name)
    names = [n for n in registry() if n.startswith(name + "/")]
    if not names:
        raise DataFileError(f"{name!r} is not a registered data folder (see {REGISTRY_FILE.name})")
    return fetch_many(names, **kw) / name


def resolve(path: str | Path, *, folder: bool = False) -> Path:
    """A path from a config: an existing file or folder as is; otherwise a registry name, fetched."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if is_registered(path):
        return fetch_folder(path) if folder else fetch(path)
    raise DataFileError(f"{path}: no such {'folder' if folder else 'file'}, and not a registered data name "
                        f"(see {REGISTRY_FILE.name})")


def fetch_many(names: Iterable[str], *, mirror: Path | None = None, cache: Path | None = None,
               download: bool | None = None, opener: Opener | None = None) -> Path:
    """A root holding all ``names``, verified: the mirror when it has every one of them, else the cache, filled
    from the mirror's good copies and then from the network. Errors name each problem file."""
    entries = [registry()[n] for n in names]
    mirror = mirror if mirror is not None else mirror_root()
    cache = (cache if cache is not None else cache_dir()) / "data"
    download = (not offline()) if download is None else download
    if mirror is not None and all((mirror / e.name).is_file() for e in entries):
        for e in entries:
            _verify(mirror / e.name, e, where="the mirror", fix=f"restore it from {e.url}, or unset {MIRROR_ENV}")
        return mirror
    problems = []
    for e in entries:
        try:
            _ensure_cached(e, cache, mirror, download, opener)
        except DataFileError as err:
            problems.append(str(err))
    if problems:
        head = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataFileError(f"{len(problems)} data file(s) unavailable:\n  {head}\n{how_to_provide()}")
    return cache


def how_to_provide() -> str:
    return (f"To provide the data: set {MIRROR_ENV} to a folder laid out by registry name (e.g. a copy of the "
            f"project's data mirror), or allow downloads from raw.githubusercontent.com (unset {OFFLINE_ENV}), or put "
            f"the files under {cache_dir() / 'data'} ({CACHE_ENV} moves it).")


def _ensure_cached(e: DataFile, cache: Path, mirror: Path | None, download: bool, opener: Opener | None) -> None:
    target = cache / e.name
    if target.is_file():
        _verify(target, e, where="the cache", fix="delete it to fetch it again")
        return
    tried = [str(target)]
    if mirror is not None:
        candidate = mirror / e.name
        tried.insert(0, str(candidate))
        if candidate.is_file():
            _verify(candidate, e, where="the mirror", fix=f"restore it from {e.url}, or unset {MIRROR_ENV}")
            _copy_into(target, lambda out: _copy_file(candidate, out))
            return
    looked = f"looked in {', '.join(tried)}" + ("" if mirror is not None else f"; {MIRROR_ENV} is not set")
    if not download:
        raise DataFileError(f"{e.name}: not found ({looked}; downloads are off: {OFFLINE_ENV})")
    try:
        _copy_into(target, lambda out: _download(e.url, out, opener), expect=e)
    except OSError as err:  # URLError is an OSError: no network, HTTP error, timeout
        raise DataFileError(f"{e.name}: not found ({looked}) and the download of {e.url} failed ({err})") from None
    logger.info("downloaded %s from %s", e.name, e.source)


def _copy_into(target: Path, write: Callable[[BinaryIO], None], expect: DataFile | None = None) -> None:
    """Write through a temporary file beside ``target``, verify, then rename: the cache never holds a bad file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        if expect is not None:
            _verify(Path(tmp), expect, where="the download", fix="the source changed or the download was corrupted",
                    shown=expect.url)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _copy_file(src: Path, out: BinaryIO) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, out)


def _download(url: str, out: BinaryIO, opener: Opener | None) -> None:
    open_url = opener or (lambda u: urllib.request.urlopen(u, timeout=DOWNLOAD_TIMEOUT_S))
    with open_url(url) as response:
        shutil.copyfileobj(response, out)


def _verify(path: Path, e: DataFile, where: str, fix: str, shown: str | None = None) -> None:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) == e.sha256:  # a job resolves the same files several times: hash each once
        return
    digest = sha256_file(path)
    if digest != e.sha256:
        raise DataFileError(f"{e.name}: {shown or path} (in {where}) has sha256 {digest}, expected {e.sha256} "
                            f"({e.source}); {fix}")
    _VERIFIED[key] = digest


_VERIFIED: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _name(name: str | Path) -> str:
    return Path(name).as_posix().strip("/")
