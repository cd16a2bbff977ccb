"""Weights from trainer rank 0 to the rollout engines over a ``torch.distributed`` group of their own
(``rollout.weight_sync: collective``; docs/weight_sync.md). No Ray here: the actors call these functions.

    store = host_store(world)                       # rank 0 (trainer): a TCPStore on a port the OS picks
    group = WeightGroup.join(host, store.port, rank, world, "gloo", name="v1", store=store)   # every member
    for bucket in buckets(metas(named), max_numel):  # both sides plan the same buckets from the same metas
        group.send([named[i][1] for i in bucket])          # rank 0: one flat broadcast per bucket
        tensors = group.receive([meta[i] for i in bucket], device)   # engines: name -> tensor

Why a group of its own: the trainer's default process group holds the trainer ranks (DeepSpeed's), and an engine
process has none. The group is built directly from a ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` over its own
TCPStore, so nothing global (``init_process_group``'s world) is touched and groups can be rebuilt when an engine
restarts. Rank 0 hosts the store on its own node: the same rendezvous idea as the trainer group, with the port
chosen by the OS when the store binds (no window in which another process can take it).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
from typing import Iterable

import torch
import torch.distributed as dist

DEFAULT_BUCKET_NUMEL = 50_000_000  # elements per broadcast (200 MB fp32, 100 MB bf16): one bucket on the wire


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate one tensor of the broadcast (the sender's full, unpartitioned shape)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the prefix: float32, bfloat16

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def metas(named: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    """The metadata of ``named`` tensors, in order; a ZeRO-3 partitioned parameter reports its full ``ds_shape``."""
    return [TensorMeta(n, tuple(getattr(t, "ds_shape", t.shape)), str(t.dtype).removeprefix("torch."))
            for n, t in named]


def buckets(tensors: list[TensorMeta], max_numel: int = DEFAULT_BUCKET_NUMEL) -> list[list[int]]:
    """Indices of consecutive tensors of one dtype, at most ``max_numel`` elements together (a larger tensor is a
    bucket alone). Sender and receivers derive the same buckets from the same metas."""
    out: list[list[int]] = []
    size = 0
    for i, m in enumerate(tensors):
        if not out or size + m.numel > max_numel or m.dtype != tensors[out[-1][0]].dtype:
            out.append([])
            size = 0
        out[-1].append(i)
        size += m.numel
    return out


def host_store(world_size: int, timeout_s: float = 1800.0) -> dist.TCPStore:
    """The group's rendezvous store, hosted by rank 0 on every interface of its node, on a port the OS picks
    (``store.port``)."""
    return dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class WeightGroup:
    """Rank 0 broadcasts, every other rank receives; tensors stay on their device (NCCL: GPU to GPU)."""

    def __init__(self, pg, store, rank: int, world_size: int, name: str):
        self.pg, self.store, self.rank, self.world_size, self.name = pg, store, rank, world_size, name

    @classmethod
    def join(cls, host: str, port: int, rank: int, world_size: int, backend: str, name: str,
             timeout_s: float = 1800.0, store: dist.Store | None = None) -> "WeightGroup":
        """Blocks until all ``world_size`` members have joined. ``store``: rank 0's own ``host_store``; the others
        connect to ``host:port``. ``name`` keeps the keys of successive groups on one store apart."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(f"uniar-weights/{name}", store)
        if backend == "gloo":  # GLOO_SOCKET_IFNAME, if set, picks the interface (as for the trainer group)
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            raise ValueError(f"weight group backend {backend!r}: expected gloo or nccl")
        return cls(pg, store, rank, world_size, name)

    def _broadcast(self, flat: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.pg.broadcast([flat], opts).wait()

    def send(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0: one broadcast of ``tensors`` flattened in order (a single contiguous tensor goes as it is; else
        one concatenation on the tensors' device, never through host memory on a GPU)."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 of a weight group sends")
        with torch.no_grad():
            if len(tensors) == 1 and tensors[0].is_contiguous():
                flat = tensors[0].detach().view(-1)
            else:
                flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            self._broadcast(flat)

    def receive(self, tensors: list[TensorMeta], device: torch.device | str) -> dict[str, torch.Tensor]:
        """Ranks > 0: the next broadcast, as ``name -> tensor`` views of one buffer on ``device``."""
        flat = torch.empty(sum(m.numel for m in tensors), dtype=tensors[0].torch_dtype, device=device)
        self._broadcast(flat)
        out, offset = {}, 0
        for m in tensors:
            out[m.name] = flat[offset: offset + m.numel].view(m.shape)
            offset += m.numel
        return out

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)  # NCCL: free the communicator now, not at collection
        if shutdown is not None and not isinstance(self.pg, dist.ProcessGroupGloo):
            shutdown()
        self.pg = self.store = None


def digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names and raw bytes, in order: equal digests mean bit-identical weights (trainer ranks among
    themselves, an engine against trainer rank 0)."""
    h = hashlib.sha256()
    for n, t in named:
        h.update(n.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
