"""``kvtier ctl``: the management API of a running instance, from the command line.

Parsing and printing only; the HTTP calls are :class:`kvtier.control.client.ControlClient`.
Tables by default, the API's JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from kvtier.control.client import ControlClient, ControlError

URL_ENV = "KVTIER_CONTROL_URL"
ADDRESSED = ("lookup", "evict", "move", "pin", "unpin", "compress", "decompress")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``ctl`` and its operations."""
    ctl = subparsers.add_parser("ctl", help="manage a running instance's cached KV",
                                description="Call the management API of a running instance "
                                "(control.port): tables by default, JSON with --json.",
                                allow_abbrev=False)  # else move's --to reads as --token
    ctl.add_argument("--url", default=os.environ.get(URL_ENV, "http://127.0.0.1:8700"),
                     help=f"the API (default ${URL_ENV} or http://127.0.0.1:8700)")
    auth = ctl.add_mutually_exclusive_group()
    auth.add_argument("--token", help="bearer token (default $KVTIER_CONTROL__TOKEN)")
    auth.add_argument("--token-file", help="a file holding the bearer token")
    ctl.add_argument("--json", action="store_true", help="print the API's JSON answer")
    ctl.add_argument("--tls-ca", default="", help="CA that signed the API's certificate "
                     "(https:// URLs; default: the system's CAs)")
    ctl.add_argument("--tls-cert", default="", help="client certificate, for an API that "
                     "requires one (mutual TLS)")
    ctl.add_argument("--tls-key", default="", help="the client certificate's key")
    sub = ctl.add_subparsers(dest="op", required=True)
    for op, text in (("status", "usage and counters of every tier"), ("health", "liveness"),
                     ("metrics", "Prometheus text")):
        sub.add_parser(op, help=text)
    helps = {"lookup": "how much of a prompt is cached, and where",
             "evict": "remove chunks (pinned ones stay)", "move": "move chunks between tiers",
             "pin": "protect memory chunks from eviction", "unpin": "release pins taken here",
             "compress": "re-encode chunks of a tier losslessly",
             "decompress": "store chunks of a tier raw again"}
    for op in ADDRESSED:
        p = sub.add_parser(op, help=helps[op])
        _address(p)
        if op == "evict":
            p.add_argument("--tier", help="one tier (default: every tier)")
        elif op == "move":
            p.add_argument("--from", dest="src", required=True)
            p.add_argument("--to", dest="dst", required=True)
        elif op == "pin":
            p.add_argument("--ttl", type=float, help="release by itself after SECONDS")
        elif op in ("compress", "decompress"):
            p.add_argument("--tier", required=True)
    clear = sub.add_parser("clear", help="delete every chunk of a tier, or of all")
    clear.add_argument("--tier")
    resume = sub.add_parser("resume", help="put a tier the canary took out of service back "
                            "(default: every such tier)")
    resume.add_argument("--tier")
    admit = sub.add_parser("admit", help="store encoded chunks of a prompt (checked first)")
    _tokens(admit, required=True)
    admit.add_argument("--chunk", action="append", required=True, metavar="INDEX=FILE",
                       help="chunk INDEX of the prompt, encoded (a disk tier .kvc file)")
    admit.add_argument("--tier", help="one tier (default: memory, then the lower tiers)")
    ctl.set_defaults(func=run)


