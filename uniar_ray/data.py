"""RL prompt data (spec §7.1-7.2, benchmarks_spec §7.1-7.2): JSONL records, YAML mixes, a resumable prompt sampler.

    dataset = load_dataset(cfg.data.path, seed=cfg.data.seed, skip_bad_lines=cfg.data.skip_bad_lines)
    train, held = hold_out(dataset.records, cfg.validation.holdout, seed=cfg.data.seed)   # validation prompts
    sampler = PromptSampler(train, cfg.data.prompts_per_step, seed=cfg.data.seed)
    prompts = sampler.next_batch()              # list[PromptRecord]; checkpoint sampler.state_dict()
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import yaml

from uniar_ray import datasets
from uniar_ray.paths import PathOutsideRoot, inside_root

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIX_ENTRY_KEYS = ("name", "json_path", "sampled_ratio")
HOLDOUT_STREAM = 0x686F6C64  # "hold": the held-out choice's own random stream (epoch orders use (seed, epoch))


class DataError(ValueError):
    """A data file or mix cannot be used; the message names the file (and the 1-based line)."""


@dataclasses.dataclass(frozen=True)
class BadLine:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One RL prompt. ``prompt`` is the instruction text (the reference's ``raw_prompt``); the chat template
    (spec §4.1) is applied by the rollout engine. ``task`` routes rewards (geneval | ocr | general | None)."""

    prompt: str
    number: int  # the record's id within its file, for logging (not unique across a mix)
    task: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # geneval: tag / include / exclude
    source: str = ""  # the mix entry's name (the file stem for a single JSONL)
    line: int = 0  # 1-based line in the source file

    def reward_kwargs(self) -> dict[str, Any]:
        """The dataset columns the reference passes to reward functions. ``metadata`` is a deep copy: the
        reference's geneval reward mutates it (spec §10.16), which must not leak into the next epoch."""
        return {"raw_prompt": self.prompt, "task": self.task, "metadata": copy.deepcopy(self.metadata),
                "number": self.number}


# ----------------------------------------------------------------------------------------------------------------
# JSONL records
# ----------------------------------------------------------------------------------------------------------------


def read_jsonl(
    path: str | Path,
    prompt_key: str = "instruction",
    *,
    source: str | None = None,
    skip_bad_lines: bool = False,
    bad_lines: list[BadLine] | None = None,
) -> list[PromptRecord]:
    """Records of one JSONL file, in file order. Blank lines are ignored. A malformed line raises ``DataError``
    naming the file and line, or with ``skip_bad_lines`` is appended to ``bad_lines`` (and logged) and skipped."""
    path = Path(path)
    name = source if source is not None else path.stem
    records: list[PromptRecord] = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in iter_lines(f):
            try:
                line = decode_line(raw)
                records.append(parse_record(line, prompt_key, source=name, line=lineno))
            except ValueError as e:
                bad = BadLine(str(path), lineno, str(e))
                if not skip_bad_lines:
                    raise DataError(f"{bad} (set data.skip_bad_lines=true to skip such lines)") from None
                logger.warning("skipping bad line %s", bad)
                if bad_lines is not None:
                    bad_lines.append(bad)
    return records


def iter_lines(f: Any) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of the non-blank lines of a file opened in binary mode; a UTF-8 BOM is dropped.
    Bytes, so that a line that is not UTF-8 becomes a bad line with its number (``decode_line``)."""
    for lineno, raw in enumerate(f, start=1):
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        if raw.strip():
            yield lineno, raw


def decode_line(raw: bytes) -> str:
    """One line as text; ``ValueError`` naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); save the "
                         "file as UTF-8") from None


