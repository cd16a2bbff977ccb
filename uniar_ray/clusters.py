"""The clusters a plan places a run on (``uniar_ray/plan.py``): described in a YAML file (Ray's autoscaler
``cluster.yaml``, or a plain ``nodes:`` list), the running Ray cluster at an address, or this machine.

    cluster = Cluster.from_file("cluster.yaml")      # PlanError (one line) when it cannot be read
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

GIB = 2**30
GPU_MEMORY_LABEL = "gpu_memory_gib"  # autoscaler files: the node type's label with each GPU's memory in GiB
GPU_MEMORY_BY_TYPE = {"H200": 141, "H100": 80, "A100": 80, "L40S": 48, "L4": 24, "A10G": 24, "V100": 32, "T4": 16}


class PlanError(ValueError):
    """The run does not fit the cluster (or its config cannot be planned); the message says what to change."""


@dataclasses.dataclass
class Node:
    name: str
    cpus: float
    gpus: int
    gpu_memory_gib: float
    memory_gib: float

    def __post_init__(self):
        self.free_cpus = self.cpus
        self.free_memory = self.memory_gib
        self.gpu_free = [1.0] * self.gpus  # fraction of each GPU not yet requested
        self.gpu_mem_free = [float(self.gpu_memory_gib)] * self.gpus


@dataclasses.dataclass
class Cluster:
    nodes: list[Node]
    source: str
    max_workers: int | None = None  # autoscaler files: the most worker nodes running at once
    described: bool = False  # from a file: its nodes, and the files of the run, may not be this machine's
    head: str = ""  # the head node's name (not a worker), when known

    @classmethod
    def from_file(cls, path: str | Path) -> "Cluster":
        """A cluster described in YAML, in either form:
        - Ray's autoscaler file (``ray up``'s cluster.yaml): every type of ``available_node_types`` counts with
          ``max_workers`` nodes (the head type with one more), each with its ``resources`` (CPU, GPU, memory in
          bytes) and its GPUs' memory from the label ``gpu_memory_gib`` (``labels: {gpu_memory_gib: "80"}``);
        - ``nodes: [{name: train, count: 2, cpus: 96, gpus: 8, gpu_memory_gib: 80, memory_gib: 1000}]``."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise PlanError(f"--cluster-file {path}: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise PlanError(f"--cluster-file {path}: not valid YAML ({' '.join(str(e).split())})") from None
        if isinstance(data, dict) and "available_node_types" in data:
            return cls._from_autoscaler(data, str(path))
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not data["nodes"]:
            raise PlanError(f"{path}: expected Ray's autoscaler format (available_node_types) or `nodes:` with a "
                            "list of {name, count, cpus, gpus, gpu_memory_gib, memory_gib}")
        nodes = []
        for i, n in enumerate(data["nodes"]):
            if not isinstance(n, dict):
                raise PlanError(f"{path}: nodes[{i}] must be a mapping, got {n!r}")
            unknown = set(n) - {"name", "count", "cpus", "gpus", "gpu_memory_gib", "memory_gib"}
            if unknown:
                raise PlanError(f"{path}: nodes[{i}]: unknown key(s) {sorted(unknown)}")
            if n.get("gpus", 0) and not n.get("gpu_memory_gib"):
                raise PlanError(f"{path}: nodes[{i}] has GPUs: give gpu_memory_gib")
            count = _number(n.get("count", 1), f"{path}: nodes[{i}].count")
            for k in range(int(count)):
                nodes.append(Node(f"{n.get('name', f'node{i}')}{k if count > 1 else ''}",
                                  _number(n.get("cpus", 0), f"{path}: nodes[{i}].cpus"),
                                  int(_number(n.get("gpus", 0), f"{path}: nodes[{i}].gpus")),
                                  _number(n.get("gpu_memory_gib", 0), f"{path}: nodes[{i}].gpu_memory_gib"),
                                  _number(n.get("memory_gib", 0), f"{path}: nodes[{i}].memory_gib")))
        return cls(nodes, str(path), described=True)

    @classmethod
    def _from_autoscaler(cls, data: dict, path: str) -> "Cluster":
        types, head = data["available_node_types"], data.get("head_node_type")
        if not isinstance(types, dict) or not types:
            raise PlanError(f"{path}: available_node_types must map node type names to their resources")
        if head not in types:
            raise PlanError(f"{path}: head_node_type {head!r} is not one of available_node_types ({', '.join(types)})")
        nodes = []
        for name, t in types.items():
            where = f"{path}: available_node_types.{name}"
            res = t.get("resources") if isinstance(t, dict) else None
            if not isinstance(res, dict):
                raise PlanError(f"{where}: give resources (CPU, GPU, memory in bytes): the plan does not ask the cloud")
            cpus = _number(res.get("CPU", 0), f"{where}.resources.CPU")
            gpus = int(_number(res.get("GPU", 0), f"{where}.resources.GPU"))
            label = (t.get("labels") or {}).get(GPU_MEMORY_LABEL)
            if gpus and label is None:
                raise PlanError(f"{where}: has {gpus} GPU(s): give their memory as labels: {{{GPU_MEMORY_LABEL}: "
                                "\"80\"}} (GiB per GPU)")
            if cpus and "memory" not in res:
                raise PlanError(f"{where}: give resources.memory (the node's memory for Ray, in bytes)")
            count = int(_number(t.get("max_workers", 0), f"{where}.max_workers")) + (name == head)
            for k in range(count):
                nodes.append(Node(f"{name}-{k}", cpus, gpus, _number(label or 0, f"{where}.labels.{GPU_MEMORY_LABEL}"),
                                  _number(res.get("memory", 0), f"{where}.resources.memory") / GIB))
        cap = data.get("max_workers")
        source = f"{path} (each node type at its max_workers" + (f"; the cluster's max_workers: {cap})" if cap else ")")
        return cls(nodes, source, max_workers=cap, head=f"{head}-0", described=True)

    @classmethod
    def detect(cls, cluster_cfg: Any) -> "Cluster":
        """The cluster this config would run on: the Ray cluster at ``cluster.address``, else this machine."""
        if cluster_cfg.address:
            return cls._from_ray(cluster_cfg.address)
        import psutil
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if gpus else 0.0
        cpus = cluster_cfg.num_cpus or os.cpu_count() or 1
        return cls([Node("local", float(cpus), gpus, gpu_gib, psutil.virtual_memory().total / GIB)], "this machine")

    @classmethod
    def _from_ray(cls, address: str) -> "Cluster":
        import ray

        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise PlanError(f"cluster.address={address}: no Ray cluster to plan on ({' '.join(str(e).split())[:200]});"
                            " start it (ray up / ray start), run --plan on one of its nodes, or describe it with "
                            "--cluster-file cluster.yaml") from None
        try:
            nodes = []
            for n in ray.nodes():
                if not n.get("Alive"):
                    continue
                res = n["Resources"]
                kind = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), "")
                gpu_gib = next((v for t, v in GPU_MEMORY_BY_TYPE.items() if t in kind.upper()), 80)
                nodes.append(Node(n["NodeManagerAddress"], res.get("CPU", 0), int(res.get("GPU", 0)), gpu_gib,
                                  res.get("memory", 0) / GIB))
        finally:
            ray.shutdown()
        return cls(nodes, f"Ray cluster at {address} (GPU memory by accelerator type; 80 GiB if unknown)")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PlanError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise PlanError(f"{where}: expected a number, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise PlanError(f"{where}: expected a finite number >= 0, got {value!r}")
    return number
