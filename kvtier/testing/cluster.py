"""``kvtier controller`` and ``kvtier router`` as real child processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kvtier.testing.procs import HOST, free_port, log_tail


class KvtierProcess:
    """One ``kvtier <command>`` child (its own session); ``start``/``stop`` may repeat."""

    def __init__(self, args: list[str], port: int, log_path: Path, token: str = "",
                 env: dict[str, str] | None = None, start_timeout_s: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None, host: str = HOST) -> None:
        self.args, self.port, self.log_path, self.token = args, port, log_path, token
        self.ssl_context = ssl_context  # https, checked (and presenting a certificate) with it
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
        self.env = env or {}
        self.events = ""  # a controller's KV events endpoint
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> KvtierProcess:
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli.main", *self.args],
                                         env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvtier {self.args[0]} exited with {self.proc.returncode} "
                                   f"(log: {self.log_path}); its log ends:\n"
                                   + log_tail(self.log_path))
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2,
                                       context=self.ssl_context).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"kvtier {self.args[0]} not up (log: {self.log_path}); "
                                       "its log ends:\n" + log_tail(self.log_path))
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> KvtierProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def call(self, path: str, body: dict | None = None, token: str | None = None,
             timeout_s: float = 30.0, headers: dict[str, str] | None = None
             ) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON body, headers) of a GET (no body) or POST."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data,
                                     {"Content-Type": "application/json", **(headers or {})})
        token = self.token if token is None else token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s, context=self.ssl_context) as resp:
                raw, status, headers = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as e:
            raw, status, headers = e.read(), e.code, dict(e.headers)
        try:
            return status, json.loads(raw), headers
        except ValueError:
            return status, raw.decode(errors="replace"), headers


def controller(log_path: Path, token: str = "", redis_url: str = "", ttl_s: float = 10.0,
               events_port: int | None = None, port: int | None = None,
               extra: list[str] | None = None,
               ssl_context: ssl.SSLContext | None = None, host: str = HOST) -> KvtierProcess:
    """A controller (not started): ``.events`` is its KV events endpoint; with
    ``ssl_context`` (``extra`` then passes ``--tls-cert``...) it is called over https."""
    port = port or free_port()
    events_port = events_port or free_port()
    args = ["controller", "--host", host, "--port", str(port), "--events-port",
            str(events_port), "--ttl-s", str(ttl_s), "--heartbeat-s", str(min(1.0, ttl_s / 3))]
    if redis_url:
        args += ["--redis-url", redis_url]
    proc = KvtierProcess(args + list(extra or []), port, log_path, token,
                         {"KVTIER_CONTROLLER__TOKEN": token} if token else {},
                         ssl_context=ssl_context, host=host)
    proc.events = f"tcp://{HOST}:{events_port}"
    return proc


def router(log_path: Path, args: list[str], port: int | None = None,
           start_timeout_s: float = 120.0, ssl_context: ssl.SSLContext | None = None,
           host: str = HOST) -> KvtierProcess:
    """A router (not started) with ``args`` after ``--host``/``--port`` (called over https
    with ``ssl_context``, whose ``args`` then pass ``--tls-cert``...)."""
    port = port or free_port()
    return KvtierProcess(["router", "--host", host, "--port", str(port), *args], port, log_path,
                         start_timeout_s=start_timeout_s, ssl_context=ssl_context, host=host)