def parse_record(text: str, prompt_key: str = "instruction", *, source: str = "", line: int = 0) -> PromptRecord:
    """One JSONL line -> ``PromptRecord``; ``ValueError`` saying what is wrong otherwise."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get(prompt_key)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{prompt_key!r} must be a non-empty string, got {prompt!r}")
    if "number" not in obj:
        raise ValueError("'number' is missing (required, the record's id)")
    number = obj["number"]
    if not isinstance(number, int) or isinstance(number, bool):
        raise ValueError(f"'number' must be an integer, got {number!r}")
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise ValueError(f"'task' must be a string or null, got {task!r}")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError(f"'metadata' must be an object, got {type(metadata).__name__}")
    if task == "geneval":
        _check_geneval_metadata(metadata)
    return PromptRecord(prompt=prompt, number=number, task=task, metadata=metadata, source=source, line=line)


def _check_geneval_metadata(meta: dict[str, Any]) -> None:
    """The GenEval reward needs ``tag`` and ``include`` items as objects (benchmarks_spec §7.1: the documented
    ``"include": ["cat"]`` form crashes the reference server; here it is caught when the data is read)."""
    if not isinstance(meta.get("tag"), str):
        raise ValueError(f"geneval metadata needs a string 'tag', got {meta.get('tag')!r}")
    for key in ("include", "exclude"):
        items = meta.get(key, [] if key == "exclude" else None)
        if not isinstance(items, list) or (key == "include" and not items):
            raise ValueError(f"geneval metadata '{key}' must be a {'non-empty ' if key == 'include' else ''}list")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("class"), str):
                raise ValueError(f"geneval metadata '{key}' items must be objects with a 'class', got {item!r}")
            count = item.get("count", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count < (1 if key == "include" else 0):
                raise ValueError(f"geneval metadata '{key}' item {item['class']!r}: bad count {count!r}")


# ----------------------------------------------------------------------------------------------------------------
# YAML mixes and the dataset
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MixEntry:
    """One ``datasets`` entry of a mix, with what was read and kept."""

    name: str
    path: str  # the resolved JSONL path
    sampled_ratio: float
    total: int  # good records in the file
    sampled: int  # records kept


@dataclasses.dataclass
class RLDataset:
    """The prompts of a run: records in mix order (each entry's sample, entries concatenated in YAML order)."""

    records: list[PromptRecord]
    entries: list[MixEntry]
    bad_lines: list[BadLine] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records[i]

    def summary(self) -> str:
        parts = [f"{e.name}: {e.sampled}/{e.total}" for e in self.entries]
        bad = f", {len(self.bad_lines)} bad lines skipped" if self.bad_lines else ""
        return f"{len(self.records)} prompts ({', '.join(parts)}){bad}"


def sample_count(value: Any, total: int, where: str = "sampled_ratio") -> tuple[int, bool]:
    """How many of ``total`` records an entry keeps, and whether they are all kept in file order.

    benchmarks_spec §7.2: value == 1 -> all, in file order; 0 < value < 1 -> int(total * value), sampled without
    replacement; otherwise min(int(value), total), sampled without replacement (3 -> 3, 2.7 -> 2, 0 -> none, more
    than total -> all, shuffled); negative, non-numeric, NaN or infinite -> error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}={value!r}: must be a number (1 = all, 0 < r < 1 = fraction, else a count)")
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{where}={value!r}: must be a finite number >= 0")
    if value == 1:
        return total, True
    if 0 < value < 1:
        return int(total * value), False
    return min(int(value), total), False


def resolve_json_path(json_path: str, yaml_dir: Path, where: str = "json_path") -> Path:
    """An entry's ``json_path``, inside the YAML's folder: relative to it, then the YAML's folder + the file name
    (the reference writes ``data/rl_demo/x.jsonl`` relative to its repository root). Absolute paths, ``..`` and
    symlinks out of the folder are errors: a mix names files beside it, never elsewhere on the machine."""
    p = Path(json_path)
    try:
        candidates = [inside_root(yaml_dir, json_path, where)]
        if p.name != json_path:
            candidates.append(inside_root(yaml_dir, p.name, where))
    except PathOutsideRoot as e:
        raise DataError(str(e)) from None
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"json_path {json_path!r} not found; tried {', '.join(str(c) for c in candidates)}")


def load_mix(
    yaml_path: str | Path,
    *,
    seed: int = 42,
    prompt_key: str = "instruction",
    skip_bad_lines: bool = False,
) -> RLDataset:
    """A YAML mix ``datasets: [{name, json_path, sampled_ratio}]``. Entry i is sampled with its own generator
    seeded by (seed, i): the same seed gives the same mix on every worker and every run (the reference samples
    unseeded and per rank, spec §10.15), and editing one entry does not change the others' samples."""
    yaml_path = Path(yaml_path)
    try:
        with open(yaml_path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise DataError(f"{yaml_path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise DataError(f"{yaml_path}: not valid YAML ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("datasets"), list) or not config["datasets"]:
        raise DataError(f"{yaml_path}: expected a mapping with a non-empty 'datasets' list")
    unknown = set(config) - {"datasets"}
    if unknown:
        raise DataError(f"{yaml_path}: unknown top-level keys {sorted(unknown)} (only 'datasets')")
    records: list[PromptRecord] = []
    entries: list[MixEntry] = []
    bad_lines: list[BadLine] = []
    for i, entry in enumerate(config["datasets"]):
        where = f"{yaml_path}: datasets[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping with json_path and sampled_ratio, got {entry!r}")
        unknown = set(entry) - set(MIX_ENTRY_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown keys {sorted(unknown)} (expected {', '.join(MIX_ENTRY_KEYS)})")
        for key in ("json_path", "sampled_ratio"):
            if key not in entry:
                raise DataError(f"{where}: '{key}' is missing")
        if not isinstance(entry["json_path"], str):
            raise DataError(f"{where}: json_path must be a string, got {entry['json_path']!r}")
        path = resolve_json_path(entry["json_path"], yaml_path.parent, f"{where}.json_path")
        name = str(entry.get("name") or path.stem)
        items = read_jsonl(path, prompt_key, source=name, skip_bad_lines=skip_bad_lines, bad_lines=bad_lines)
        count, keep_all = sample_count(entry["sampled_ratio"], len(items), f"{where}.sampled_ratio")
        if keep_all:
            kept = items
        else:
            order = np.random.default_rng([int(seed), i]).permutation(len(items))[:count]
            kept = [items[j] for j in order]
        records.extend(kept)
        entries.append(MixEntry(name, str(path), float(entry["sampled_ratio"]), len(items), len(kept)))
        logger.info("dataset %r: total=%d, sampled=%d", name, len(items), len(kept))
    return RLDataset(records, entries, bad_lines)


def resolve_data_path(path: str | Path) -> Path:
    """A data path from the config: absolute as is; relative against the working directory, the repository root,
    then as a registered public data name (``uniar/rl_demo/demo_mix.yaml``: mirror, cache or download, verified)."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [p, REPO_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c
    if not p.is_absolute() and datasets.is_registered(p):
        return datasets.fetch(p)  # DataFileError says where it looked and how to provide the file
    raise DataError(f"data path {str(path)!r} not found; tried {', '.join(str(c) for c in candidates)} (and it is "
                    "not a registered data name)")


def load_dataset(
    path: str | Path,
    *,
    seed: int = 42,
    prompt_key: str = "instruction",
    skip_bad_lines: bool = False,
) -> RLDataset:
    """``.jsonl`` -> one file, all records in file order; ``.yaml`` / ``.yml`` -> a mix; anything else is an error.
    An empty result is an error too (a run with no prompts cannot take a step)."""
    p = resolve_data_path(path)
    if p.suffix == ".jsonl":
        bad: list[BadLine] = []
        records = read_jsonl(p, prompt_key, skip_bad_lines=skip_bad_lines, bad_lines=bad)
        dataset = RLDataset(records, [MixEntry(p.stem, str(p), 1.0, len(records), len(records))], bad)
    elif p.suffix in (".yaml", ".yml"):
        dataset = load_mix(p, seed=seed, prompt_key=prompt_key, skip_bad_lines=skip_bad_lines)
    else:
        raise DataError(f"{p}: data path must end in .jsonl (records) or .yaml/.yml (a mix)")
    if not dataset.records:
        raise DataError(f"{p}: no prompts ({dataset.summary()})")
    return dataset


def hold_out(records: Sequence[PromptRecord], n: int, seed: int = 42) -> tuple[list[PromptRecord],
                                                                                list[PromptRecord]]:
    """(kept, held): ``n`` records set aside for validation, never trained on, and the rest; both in load order.

    The choice is a permutation seeded by (seed, a constant of its own), so it does not follow the sampler's epoch
    orders and the same seed and records always hold out the same prompts. A prompt text that occurs more than once
    is held out everywhere it occurs (a copy left in training would make it seen); ``held`` can then be longer than
    ``n``."""
    if n <= 0:
        return list(records), []
    if n >= len(records):
        raise DataError(f"validation.holdout={n}: the data has only {len(records)} prompts; hold out fewer, so that "
                        "some are left to train on")
    picked = np.random.default_rng([int(seed), HOLDOUT_STREAM]).permutation(len(records))[:n]
    texts = {records[int(i)].prompt for i in picked}
    held = [r for r in records if r.prompt in texts]
    kept = [r for r in records if r.prompt not in texts]
    if not kept:
        raise DataError(f"validation.holdout={n}: holding out these prompts leaves none to train on")
    return kept, held


# ----------------------------------------------------------------------------------------------------------------
# The prompt sampler
# ----------------------------------------------------------------------------------------------------------------


class PromptSampler:
    """``prompts_per_step`` records per step, in an order reshuffled every epoch.

    Epoch e's order is a permutation drawn from a generator seeded by (seed, e) (file order with shuffle=False), so
    the position is just (epoch, offset): ``state_dict()`` is a small JSON-able dict for checkpoints, and
    ``load_state_dict`` continues exactly where it was. A step that reaches the end of an epoch continues with the
    next epoch's order: every record is used once per epoch and none is dropped (TRL's sampler drops the tail).
    """

    def __init__(self, records: Sequence[PromptRecord], prompts_per_step: int, seed: int = 42, shuffle: bool = True):
        if not records:
            raise DataError("the prompt sampler needs at least one record")
        if prompts_per_step < 1:
            raise DataError(f"prompts_per_step={prompts_per_step}: must be >= 1")
        self.records = list(records)
        self.prompts_per_step = int(prompts_per_step)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.offset = 0
        self._order_epoch = -1
        self._order: np.ndarray = np.arange(0)
        self.fingerprint = fingerprint(self.records)

    def order(self, epoch: int) -> np.ndarray:
        """Record indices of one epoch, [len(records)]."""
        if epoch != self._order_epoch:
            n = len(self.records)
            self._order = np.random.default_rng([self.seed, int(epoch)]).permutation(n) if self.shuffle \
                else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> list[PromptRecord]:
        batch: list[PromptRecord] = []
        while len(batch) < self.prompts_per_step:
            order = self.order(self.epoch)
            take = order[self.offset: self.offset + self.prompts_per_step - len(batch)]
            batch.extend(self.records[int(j)] for j in take)
            self.offset += len(take)
            if self.offset == len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.records), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. The records, seed and shuffle flag must be the ones the state was saved with: a
        changed data mix would silently yield other prompts, so it is an error."""
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("num_records", len(self.records)),
                          ("fingerprint", self.fingerprint)):
            if key in state and state[key] != mine:
                raise DataError(f"sampler state was saved with {key}={state[key]!r} but this run has {mine!r}: the "
                                f"data (or data.seed) changed since the checkpoint")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < len(self.records):
            raise DataError(f"sampler state out of range: epoch={epoch}, offset={offset}, {len(self.records)} records")
        self.epoch, self.offset = epoch, offset


