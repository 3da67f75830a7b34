"""The management API off loopback: TLS (and mutual TLS) over real HTTPS, refused
plain or unverified clients, and the start-up refusals of a surface without TLS.

Servers listen on 127.0.0.1 and, where this machine has one, on a non-loopback
address of its own (traffic to it never leaves the machine)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from kvtier.config import ControlConfig, load_config
from kvtier.control.api import CacheAPI
from kvtier.control.client import ControlClient, ControlError
from kvtier.control.server import ControlServer
from kvtier.errors import ConfigError
from kvtier.net.tls import TlsFiles
from kvtier.testing.tls import make_certs, non_loopback_address
from tests.test_control import TOKEN, Setup, make_setup

HOST = non_loopback_address() or "127.0.0.1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    base = tmp_path_factory.mktemp("certs")
    good = make_certs(base / "good", ["server", "admin"], ["127.0.0.1", HOST, "localhost"])
    rogue = make_certs(base / "rogue", ["admin"], ["127.0.0.1", HOST], ca_name="rogue CA")
    files = {n: TlsFiles(c.cert_file, c.key_file, c.ca_file) for n, c in good.items()}
    files["rogue"] = TlsFiles(rogue["admin"].cert_file, rogue["admin"].key_file,
                              good["admin"].ca_file)
    files["anonymous"] = TlsFiles("", "", good["admin"].ca_file)
    return files


@pytest.fixture()
def tls_api(tmp_path: Path, certs: dict[str, TlsFiles]) -> Iterator[Setup]:
    s = make_setup(tmp_path, token=TOKEN)  # its store, served again over TLS below
    api = CacheAPI(s.store, s.engine.hasher, s.engine.layout)
    server = ControlServer(api, ControlConfig(host=HOST, token=TOKEN), 0, certs["server"])
    yield Setup(server, s.store, s.engine, s.tokens, server.url)
    server.close()
    s.server.close()
    s.store.close()


def test_tls_with_the_cluster_ca_and_a_client_certificate_works(
        tls_api: Setup, certs: dict[str, TlsFiles]) -> None:
    assert tls_api.url.startswith("https://")
    client = ControlClient(tls_api.url, TOKEN, tls=certs["admin"])
    assert client.call("lookup", {"tokens": tls_api.tokens})["hit_chunks"] == 4
    client.close()


@pytest.mark.parametrize("who", ["plain http", "no client certificate", "another CA's client "
                                 "certificate", "no CA (server unverified)"])
def test_clients_that_cannot_prove_themselves_or_the_server_are_refused(
        tls_api: Setup, certs: dict[str, TlsFiles], who: str) -> None:
    url, tls = tls_api.url, None
    if who == "plain http":
        url = url.replace("https://", "http://")
    else:
        tls = {"no client certificate": certs["anonymous"],
               "another CA's client certificate": certs["rogue"],
               "no CA (server unverified)": TlsFiles(certs["admin"].cert_file,
                                                     certs["admin"].key_file, "")}[who]
    client = ControlClient(url, TOKEN, timeout_s=5, tls=tls)
    with pytest.raises(ControlError) as err:
        client.call("lookup", {"tokens": tls_api.tokens})
    assert err.value.status == 0 and TOKEN not in str(err.value)
    client.close()
    ok = ControlClient(tls_api.url, TOKEN, tls=certs["admin"])  # still serving
    assert ok.status()["tiers"]
    ok.close()


def test_a_token_is_still_needed_over_mutual_tls(tls_api: Setup,
                                                 certs: dict[str, TlsFiles]) -> None:
    client = ControlClient(tls_api.url, "", tls=certs["admin"])
    with pytest.raises(ControlError) as err:
        client.status()
    assert err.value.status == 401
    client.close()


def test_off_loopback_without_tls_is_refused_unless_waived(tmp_path: Path,
                                                           certs: dict[str, TlsFiles]) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    base = {"control.port": 8700, "control.host": "0.0.0.0", "control.token_file": str(token)}
    with pytest.raises(ConfigError, match="control.host.*TLS is off.*tls.insecure"):
        load_config(env={}, engine=base)
    with pytest.raises(ConfigError, match="control.host"):
        ControlServer(None, ControlConfig(host="0.0.0.0", token=TOKEN), 0)  # type: ignore
    load_config(env={}, engine={**base, "tls.insecure": True})
    s = certs["server"]
    cfg = load_config(env={}, engine={**base, "tls.cert_file": s.cert_file,
                                      "tls.key_file": s.key_file, "tls.ca_file": s.ca_file})
    assert cfg.tls.files().mutual
    with pytest.raises(ConfigError, match="tls.key_file"):
        load_config(env={}, engine={**base, "tls.cert_file": s.cert_file})
    with pytest.raises(ConfigError, match="tls.cert_file.*not a PEM"):
        load_config(env={}, engine={**base, "tls.cert_file": s.cert_file,
                                    "tls.key_file": s.ca_file})
    with pytest.raises(ConfigError, match="tls.ca_file.*not a readable file"):
        load_config(env={}, engine={**base, "tls.ca_file": str(tmp_path / "nope.pem")})


def test_a_wildcard_bind_that_registers_needs_an_advertised_address(tmp_path: Path) -> None:
    base = {"control.port": 8700, "control.host": "0.0.0.0", "control.token": TOKEN,
            "tls.insecure": True, "controller.url": "http://127.0.0.1:8800"}
    with pytest.raises(ConfigError, match="control.advertise"):
        load_config(env={}, engine=base)
    load_config(env={}, engine={**base, "control.advertise": f"http://{HOST}:8700"})
    with pytest.raises(ConfigError, match="transfer.advertise"):
        load_config(env={}, engine={"transfer.port": 9000, "transfer.host": "::",
                                    "transfer.token": TOKEN, "tls.insecure": True,
                                    "controller.url": "http://127.0.0.1:8800"})


def test_kvtier_ctl_speaks_tls(tls_api: Setup, certs: dict[str, TlsFiles]) -> None:
    a = certs["admin"]
    base = [sys.executable, "-m", "kvtier.cli.main", "ctl", "--url", tls_api.url,
            "--token", TOKEN, "--tls-ca", a.ca_file]
    out = subprocess.run(base + ["--tls-cert", a.cert_file, "--tls-key", a.key_file,
                                 "--json", "status"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run(base + ["--tls-cert", a.cert_file, "status"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "--tls-key" in bad.stderr


def loris(url: str, n: int) -> list[socket.socket]:
    """``n`` connections that start a request and then send a header line now and then."""
    host, port = url.split("://")[1].split(":")
    out = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        out.append(s)
    return out


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Keep trickling a header line every 0.2 s; True once the server closed the socket."""
    deadline = time.monotonic() + within_s
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"X-Slow: 1\r\n")
            if sock.recv(1024) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def test_slow_loris_headers_are_cut_and_the_api_keeps_serving(tmp_path: Path) -> None:
    s = make_setup(tmp_path, token=TOKEN, request_timeout_s=1.0, max_concurrency=4)
    try:
        slow = loris(s.url, 6)  # more than max_concurrency
        assert all(closed_by_server(c, 10.0) for c in slow)
        client = ControlClient(s.url, TOKEN)
        assert client.status()["tiers"]
        client.close()
    finally:
        s.server.close()
        s.store.close()


def test_a_plain_http_controller_off_loopback_is_refused_unless_waived() -> None:
    """The controller token and the instance's credential never cross the network in
    clear by default: the instance refuses an http:// controller off loopback."""
    remote = f"http://{HOST if HOST != '127.0.0.1' else '192.0.2.7'}:8800"
    for key in ("controller.url", "peer.controller_url"):
        with pytest.raises(ConfigError, match=f"{key}.*plain http off loopback"):
            load_config(env={}, engine={key: remote})
        load_config(env={}, engine={key: remote, "tls.insecure": True})
        load_config(env={}, engine={key: remote.replace("http://", "https://")})
    load_config(env={}, engine={"controller.url": "http://127.0.0.1:8800"})
