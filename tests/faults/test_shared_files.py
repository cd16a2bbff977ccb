"""Files in shared folders (/tmp): the cluster tests' lock file is opened without following a planted link and never
written; the namespace cluster's folder is private and its token file is 0600 from its first byte; tiny reward
models are cached in the user's folder, not under a name anyone could take first in the temp folder."""
from __future__ import annotations

import os
import stat

import pytest

from tests.cluster.netns import Cluster, open_lock_file, private_dir, write_secret


def test_lock_file_in_a_shared_folder_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "precious"
    victim.write_bytes(b"a file the attacker wants truncated")
    lock = tmp_path / "uniart.lock"
    lock.symlink_to(victim)
    with pytest.raises(PermissionError, match="uniart.lock: a symbolic link; the lock file is never opened through"):
        open_lock_file(lock)
    assert victim.read_bytes() == b"a file the attacker wants truncated"
    lock.unlink()
    os.link(victim, lock)  # a hard link to another file: locking it would lock that file
    with pytest.raises(PermissionError, match="it has 2 names"):
        open_lock_file(lock)
    lock.unlink()
    lock.write_bytes(b"left by an earlier session")
    fd = open_lock_file(lock)  # an ordinary leftover: used as it is, never truncated
    os.close(fd)
    assert lock.read_bytes() == b"left by an earlier session"
    lock.unlink()
    fd = open_lock_file(lock)
    os.close(fd)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    if os.geteuid() == 0:  # CI runs as root: a lock file someone else made is refused (as non-root, chown fails)
        os.chown(lock, 65534, 65534)
        with pytest.raises(PermissionError, match="owned by uid 65534, not by this user"):
            open_lock_file(lock)


def test_cluster_token_file_is_0600_from_its_first_byte_in_a_private_folder(tmp_path, monkeypatch):
    base = private_dir(tmp_path / "uniar-cl")
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    token = Cluster(base=base).token_path
    seen = []
    real_write = os.write

    def spy(fd, data):  # the file's mode when its first byte is written
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    old_umask = os.umask(0)  # the most permissive umask: only the mode given at creation protects the token
    try:
        token.symlink_to(tmp_path / "elsewhere")  # a planted link is replaced, never written through
        write_secret(token, "f" * 64)
    finally:
        os.umask(old_umask)
    assert seen and set(seen) == {0o600} and not (tmp_path / "elsewhere").exists()
    assert not token.is_symlink() and token.read_text() == "f" * 64
    bad = tmp_path / "planted-cl"
    bad.symlink_to(tmp_path)
    with pytest.raises(PermissionError, match="planted-cl: not a folder"):
        private_dir(bad)
    loose = tmp_path / "loose-cl"
    loose.mkdir(mode=0o777)
    assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o700  # a leftover of ours is made private again
    if os.geteuid() == 0:
        os.chown(loose, 65534, 65534)
        with pytest.raises(PermissionError, match="owned by uid 65534"):
            private_dir(loose)


def test_tiny_reward_models_are_cached_in_the_user_folder_not_the_temp_folder(tmp_path, monkeypatch):
    import tempfile

    from rewards import tiny

    monkeypatch.delenv("UNIAR_TINY_DIR", raising=False)
    monkeypatch.setenv("UNIAR_CACHE_DIR", str(tmp_path / "cache"))
    written = []
    monkeypatch.setattr(tiny, "write_tiny", lambda kind, folder, seed=0: written.append(folder) or folder)
    tiny.resolve("tiny", "clip", seed=3)
    assert written == [tmp_path / "cache" / "tiny_rewards" / "clip-seed3"]
    assert not str(written[0]).startswith(tempfile.gettempdir() + os.sep + "uniar_tiny_rewards")
