"""Install torch 2.13.0 into this Python: the CPU build where no CUDA device is present, from the configured indexes
when they already offer it (a local wheel folder, a mirror), else from PyTorch's CPU index; PyPI's build on GPUs.

    python scripts/install_torch.py [--dry-run]     # `make venv` runs it before installing the project
    python scripts/install_torch.py --extras        # prints the project extras for this machine (cpu,dev | gpu,dev)
UNIAR_TORCH=cpu|cuda overrides the detection. GPU machines then install the gpu extra: pip install -e '.[gpu,dev]'.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

TORCH = "2.13.0"
CPU_BUILD = f"{TORCH}+cpu"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
QUERY_TIMEOUT_S = 60  # the whole `pip index versions` call; pip's own per-request timeout is shorter


def has_cuda(env: dict[str, str] | None = None) -> bool:
    """UNIAR_TORCH=cpu|cuda when set, else whether an NVIDIA driver is installed."""
    choice = (env if env is not None else os.environ).get("UNIAR_TORCH", "").lower()
    if choice in ("cpu", "cuda"):
        return choice == "cuda"
    if choice:
        raise SystemExit(f"UNIAR_TORCH={choice!r}: expected cpu or cuda")
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def parse_versions(pip_output: str) -> list[str]:
    """The versions listed by ``pip index versions torch`` (``Available versions: 2.15.0, 2.13.0+cpu, ...``)."""
    m = re.search(r"^Available versions:\s*(.+)$", pip_output, re.MULTILINE)
    return [v.strip() for v in m.group(1).split(",")] if m else []


def available_versions(python: str = sys.executable) -> list[str]:
    """torch versions the configured indexes and wheel folders offer; [] when they cannot be asked in time (an
    unreachable index is given up on quickly: no retries, 10 s per request)."""
    cmd = [python, "-m", "pip", "index", "versions", "torch", "--retries", "0", "--timeout", "10"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_versions(out.stdout) if out.returncode == 0 else []


def installed_version(python: str = sys.executable) -> str | None:
    cmd = [python, "-c", "import importlib.metadata as m; print(m.version('torch'))"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def plan(cuda: bool, system: str, installed: str | None, available: list[str]) -> list[str]:
    """The ``pip install`` arguments that get the right torch, [] when it is already there.

    - CUDA machine: PyPI's torch (its Linux wheels are the CUDA build).
    - CPU machine, not Linux: PyPI's torch is already the CPU build.
    - CPU Linux: ``torch==2.13.0+cpu`` from the configured indexes when one of them offers it, else with PyTorch's
      CPU index added (never the multi-GB CUDA wheel)."""
    if cuda or system != "Linux":
        return [] if installed == TORCH else [f"torch=={TORCH}"]
    if installed == CPU_BUILD:
        return []
    if CPU_BUILD in available:
        return [f"torch=={CPU_BUILD}"]
    return [f"torch=={CPU_BUILD}", "--extra-index-url", CPU_INDEX]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the pip command, install nothing")
    parser.add_argument("--extras", action="store_true", help="print the project extras for this machine and exit")
    args = parser.parse_args(argv)
    cuda = has_cuda()
    if args.extras:
        print("gpu,dev" if cuda else "cpu,dev")
        return 0
    system = platform.system()
    installed = installed_version()
    # Only a CPU Linux machine needs to know what the indexes offer.
    available = available_versions() if not cuda and system == "Linux" and installed != CPU_BUILD else []
    pip_args = plan(cuda, system, installed, available)
    kind = "CUDA" if cuda else "CPU"
    if not pip_args:
        print(f"torch {installed} already installed ({kind} machine)")
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "-q", *pip_args]
    print(f"{kind} machine: {' '.join(cmd)}")
    if cuda:
        print("then the GPU stack: pip install -e '.[gpu,dev]' (vLLM CUDA, flash-attn, torchvision, open-clip)")
    return 0 if args.dry_run else subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
