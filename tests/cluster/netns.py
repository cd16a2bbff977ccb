"""A Ray cluster in Linux network namespaces on one machine: a head (CPU: 0, as in cluster.yaml) and workers w1, w2,
each with its own network stack and address, so that what only breaks across hosts breaks here too.

    sudo python -m tests.cluster.netns up            # ~40 s on 2 cores; prints the head's address and token file
    sudo python -m tests.cluster.netns exec head -- ray job submit --address http://10.213.7.1:8265 -- python -c 1
    sudo python -m tests.cluster.netns down          # stops every process of the cluster, removes what up made

Topology: a bridge in a namespace of its own (``<prefix>-br``) and one namespace per node (``<prefix>-head`` ...)
joined to it by a veth pair whose node end is ``veth0`` in every node; addresses from a private /24 that exists only
on those interfaces. Nothing is created or changed in the root namespace, which has no route to that subnet: every
client (ray, curl, python) runs inside a namespace. Nodes are stopped by the PIDs of their namespace, never by
``ray stop`` (which scans every process on the machine). The cluster has its own HOME and token file, so the
user's ``~/.ray`` is never read or written.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

IFACE = "veth0"  # the node end of each veth pair: the same name in every node namespace (GLOO_SOCKET_IFNAME)
GCS_PORT, DASHBOARD_PORT, METRICS_PORT, CLIENT_PORT = 6379, 8265, 8090, 10001
# The ports Ray would otherwise pick at random, fixed as in cluster.yaml (test_cluster_yaml checks that they agree) so
# that a firewall can name every port a node opens; README "Ports" says who reaches each.
NODE_PORT_FLAGS = ("--node-manager-port=8076", "--object-manager-port=8077", "--dashboard-agent-grpc-port=8078",
                   "--runtime-env-agent-port=8079", "--dashboard-agent-listen-port=52365", "--min-worker-port=10002",
                   "--max-worker-port=19999")
# Environment a cluster process must never inherit from the caller: it would join or authenticate elsewhere.
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_CONFIG_JSON_ENV_VAR")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, or a kernel/container that forbids them)."""