def _tokens(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--tokens", help="token ids: 1,2,3")
    g.add_argument("--tokens-file", help="token ids: a JSON list, or numbers apart")
    p.add_argument("--salt", help="tenant salt (vLLM's cache_salt)")


def _address(p: argparse.ArgumentParser) -> None:
    _tokens(p)
    p.add_argument("--keys", nargs="+", metavar="HEX", help="chunk keys instead of tokens")


def parse_tokens(text: str) -> list[int]:
    """``"1,2 3"`` or ``"[1, 2, 3]"`` -> token ids."""
    text = text.strip()
    if text.startswith("["):
        return [int(t) for t in json.loads(text)]
    return [int(t) for t in text.replace(",", " ").split()]


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON body of ``args.op``."""
    body: dict[str, Any] = {}
    if getattr(args, "keys", None):
        body["keys"] = args.keys
    elif getattr(args, "tokens", None) or getattr(args, "tokens_file", None):
        body["tokens"] = parse_tokens(args.tokens if args.tokens is not None
                                      else Path(args.tokens_file).read_text())
        if args.salt:
            body["salt"] = args.salt
    elif args.op in ADDRESSED:
        raise SystemExit(f"kvtier ctl {args.op}: give --tokens, --tokens-file or --keys")
    if getattr(args, "tier", None):
        body["tier"] = args.tier
    if args.op == "move":
        body.update({"from": args.src, "to": args.dst})
    if args.op == "pin" and args.ttl is not None:
        body["ttl_s"] = args.ttl
    if args.op == "admit":
        body["chunks"] = [_chunk(spec) for spec in args.chunk]
    return body


def _chunk(spec: str) -> dict[str, Any]:
    index, sep, path = spec.partition("=")
    if not sep or not index.isdigit():
        raise SystemExit(f"--chunk {spec!r}: expected INDEX=FILE")
    return {"index": int(index), "data": base64.b64encode(Path(path).read_bytes()).decode()}


def run(args: argparse.Namespace) -> int:
    """Call the API; print its answer."""
    from kvtier.config import ConfigError, cli_token

    from kvtier.net.tls import TlsError, TlsFiles

    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    try:
        tls.check_flags()
    except TlsError as e:
        sys.exit(f"kvtier ctl: {e.key}: {e.problem}")
    try:
        client = ControlClient(args.url, cli_token("control", args.token, args.token_file),
                               tls=tls)
        if args.op in ("status", "health"):
            result = getattr(client, args.op)()
        elif args.op == "metrics":
            print(client.metrics(), end="")
            return 0
        else:
            result = client.call(args.op, build_request(args))
    except ControlError as err:
        print(f"kvtier ctl {args.op}: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:  # a token file that cannot be read
        print(f"kvtier ctl {args.op}: {err.key}: {err.problem}", file=sys.stderr)
        return 1
    except OSError as err:  # a tokens or chunk file that cannot be read
        print(f"kvtier ctl {args.op}: {err.strerror}: {err.filename}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else render(args.op, result))
    return 0


def render(op: str, result: dict[str, Any]) -> str:
    """A readable form of an answer."""
    if op == "status":
        return _status(result)
    if op == "lookup":
        return _lookup(result)
    return "  ".join(f"{k}: {v}" for k, v in result.items() if v is not None)


def _status(res: dict[str, Any]) -> str:
    cols = ["tier", "chunks", "used", "capacity", "hits", "misses", "evictions", "corrupt",
            "forged", "errors", "dropped", "queue"]
    rows = [[name, t["num_chunks"], _size(t["used_bytes"]), _size(t["capacity_bytes"]),
             t["hits"], t["misses"], t["evictions"], t["corrupt"], t.get("forged", 0),
             t["errors"], t["dropped"], "-" if t.get("write_queue") is None else t["write_queue"]]
            for name, t in res["tiers"].items()]
    head = (f"namespace {res['namespace']}  chunk_size {res['chunk_size']}  "
            f"pinned {res['pinned_chunks']}")
    return head + "\n" + table(cols, rows)


def _lookup(res: dict[str, Any]) -> str:
    tiers = list(res["tiers"])
    rows = [[i, key] + ["yes" if res["tiers"][t][i] else "-" for t in tiers]
            for i, key in enumerate(res["keys"])]
    hit = f"{res['hit_chunks']} of {res['chunks']} chunks stored"
    if res.get("hit_tokens") is not None:
        hit += f", {res['hit_tokens']} tokens would load"
    return hit + "\n" + table(["#", "key", *tiers], rows)


def table(cols: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to their widest cell, numbers right-aligned."""
    cells = [cols] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) and bool(rows)
               for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) if n else c.ljust(w)
                               for c, w, n in zip(r, widths, numeric)).rstrip() for r in cells)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