def fingerprint(records: Sequence[PromptRecord]) -> str:
    """Short hash of the records' identity and order (source, number, prompt, task)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.source, r.number, r.prompt, r.task], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def split_prompts(cfg: Any, records: list) -> tuple[list, list]:
    """(training prompts, validation prompts). ``validation.holdout``: that many prompts of data.path leave the
    training set (``uniar_ray.data.hold_out``, seeded by data.seed); ``validation.prompt_file``: its prompts, the
    training set unchanged (a prompt found in both is named in a warning: it is not held out)."""
    from uniar_ray.limits import check_grpo_inputs

    v, d = cfg.validation, cfg.data
    if not v.prompt_file:
        return hold_out(records, v.holdout, seed=d.seed)
    held = load_dataset(v.prompt_file, seed=d.seed, prompt_key=d.prompt_key, skip_bad_lines=d.skip_bad_lines).records
    held = check_grpo_inputs(held, cfg)
    trained = {r.prompt for r in records}
    both = [r.prompt for r in held if r.prompt in trained]
    if both:
        print(f"[data] warning: {len(both)} of the {len(held)} prompts of validation.prompt_file="
              f"{v.prompt_file} are also training prompts (e.g. {both[0]!r}): their validation reward is not "
              "held-out", file=sys.stderr, flush=True)
    return list(records), held
