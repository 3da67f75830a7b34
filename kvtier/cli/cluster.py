"""``kvtier controller`` and ``kvtier router``: arguments, start-up, one status line."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("kvtier.cli")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kvtier controller`` and ``kvtier router``."""
    c = subparsers.add_parser("controller", help="the cluster controller: which instance "
                              "holds which chunks (fed by kvtier's KV events), KV-aware lookups")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8800)
    c.add_argument("--token", default="", help="bearer token (prefer --token-file or "
                   "KVTIER_CONTROLLER__TOKEN)")
    c.add_argument("--token-file", default="")
    c.add_argument("--redis-url", default="", help="keep the index in Redis (replicas share it)")
    c.add_argument("--events-port", type=int, default=0, help="port of the KV events SUB socket "
                   "instances' vLLM publishes to (default: --port + 1; -1: none)")
    c.add_argument("--ttl-s", type=float, default=10.0, help="an instance that does not "
                   "heartbeat this long leaves the index")
    c.add_argument("--heartbeat-s", type=float, default=2.0, help="heartbeat period to advise")
    c.add_argument("--control-token-file", default="", help="the instances' management API "
                   "token (for snapshot resyncs; or KVTIER_CONTROL__TOKEN)")
    c.add_argument("--tokenizer", action="append", default=[], metavar="MODEL=PATH",
                   help="tokenizer folder for lookups of string prompts (repeatable)")
    c.set_defaults(func=_controller)
    from kvtier.cli import router_args

    router_args.add_parser(subparsers)


def _secret(section: str, value: str, path: str, flags: tuple[str, str]) -> str:
    from kvtier.config import ConfigError, cli_token

    try:
        return cli_token(section, value, path, flags)
    except ConfigError as e:
        sys.exit(f"kvtier controller: {e.key}: {e.problem}")


def _controller(args: argparse.Namespace) -> int:
    from kvtier.cluster.app import ControllerMetrics, serve
    from kvtier.cluster.controller import Controller
    from kvtier.cluster.events import EventFollower
    from kvtier.cluster.state import MemoryState, RedisState
    from kvtier.config import is_loopback

    token = _secret("controller", args.token, args.token_file, ("--token", "--token-file"))
    if not token and not is_loopback(args.host):
        sys.exit(f"kvtier controller: refusing to serve on {args.host} without a token "
                 "(--token-file or KVTIER_CONTROLLER__TOKEN), or bind 127.0.0.1")
    if args.ttl_s <= 0 or args.heartbeat_s <= 0 or args.heartbeat_s >= args.ttl_s:
        sys.exit("kvtier controller: need 0 < --heartbeat-s < --ttl-s")
    tokenizers = {}
    for item in args.tokenizer:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            sys.exit(f"kvtier controller: --tokenizer {item!r}: expected MODEL=PATH")
        tokenizers[name] = path
    control_token = _secret("control", "", args.control_token_file,
                            ("--control-token", "--control-token-file"))
    try:
        state = RedisState(args.redis_url, args.ttl_s) if args.redis_url \
            else MemoryState(args.ttl_s)
    except Exception as e:  # redis-py's errors: unreachable, bad URL
        sys.exit(f"kvtier controller: --redis-url: cannot reach Redis: {type(e).__name__}")
    metrics = ControllerMetrics()
    events_port = args.port + 1 if args.events_port == 0 else args.events_port
    ctl = Controller(state, args.heartbeat_s, None, control_token, tokenizers=tokenizers,
                     observe=metrics.count)
    follower = None
    if events_port > 0:
        try:
            follower = EventFollower(f"tcp://{args.host}:{events_port}", ctl.on_message)
        except OSError as e:
            sys.exit(f"kvtier controller: {e}")
        ctl.events_endpoint = follower.endpoint
    server = serve(ctl, metrics, args.host, args.port, token)
    print(f"kvtier controller on http://{args.host}:{args.port} (token "
          f"{'required' if token else 'off'}, index {'redis' if args.redis_url else 'memory'}, "
          f"KV events {ctl.events_endpoint or 'off'}, ttl {args.ttl_s:g} s)", flush=True)
    try:
        server.run()
    finally:
        if follower is not None:
            follower.close()
        ctl.close()
    return 0 if server.started else 1
