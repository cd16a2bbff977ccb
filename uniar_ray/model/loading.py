"""Strict checkpoint loading: every tensor of the module must be in the files with the right shape, and nothing else.

The reference loads with ``ignore_mismatched_sizes=True``, which silently re-initialises wrong-shaped tensors; here a
missing, unexpected or wrong-shaped tensor is an error that lists them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# Persistent int64 buffers the published files may or may not carry (regenerated when absent, spec §2.4).
OPTIONAL_KEYS_SUFFIXES = ("bsq.basis", "bsq.group_basis")


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not match the model built from its config.json (or that file cannot be read)."""


def resolve_ar_folder(path: str | Path) -> Path:
    """The AR model folder: ``path`` itself if its config.json has model_type "uniar", else ``path/ar_model``."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint path {root} does not exist")
    cfg = root / "config.json"
    try:
        here = cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "uniar"
    except (ValueError, AttributeError) as e:
        raise CheckpointMismatch(f"{cfg}: not a JSON object ({e}); copy the checkpoint again") from None
    if here:
        return root
    if (root / "ar_model" / "config.json").is_file():
        return root / "ar_model"
    raise FileNotFoundError(
        f"{root}: no UniAR AR model here (expected config.json with model_type 'uniar' in {root} or {root}/ar_model)"
    )


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files")
    return files


class CorruptWeightFile(ValueError):
    """A ``*.safetensors`` file is truncated or not a safetensors file; the message names the path."""


def check_safetensors_file(path: Path) -> None:
    """Header and size check without reading the tensors: a truncated copy fails here with its path, not deep in
    a loader with "MetadataIncompleteBuffer"."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CorruptWeightFile(f"{path}: not a complete safetensors file ({size} bytes, header unreadable); "
                                    "copy or download it again")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            raise CorruptWeightFile(f"{path}: the safetensors header is corrupt; copy or download it again") from None
    if size < 8 + n + end:
        raise CorruptWeightFile(f"{path}: truncated ({size} bytes, its header needs {8 + n + end}); copy or "
                                "download it again")


def check_weight_files(folder: str | Path) -> int:
    """``check_safetensors_file`` for every ``*.safetensors`` under ``folder``; returns how many were checked."""
    files = sorted(Path(folder).rglob("*.safetensors"))
    for f in files:
        check_safetensors_file(f)
    return len(files)


def read_safetensors(folder: Path, keep=None) -> dict[str, torch.Tensor]:
    """All tensors of a folder (sharded or not); ``keep(name)`` filters which ones are read."""
    out = {}
    for f in safetensors_files(folder):
        check_safetensors_file(f)
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if keep is None or keep(k):
                    out[k] = st.get_tensor(k)
    return out


def check_tensors(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], where: str,
                  optional: tuple[str, ...] = OPTIONAL_KEYS_SUFFIXES) -> None:
    missing = [k for k in expected if k not in found and not k.endswith(optional)]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k])}"
             for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        lines = [f"{where}: checkpoint does not match its config.json"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        lines.append("  Nothing was re-initialised. Check that config.json belongs to these weights.")
        raise CheckpointMismatch("\n".join(lines))


def load_state_dict_strict(module: nn.Module, folder: Path, dtype: torch.dtype, device) -> None:
    """Load ``folder``'s safetensors into ``module`` (built on the meta device), casting floats to ``dtype``."""
    state = read_safetensors(folder)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_tensors(expected, state, str(folder))
    for k, v in module.state_dict().items():  # regenerate optional buffers the file lacks
        if k not in state:
            state[k] = _fresh_buffer(k, v)
    cast = {k: (t.to(dtype) if t.is_floating_point() else t).to(device) for k, t in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    _rebuild_nonpersistent(module, device)


def _fresh_buffer(key: str, like: torch.Tensor) -> torch.Tensor:
    if key.endswith("bsq.basis"):
        n = like.shape[0]
        return 2 ** torch.arange(n - 1, -1, -1, dtype=torch.int64)
    if key.endswith("bsq.group_basis"):
        return torch.ones(1, dtype=torch.int64)
    raise KeyError(key)


def _rebuild_nonpersistent(module: nn.Module, device) -> None:
    """Buffers not stored in files (rotary tables) were created on the meta device: recompute them for real."""
    for m in module.modules():
        rebuild = getattr(m, "rebuild_buffers", None)
        if rebuild is not None:
            rebuild(device)


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: _own_storage(v.detach()).cpu() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage (fused projections make q/k/v views of one buffer)."""
    shares = t.untyped_storage().nbytes() != t.numel() * t.element_size()
    return t.clone() if shares else t.contiguous()
