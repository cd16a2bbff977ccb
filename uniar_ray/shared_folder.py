"""One run folder for the driver and every trainer rank: the driver writes a marker file with a fresh token into the
run folder, each rank reads it back, the driver removes it (the folder is left as it was). A rank that cannot see
the folder, or sees another folder under the same path (a node-local disk, the job's working directory unpacked on
each node), is an error at start naming its node, before any training: checkpoints written there would be split
across machines.

    token = write_marker(run_path)                        # the driver
    problem = check_marker(str(run_path), token)          # each rank, on its node ("" = the same folder)
    verify(run_path, [(rank, node_ip, problem), ...])     # the driver: RunFolderError naming the nodes
    remove_marker(run_path, token)
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from uniar_ray.config import ConfigError

MARKER = ".driver-marker"  # + "-<token>": two starts never read each other's


class RunFolderError(ConfigError):
    """The run folder is not one folder shared by the driver and every trainer rank."""


def marker_path(folder: str | Path, token: str) -> Path:
    return Path(folder) / f"{MARKER}-{token}"


def write_marker(folder: Path) -> str:
    token = secrets.token_hex(16)
    tmp = Path(folder) / f".{token}.tmp"
    tmp.write_text(f"{token} {socket.gethostname()}\n")
    tmp.replace(marker_path(folder, token))  # a rank never reads half a token
    return token


def remove_marker(folder: Path, token: str) -> None:
    marker_path(folder, token).unlink(missing_ok=True)


def check_marker(folder: str, token: str) -> str:
    """On a rank: "" when ``folder`` holds the driver's marker for ``token`` and is writable here, else why not."""
    p = Path(folder)
    if not p.is_dir():
        return f"{folder} does not exist on this node"
    try:
        words = marker_path(p, token).read_text().split()
    except FileNotFoundError:
        return f"{folder} on this node is another folder than the driver's (the driver's marker file is not in it)"
    except OSError as e:
        return f"cannot read the driver's marker in {folder} on this node ({e.strerror})"
    if not words or words[0] != token:
        return f"{folder} on this node holds a marker file that is not the driver's"
    if not os.access(p, os.W_OK):
        return f"{folder} is not writable on this node"
    return ""


def verify(folder: Path, answers: list[tuple[int, str, str]]) -> None:
    """``answers``: (rank, node, problem) of every trainer rank; RunFolderError naming each rank that failed."""
    bad = [f"trainer rank {rank} on node {node}: {problem}" for rank, node, problem in answers if problem]
    if bad:
        raise RunFolderError(f"run_dir={folder} is not one folder shared by the driver and every trainer rank "
                             "(they write its checkpoints):\n" + "\n".join(bad) + "\nPut run_dir on storage the "
                             "driver and all trainer nodes share (NFS, a cluster file system), as an absolute path.")
