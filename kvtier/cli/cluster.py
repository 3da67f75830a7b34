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
    c.add_argument("--events-host", default="127.0.0.1", help="address of the KV events socket "
                   "(vLLM's publisher has no authentication: anything but loopback needs "
                   "--insecure-no-tls; instances on other hosts set controller.relay_events)")
    c.add_argument("--ttl-s", type=float, default=10.0, help="an instance that does not "
                   "heartbeat this long leaves the index")
    c.add_argument("--heartbeat-s", type=float, default=2.0, help="heartbeat period to advise")
    c.add_argument("--control-token-file", default="", help=argparse.SUPPRESS)
    c.add_argument("--resync-interval-s", type=float, default=5.0, help="ask an instance for "
                   "its snapshot at most this often (wants in between are coalesced)")
    c.add_argument("--registered-tokenizers", action="store_true", help="also load the "
                   "tokenizer path an instance registers (any token holder could name a path "
                   "on this machine; off by default)")
    c.add_argument("--tls-cert", default="", help="PEM certificate: serve https only")
    c.add_argument("--tls-key", default="", help="the certificate's private key (PEM)")
    c.add_argument("--tls-ca", default="", help="the cluster's CA (PEM): clients must present "
                   "a certificate signed by it (mutual TLS)")
    c.add_argument("--insecure-no-tls", action="store_true", help="serve off loopback without "
                   "TLS (tokens, credentials and KV events cross the network in clear)")
    c.add_argument("--request-timeout-s", type=float, default=30.0, help="a request's headers "
                   "and body must arrive within this (slow clients are cut)")
    c.add_argument("--max-concurrency", type=int, default=256, help="connections at once; "
                   "more are answered 503")
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
    from kvtier.config import ConfigError, is_loopback, require_tls
    from kvtier.net.tls import TlsError, TlsFiles

    if args.control_token_file:
        sys.exit("kvtier controller: --control-token-file: no longer used: the controller never "
                 "sends the management token anywhere (instances push their snapshots to "
                 "POST /v1/snapshot with their own credential); remove the flag")
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    if args.tls_ca and not args.tls_cert:
        sys.exit("kvtier controller: --tls-ca: mutual TLS needs the controller's own "
                 "--tls-cert and --tls-key too")
    try:
        tls.check_flags()
        require_tls("--host", args.host, tls, args.insecure_no_tls, waiver="--insecure-no-tls")
    except TlsError as e:
        sys.exit(f"kvtier controller: {e.key}: {e.problem}")
    except ConfigError as e:
        sys.exit(f"kvtier controller: {e.key}: {e.problem}")
    if args.events_port >= 0 and not is_loopback(args.events_host) and not args.insecure_no_tls:
        sys.exit(f"kvtier controller: --events-host: {args.events_host} is reachable from other "
                 "machines and vLLM's KV events publisher has no authentication (anyone "
                 "reaching it could write any instance's index): bind 127.0.0.1 and have "
                 "instances on other hosts relay their events (controller.relay_events), or "
                 "accept that with --insecure-no-tls")
    token = _secret("controller", args.token, args.token_file, ("--token", "--token-file"))
    if not token and not is_loopback(args.host):
        sys.exit(f"kvtier controller: refusing to serve on {args.host} without a token "
                 "(--token-file or KVTIER_CONTROLLER__TOKEN), or bind 127.0.0.1")
    if args.request_timeout_s <= 0 or args.max_concurrency < 1:
        sys.exit("kvtier controller: need --request-timeout-s > 0 and --max-concurrency >= 1")
    if args.ttl_s <= 0 or args.heartbeat_s <= 0 or args.heartbeat_s >= args.ttl_s:
        sys.exit("kvtier controller: need 0 < --heartbeat-s < --ttl-s")
    if args.resync_interval_s <= 0:
        sys.exit("kvtier controller: --resync-interval-s: must be > 0")
    tokenizers = {}
    for item in args.tokenizer:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            sys.exit(f"kvtier controller: --tokenizer {item!r}: expected MODEL=PATH")
        tokenizers[name] = path
    try:
        state = RedisState(args.redis_url, args.ttl_s) if args.redis_url \
            else MemoryState(args.ttl_s)
    except Exception as e:  # redis-py's errors: unreachable, bad URL
        sys.exit(f"kvtier controller: --redis-url: cannot reach Redis: {type(e).__name__}")
    metrics = ControllerMetrics()
    events_port = args.port + 1 if args.events_port == 0 else args.events_port
    ctl = Controller(state, args.heartbeat_s, None, tokenizers=tokenizers, observe=metrics.count,
                     resync_interval_s=args.resync_interval_s,
                     registered_tokenizers=args.registered_tokenizers)
    follower = None
    if events_port > 0:
        host = f"[{args.events_host}]" if ":" in args.events_host else args.events_host
        try:
            follower = EventFollower(f"tcp://{host}:{events_port}", ctl.on_message)
        except OSError as e:
            sys.exit(f"kvtier controller: {e}")
        ctl.events_endpoint = follower.endpoint
    server = serve(ctl, metrics, args.host, args.port, token, tls=tls,
                   timeout_s=args.request_timeout_s, max_concurrency=args.max_concurrency)
    scheme = "https" if tls.serving else "http"
    print(f"kvtier controller on {scheme}://{args.host}:{args.port} ("
          f"{'mutual TLS, ' if tls.mutual else ''}token "
          f"{'required' if token else 'off'}, index {'redis' if args.redis_url else 'memory'}, "
          f"KV events {ctl.events_endpoint or 'off'}, ttl {args.ttl_s:g} s)", flush=True)
    try:
        server.run()
    finally:
        if follower is not None:
            follower.close()
        ctl.close()
    return 0 if server.started else 1
