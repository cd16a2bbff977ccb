"""scripts/install_torch.py decides without the network: CPU build from the configured indexes when they offer it,
PyTorch's CPU index otherwise, PyPI's build on CUDA machines and off Linux, nothing when the right torch is there."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("install_torch",
                                              Path(__file__).resolve().parents[1] / "scripts" / "install_torch.py")
it = importlib.util.module_from_spec(spec)
spec.loader.exec_module(it)

PIP_OUTPUT = """torch (2.15.0)
Available versions: 2.15.0, 2.14.1, 2.13.0+cpu, 2.13.0, 2.12.1
  INSTALLED: 2.13.0+cpu
"""


def test_parse_pip_index_output():
    assert it.parse_versions(PIP_OUTPUT) == ["2.15.0", "2.14.1", "2.13.0+cpu", "2.13.0", "2.12.1"]
    assert it.parse_versions("ERROR: No matching distribution found for torch") == []


@pytest.mark.parametrize("cuda,system,installed,available,expected", [
    (False, "Linux", None, ["2.13.0+cpu", "2.13.0"], ["torch==2.13.0+cpu"]),  # a local wheel folder has it
    (False, "Linux", None, ["2.15.0", "2.13.0"], ["torch==2.13.0+cpu", "--extra-index-url", it.CPU_INDEX]),
    (False, "Linux", None, [], ["torch==2.13.0+cpu", "--extra-index-url", it.CPU_INDEX]),  # indexes unreachable
    (False, "Linux", "2.13.0+cpu", [], []),
    (False, "Linux", "2.13.0", ["2.13.0+cpu"], ["torch==2.13.0+cpu"]),  # a CUDA build on a CPU machine is replaced
    (False, "Darwin", None, [], ["torch==2.13.0"]),  # PyPI's macOS wheel is the CPU build
    (True, "Linux", None, ["2.13.0+cpu"], ["torch==2.13.0"]),
    (True, "Linux", "2.13.0", [], []),
])
def test_plan(cuda, system, installed, available, expected):
    assert it.plan(cuda, system, installed, available) == expected


def test_detection_override_and_extras(capsys, monkeypatch):
    assert it.has_cuda({"UNIAR_TORCH": "cuda"}) and not it.has_cuda({"UNIAR_TORCH": "CPU"})
    with pytest.raises(SystemExit, match="UNIAR_TORCH='rocm': expected cpu or cuda"):
        it.has_cuda({"UNIAR_TORCH": "rocm"})
    monkeypatch.setenv("UNIAR_TORCH", "cuda")
    assert it.main(["--extras"]) == 0 and capsys.readouterr().out == "gpu,dev\n"
    monkeypatch.setenv("UNIAR_TORCH", "cpu")
    assert it.main(["--extras"]) == 0 and capsys.readouterr().out == "cpu,dev\n"


def test_unreachable_index_is_not_waited_on(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        raise it.subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(it.subprocess, "run", fake_run)
    assert it.available_versions("python") == []
    [(cmd, kw)] = calls
    assert cmd[-4:] == ["--retries", "0", "--timeout", "10"] and kw["timeout"] == it.QUERY_TIMEOUT_S
