"""Run folders on a cluster (issue 22.3): relative paths are made absolute once, by the driver; every trainer rank
must find the driver's marker file in the run folder before any training, or the run stops naming the rank's node.

A real mismatch needs two machines; here the ranks are stand-ins with the trainer's ``check_run_folder`` contract
(actors/trainer.py) that see the run folder's path on "another node": a folder of the same name elsewhere, or none.
The README's cluster command runs the real check on the namespace cluster (tests/cluster/test_cluster.py)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import ray

from jobs.grpo_run import check_run_folder
from uniar_ray import preflight
from uniar_ray.config import GRPORunConfig, load_config
from uniar_ray.runlog import RunDir
from uniar_ray.shared_folder import MARKER, RunFolderError

from faults_helpers import REPO


@ray.remote(num_cpus=0)
class Rank:
    """A trainer rank on node ``node`` whose file system shows ``seen`` at the run folder's path (None: the same)."""

    def __init__(self, node: str, seen: str | None):
        self.node, self.seen = node, seen

    def check_run_folder(self, folder: str, token: str) -> tuple[str, str]:
        from uniar_ray.shared_folder import check_marker

        return self.node, check_marker(self.seen or folder, token)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _parts(*ranks):
    return types.SimpleNamespace(trainer=types.SimpleNamespace(actors=list(ranks)))


def test_a_rank_that_sees_another_folder_or_none_stops_the_run_naming_its_node(local_ray, tmp_path):
    run = RunDir(tmp_path / "run").open()
    elsewhere = tmp_path / "node-local" / "run"  # the same path on another machine's own disk
    elsewhere.mkdir(parents=True)
    (elsewhere / "checkpoints").mkdir()  # an earlier run there
    parts = _parts(Rank.remote("10.0.0.1", None), Rank.remote("10.0.0.2", str(elsewhere)),
                   Rank.remote("10.0.0.3", str(tmp_path / "nowhere")))
    with pytest.raises(RunFolderError) as e:
        check_run_folder(run, parts)
    lines = str(e.value).splitlines()
    assert lines[0] == f"run_dir={run.path} is not one folder shared by the driver and every trainer rank (they " \
                       "write its checkpoints):"
    assert lines[1] == (f"trainer rank 1 on node 10.0.0.2: {elsewhere} on this node is another folder than the "
                        "driver's (the driver's marker file is not in it)")
    assert lines[2] == f"trainer rank 2 on node 10.0.0.3: {tmp_path / 'nowhere'} does not exist on this node"
    assert "storage the driver and all trainer nodes share" in lines[3] and len(lines) == 4
    assert not (run.path / "checkpoints").exists()  # nothing trained, nothing saved
    assert list(run.path.iterdir()) == [run.path / "grids"]  # the marker removed: the folder as it was


def test_ranks_that_see_the_driver_folder_pass(local_ray, tmp_path):
    run = RunDir(tmp_path / "run").open()
    check_run_folder(run, _parts(Rank.remote("10.0.0.1", None), Rank.remote("10.0.0.2", None)))
    assert not list(run.path.glob(f"{MARKER}*"))  # checked, then removed


def test_relative_paths_are_made_absolute_once_by_the_driver(tmp_path, monkeypatch):
    """``ray job submit`` unpacks the job's files in another folder on each node: a relative run_dir (or model,
    decoder, reward path) would name another folder in every actor. The driver resolves them against its own."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(GRPORunConfig, REPO / "configs/grpo_demo.yaml", [
        "run_dir=runs/x", "decoder.path=ckpt/dec", "decoder.tiny_bit_driven=false", "grpo.ref_model_path=ckpt/ref",
        "rewards.models.hps.model_path=models/clip", "rewards.models.hps.checkpoint=models/hps.pt"])
    out = preflight.resolve_paths(cfg)
    assert out.run_dir == str(tmp_path / "runs/x") and out.decoder.path == str(tmp_path / "ckpt/dec")
    assert out.grpo.ref_model_path == str(tmp_path / "ckpt/ref") and out.model.path == "tiny"
    hps = out.rewards.models["hps"]
    assert (hps.model_path, hps.checkpoint, hps.clip_path) == (str(tmp_path / "models/clip"),
                                                               str(tmp_path / "models/hps.pt"), "")
    assert Path(out.run_dir).is_absolute() and preflight.resolve_paths(out) == out  # once: idempotent