def unavailable_reason() -> str | None:
    """Why this machine cannot host the cluster, or None. Cheap: creates and deletes one probe namespace."""
    if os.geteuid() != 0:
        return "the cluster tests need root (they create network namespaces with `ip netns`)"
    if shutil.which("ip") is None:
        return "the cluster tests need iproute2's `ip` on PATH"
    probe = f"netns-probe-{os.getpid()}"  # outside every cluster prefix: no down() removes it
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Cluster:
    """Names, addresses and environment of one namespace cluster; ``up``/``down`` make and remove it."""

    prefix: str = "uniar"
    subnet: str = "10.213.7"  # a /24 that exists only on the veth interfaces of this cluster
    workers: tuple[str, ...] = ("w1", "w2")
    worker_cpus: int = 2
    base: Path | None = None  # short: Ray's socket paths under it must stay under 107 characters

    def __post_init__(self):
        self.base = Path(self.base or f"/tmp/{self.prefix}-cl")
        self.ray = str(Path(sys.executable).parent / "ray")

    # -- names --------------------------------------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[str, ...]:
        return ("head", *self.workers)

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def ip(self, node: str) -> str:
        return f"{self.subnet}.{self.nodes.index(node) + 1}"

    @property
    def token_path(self) -> Path:
        return self.base / "auth_token"

    @property
    def gcs_address(self) -> str:
        return f"{self.ip('head')}:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.ip('head')}:{DASHBOARD_PORT}"

    def metrics_url(self, node: str) -> str:
        return f"http://{self.ip(node)}:{METRICS_PORT}/metrics"

    def env(self, node: str, token_path: Path | None = None) -> dict[str, str]:
        """The environment of every process of ``node`` (and of clients run in its namespace)."""
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        # caches stay the caller's (DeepSpeed's JIT-built ops, matplotlib's font list): rebuilding them in the
        # cluster's HOME would cost every node minutes on 2 cores; authentication (~/.ray) stays the cluster's own
        env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        env.update(HOME=str(self.base / "home"), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(token_path or self.token_path), RAY_USAGE_STATS_ENABLED="0",
                   GLOO_SOCKET_IFNAME=IFACE,  # gloo would pick the host name's address: 127.0.0.1 in every namespace
                   PATH=f"{Path(self.ray).parent}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONUNBUFFERED="1",
                   RAY_metrics_report_interval_ms="2000")  # short runs: metrics reach the endpoint within seconds
        return env

    # -- running things inside a node -----------------------------------------------------------------------------
    def command(self, node: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *cmd]

    def run(self, node: str, cmd: list[str], timeout: float = 300, check: bool = False, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(self.command(node, cmd), env=env or self.env(node), capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and out.returncode != 0:
            tail = (out.stdout + out.stderr)[-3000:]
            raise RuntimeError(f"[{node}] {' '.join(cmd)} exited {out.returncode}:\n{tail}")
        return out

    def popen(self, node: str, cmd: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(node, cmd), env=env or self.env(node), text=True, **kw)

    def http_get(self, node: str, url: str, token: bool = True, timeout: float = 30) -> tuple[int, str]:
        """(status, body) of a GET from inside ``node``'s namespace, with the cluster's token or without one."""
        header = ["-H", f"Authorization: Bearer {self.token_path.read_text().strip()}"] if token else []
        out = self.run(node, ["curl", "-s", "-m", str(int(timeout)), "-w", "\n%{http_code}", *header, url],
                       timeout=timeout + 10)
        body, _, code = out.stdout.rpartition("\n")
        return int(code or 0), body

    def submit(self, entrypoint: list[str], working_dir: Path, timeout: float = 600, **kw) -> subprocess.Popen:
        """``ray job submit`` from inside the head namespace (token from the cluster's file); waits for the job."""
        cmd = [self.ray, "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir), "--",
               *entrypoint]
        return self.popen("head", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)

    def pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns(node)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []

    # -- up ---------------------------------------------------------------------------------------------------------
    def up(self) -> dict[str, float]:
        """Make the network, start the head and the workers, wait until all have joined; seconds per phase."""
        if self.leftovers():
            self.down()
        t0 = time.perf_counter()
        self.make_network()
        private_dir(self.base)  # in the shared /tmp: made by us, for us, before anything secret goes in
        (self.base / "home").mkdir(exist_ok=True)
        write_secret(self.token_path, secrets.token_hex(32))
        t1 = time.perf_counter()
        self.start_head()
        t2 = time.perf_counter()
        for w in self.workers:
            self.start_worker(w)
        self.wait_nodes(len(self.nodes))
        t3 = time.perf_counter()
        return {"network_s": t1 - t0, "head_s": t2 - t1, "workers_s": t3 - t2, "total_s": t3 - t0}

    def make_network(self) -> None:
        br = self.ns("br")
        for cmd in (["ip", "netns", "add", br], ["ip", "-n", br, "link", "set", "lo", "up"],
                    ["ip", "-n", br, "link", "add", "br0", "type", "bridge"],
                    ["ip", "-n", br, "link", "set", "br0", "up"]):
            _ip(cmd)
        for node in self.nodes:
            self.add_node_namespace(node)

    def add_node_namespace(self, node: str) -> None:
        ns, br, peer = self.ns(node), self.ns("br"), f"v-{node}"[:15]
        _ip(["ip", "netns", "add", ns])
        # created inside the bridge namespace, its other end moved straight into the node: nothing in the root one
        _ip(["ip", "-n", br, "link", "add", peer, "type", "veth", "peer", "name", IFACE, "netns", ns])
        _ip(["ip", "-n", br, "link", "set", peer, "master", "br0", "up"])
        _ip(["ip", "-n", ns, "addr", "add", f"{self.ip(node)}/24", "dev", IFACE])
        _ip(["ip", "-n", ns, "link", "set", IFACE, "up"])
        _ip(["ip", "-n", ns, "link", "set", "lo", "up"])

    def start_head(self) -> None:
        self.run("head", [self.ray, "start", "--head", f"--node-ip-address={self.ip('head')}", f"--port={GCS_PORT}",
                          "--num-cpus=0", f"--temp-dir={self.base / 'head'}", "--include-dashboard=true",
                          f"--dashboard-host={self.ip('head')}", f"--dashboard-port={DASHBOARD_PORT}",
                          f"--metrics-export-port={METRICS_PORT}", f"--ray-client-server-port={CLIENT_PORT}",
                          *NODE_PORT_FLAGS, "--disable-usage-stats"], timeout=180, check=True)

    def start_worker(self, node: str, token_path: Path | None = None, check: bool = True,
                     timeout: float = 180) -> subprocess.CompletedProcess:
        return self.run(node, [self.ray, "start", f"--address={self.gcs_address}", f"--node-ip-address={self.ip(node)}",
                               f"--num-cpus={self.worker_cpus}", f"--temp-dir={self.base / node}",
                               f"--metrics-export-port={METRICS_PORT}", *NODE_PORT_FLAGS, "--disable-usage-stats"],
                        timeout=timeout, check=check, env=self.env(node, token_path))

    def alive_node_ips(self) -> list[str]:
        """Addresses of the nodes the GCS counts as alive (asked from inside the head namespace)."""
        code = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        out = self.run("head", [sys.executable, "-c", code], timeout=120,
                       env={**self.env("head"), "RAY_ADDRESS": self.gcs_address})
        lines = out.stdout.strip().splitlines()
        return json.loads(lines[-1]) if out.returncode == 0 and lines else []

    def wait_nodes(self, n: int, timeout: float = 180) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            ips = self.alive_node_ips()
            if len(ips) >= n:
                return ips
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ips)} of {n} Ray nodes alive after {timeout:.0f} s: {ips}; "
                                   f"logs under {self.base}")
            time.sleep(2)

    # -- down -------------------------------------------------------------------------------------------------------
    def stop_node(self, node: str, grace: float = 10.0) -> None:
        """SIGTERM every process in the node's namespace, SIGKILL what is left after ``grace`` seconds."""
        _signal_all(self.pids(node), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.pids(node) and time.monotonic() < deadline:
            time.sleep(0.5)
        for _ in range(10):  # a dying raylet can still fork a worker: repeat until the namespace is empty
            left = self.pids(node)
            if not left:
                return
            _signal_all(left, signal.SIGKILL)
            time.sleep(0.5)

    def kill_node(self, node: str) -> None:
        """Node loss: SIGKILL every process of the node at once, no grace."""
        self.stop_node(node, grace=0.0)

    def leftovers(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
        return [n for n in names if n.startswith(f"{self.prefix}-")]

    def down(self) -> None:
        """Stop every process of every namespace of this prefix (workers first), delete the namespaces (their veth
        pairs and the bridge go with them) and the cluster's folder. Safe to call at any time, also twice."""
        names = self.leftovers()
        order = [self.ns(w) for w in self.workers] + [self.ns("head")]
        for ns in sorted(names, key=lambda n: (order.index(n) if n in order else -1)):
            node = ns[len(self.prefix) + 1:]
            self.stop_node(node)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can enter (0700), made if missing. In a shared folder such as /tmp
    someone else may have made it first, or planted a link there: either is refused, naming it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path}: not a folder (a symbolic link or a file someone else made?); remove it")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path}: owned by uid {st.st_uid}, not by this user; remove it")
    os.chmod(path, 0o700, follow_symlinks=False)
    return path


