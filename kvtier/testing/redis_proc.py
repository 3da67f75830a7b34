"""Throwaway ``redis-server`` processes on 127.0.0.1: one node, or a small cluster.

``kvtier bench tiers`` starts one when no ``--redis-url`` is given, and the
tests start them as fixtures. Servers keep nothing on disk (``--save ""
--appendonly no``), listen on loopback only, and every wait is bounded.
Liveness is checked with a few bytes of RESP over a raw socket, so this module
does not need redis-py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from kvtier.testing.procs import HOST, free_port, wait_until


class RedisNotInstalled(RuntimeError):
    """``redis-server`` (or ``redis-cli`` for a cluster) is not on PATH."""


def redis_binary(name: str = "redis-server") -> str:
    """Path of a Redis binary; RedisNotInstalled names the package that provides it."""
    path = shutil.which(name)
    if path is None:
        raise RedisNotInstalled(f"{name} is not on PATH (install the redis-server and "
                                f"redis-tools packages, e.g. apt-get install -y redis-server "
                                f"redis-tools)")
    return path


def command(port: int, *args: str, timeout_s: float = 1.0) -> bytes:
    """Send one command in RESP and return the raw reply ('' on any socket error)."""
    wire = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as s:
            s.sendall(wire.encode())
            data = s.recv(65536)
            if data.startswith(b"$"):  # bulk string: read until its announced length
                head, _, body = data.partition(b"\r\n")
                need = int(head[1:]) + 2
                while len(body) < need:
                    more = s.recv(65536)
                    if not more:
                        break
                    body += more
                return body[:need - 2]
            return data
    except OSError:
        return b""


class RedisProcess:
    """One ``redis-server`` on 127.0.0.1; :meth:`stop` then :meth:`start` keeps the port."""

    def __init__(self, workdir: str | Path | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvtier-redis-"))
        self.port = port or free_port(10000 if "--cluster-enabled" in extra_args else None)
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait (bounded) until it answers PING."""
        if self.alive:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [redis_binary(), "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
                "--logfile", str(self.workdir / f"redis-{self.port}.log"), *self.extra_args]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with "
                                   f"{self._proc.returncode}; see {self.workdir}")
            return command(self.port, "PING", timeout_s=0.5).startswith(b"+PONG")

        try:
            wait_until(up, timeout_s, f"redis-server on port {self.port}")
        except (TimeoutError, RuntimeError):
            self.stop()
            raise

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

    def close(self) -> None:
        """Stop, and remove the working folder if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisClusterProcess:
    """A Redis Cluster of ``masters`` nodes (no replicas) on 127.0.0.1."""

    def __init__(self, workdir: str | Path | None = None, masters: int = 3) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvtier-cluster-"))
        self.nodes = [RedisProcess(self.workdir / f"node{i}", extra_args=(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000")) for i in range(masters)]

    @property
    def url(self) -> str:
        """URL of the first node; a cluster client discovers the others from it."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 20.0) -> None:
        """Start every node, join them into a cluster (the first time; a restart finds
        the membership in each node's nodes.conf), wait until the cluster is ok."""
        cli = redis_binary("redis-cli")
        created = all((n.workdir / "nodes.conf").exists() for n in self.nodes)
        for node in self.nodes:
            node.start()
        addrs = [f"{HOST}:{n.port}" for n in self.nodes]
        if not created:
            subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas", "0",
                            "--cluster-yes"], check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=timeout_s)
        wait_until(lambda: all(b"cluster_state:ok" in command(n.port, "CLUSTER", "INFO")
                               for n in self.nodes), timeout_s, "redis cluster")

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop, and remove the working folder if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
