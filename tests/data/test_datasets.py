"""The data registry: mirror first, then cache, then download; sha256 checked wherever a file comes from; clear
errors naming the file, the places tried and how to provide it. No test touches the network (injected openers)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from uniar_ray import datasets as D

REPO = Path(__file__).resolve().parents[2]
MIX = "uniar/rl_demo/demo_mix.yaml"
JSONL = "uniar/eval_prompts/longtext.jsonl"


class FakeNet:
    """Serves registered files from a local root by their raw URL, and counts the requests."""

    def __init__(self, root: Path, corrupt: set[str] = frozenset()):
        self.root, self.corrupt, self.urls = root, corrupt, []
        self.by_url = {e.url: name for name, e in D.registry().items()}

    def __call__(self, url: str):
        self.urls.append(url)
        name = self.by_url[url]
        data = (self.root / name).read_bytes()
        return io.BytesIO(data + b"x" if name in self.corrupt else data)


@pytest.fixture(autouse=True)
def no_mirror_from_the_environment(monkeypatch):
    monkeypatch.delenv(D.MIRROR_ENV, raising=False)  # mirror=None then means: no mirror


def no_network(url: str):
    raise urllib.error.URLError("no network in tests")


def test_registry_entries_are_pinned_and_complete():
    reg = D.registry()
    assert len(reg) == 193  # 5 UniAR prompt files, 4 RL demo files, 7 official files, 177 ImgEdit input images
    for name, e in reg.items():
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and re.fullmatch(r"[0-9a-f]{40}", e.commit), name
        assert all(r in reg for r in e.requires)
    assert reg[MIX].requires and reg[JSONL].url == ("https://raw.githubusercontent.com/ShareLab-SII/UniAR/"
                                                    "09341a0ecda7c14eae097f36ef27fdf5384e82ff/eval/prompts/longtext.jsonl")
    assert "daily%20object" in reg["uniar/imgedit_images/daily object/000007834.jpg"].url


def test_mirror_is_used_and_verified(shared_data, tmp_path):
    path = D.fetch(MIX, mirror=shared_data, cache=tmp_path, download=False)
    assert path == shared_data / MIX and not (tmp_path / "data").exists()
    bad = tmp_path / "mirror"
    (bad / JSONL).parent.mkdir(parents=True)
    (bad / JSONL).write_bytes((shared_data / JSONL).read_bytes().replace(b"a", b"b", 1))
    with pytest.raises(D.DataFileError, match=r"longtext\.jsonl: .*mirror.*has sha256 [0-9a-f]{64}, expected "
                                              + D.registry()[JSONL].sha256):
        D.fetch(JSONL, mirror=bad, cache=tmp_path, download=False)


def test_download_fills_the_cache_once(shared_data, tmp_path):
    net = FakeNet(shared_data)
    path = D.fetch(MIX, mirror=None, cache=tmp_path, download=True, opener=net)
    assert path == tmp_path / "data" / MIX and path.read_bytes() == (shared_data / MIX).read_bytes()
    assert len(net.urls) == 4  # the mix and the three JSONL files it names, beside it
    assert D.fetch(MIX, mirror=None, cache=tmp_path, download=True, opener=net) == path and len(net.urls) == 4
    # a file:// source goes through the real urllib opener
    import urllib.request

    local = D.fetch(JSONL, mirror=None, cache=tmp_path, download=True, opener=lambda url: urllib.request.urlopen(
        (shared_data / net.by_url[url]).as_uri()))
    assert local.read_bytes() == (shared_data / JSONL).read_bytes()


def test_corrupt_download_leaves_nothing(shared_data, tmp_path):
    with pytest.raises(D.DataFileError, match=r"longtext\.jsonl: .*download of https://raw.*failed.*has sha256"):
        D.fetch(JSONL, mirror=None, cache=tmp_path, download=True, opener=FakeNet(shared_data, {JSONL}))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_folder_from_a_partial_mirror_goes_to_the_cache(shared_data, tmp_path):
    part = tmp_path / "mirror"
    for rel in ("animal/000000265.jpg", "human/000005103.jpg"):
        (part / "uniar/imgedit_images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (part / "uniar/imgedit_images" / rel).write_bytes((shared_data / "uniar/imgedit_images" / rel).read_bytes())
    net = FakeNet(shared_data)
    folder = D.fetch_folder("uniar/imgedit_images", mirror=part, cache=tmp_path / "cache", download=True, opener=net)
    assert folder == tmp_path / "cache" / "data" / "uniar/imgedit_images"
    assert len(list(folder.rglob("*.jpg"))) == 177
    assert len(net.urls) == 175  # the mirror's good copies are not downloaded


def test_missing_everywhere_names_file_places_and_remedy(tmp_path):
    for download in (False, True):
        with pytest.raises(D.DataFileError) as err:
            D.fetch(JSONL, mirror=tmp_path / "mirror", cache=tmp_path / "cache", download=download,
                    opener=no_network)
        msg = str(err.value)
        assert f"{JSONL}: not found" in msg and str(tmp_path / "mirror" / JSONL) in msg
        assert str(tmp_path / "cache" / "data" / JSONL) in msg and D.MIRROR_ENV in msg
        assert ("downloads are off" in msg) != download and ("no network in tests" in msg) == download
    with pytest.raises(D.DataFileError, match="not a registered data file"):
        D.fetch("uniar/eval_prompts/nope.jsonl")


def test_resolve_takes_paths_and_names(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv(D.MIRROR_ENV, str(shared_data))
    mine = tmp_path / "mine.jsonl"
    mine.write_text("{}\n")
    assert D.resolve(mine) == mine and D.resolve(JSONL) == shared_data / JSONL
    assert D.resolve("uniar/imgedit_images", folder=True) == shared_data / "uniar/imgedit_images"
    with pytest.raises(D.DataFileError, match=r"nothing\.jsonl: no such file, and not a registered data name"):
        D.resolve(tmp_path / "nothing.jsonl")


@pytest.mark.parametrize("argv,missing", [
    (["jobs.eval", "--config", "configs/eval/quick_tiny.yaml", "benchmark.name=longtext"], JSONL),
    (["jobs.grpo", "--config", "configs/grpo_demo.yaml"], MIX),
])
def test_commands_without_mirror_or_network_fail_clearly(tmp_path, argv, missing):
    env = {**os.environ, D.MIRROR_ENV: "", D.CACHE_ENV: str(tmp_path / "cache"), D.OFFLINE_ENV: "1"}
    out = subprocess.run([sys.executable, "-m", *argv, f"{'out_dir' if 'eval' in argv[0] else 'run_dir'}="
                          f"{tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"{missing}: not found" in out.stderr and "To provide the data: set UNIAR_DATA_MIRROR" in out.stderr
    assert not (tmp_path / "run").exists()