def write_secret(path: Path, text: str) -> None:
    """Write a secret (a token) readable by this user only from its first byte: created 0600 by ``open`` itself,
    never through a link (O_NOFOLLOW) nor into a file that exists already (O_EXCL: an old one is removed first)."""
    try:
        path.unlink()  # removes a link itself, never what it points to
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def open_lock_file(path: Path) -> int:
    """A lock file in a shared folder (/tmp), opened for ``flock`` without following a link someone planted there
    (O_NOFOLLOW), never truncated or written, and refused unless it is a regular file of this user with one name
    (a hard link to another file would be locked in its place). Returns the descriptor."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PermissionError(f"{path}: a symbolic link; the lock file is never opened through one (remove "
                                  "it)") from None
        raise
    st = os.fstat(fd)
    why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"owned by uid {st.st_uid}, not by this user" if st.st_uid != os.geteuid() else
           f"it has {st.st_nlink} names (a hard link)" if st.st_nlink != 1 else None)
    if why:
        os.close(fd)
        raise PermissionError(f"{path}: {why}; remove it")
    return fd


def _ip(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(cmd)}: {out.stderr.strip()}")


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster.netns", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("up", "down", "status", "exec"))
    p.add_argument("node", nargs="?", help="exec: head, w1 or w2")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="exec: the command, after --")
    p.add_argument("--prefix", default=os.environ.get("UNIAR_NETNS_PREFIX", "uniar"))
    p.add_argument("--subnet", default=os.environ.get("UNIAR_NETNS_SUBNET", "10.213.7"))
    a = p.parse_args(argv)
    c = Cluster(prefix=a.prefix, subnet=a.subnet)
    if a.action == "up":
        reason = unavailable_reason()
        if reason:
            print(reason, file=sys.stderr)
            return 2
        times = c.up()
        print(f"cluster up in {times['total_s']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in times.items())}); "
              f"head {c.gcs_address}, dashboard {c.dashboard} (inside the namespaces only), token {c.token_path}")
    elif a.action == "down":
        c.down()
    elif a.action == "status":
        print(json.dumps({"namespaces": c.leftovers(), "alive": c.alive_node_ips() if c.pids("head") else []}))
    else:
        cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
        if a.node not in c.nodes or not cmd:
            p.error("exec needs a node (head, w1, w2) and a command after --")
        return subprocess.run(c.command(a.node, cmd), env=c.env(a.node)).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
