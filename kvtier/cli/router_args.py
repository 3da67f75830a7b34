"""``kvtier router``: arguments and start-up (the router is :mod:`kvtier.cluster.router_app`)."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kvtier router``."""
    p = subparsers.add_parser("router", help="KV-aware OpenAI-compatible router in front of "
                              "vllm serve instances (asks the controller who holds the prompt)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--controller", default="", help="the controller's URL (lookups, and "
                   "instances discovered from its registrations)")
    p.add_argument("--controller-token-file", default="", help="the controller's token "
                   "(or KVTIER_CONTROLLER__TOKEN)")
    p.add_argument("--instance", action="append", default=[], metavar="URL",
                   help="a vllm serve base URL (repeatable)")
    p.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="PD mode: a prefill instance (repeatable)")
    p.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="PD mode: a decode instance (repeatable)")
    p.add_argument("--model-path", default="", help="the model folder whose tokenizer (and "
                   "chat template) tokenizes prompts as vLLM does")
    p.add_argument("--policy", default="kv", choices=["kv", "least_loaded", "round_robin"])
    p.add_argument("--alpha", type=float, default=0.5, help="load weight: each request in "
                   "flight costs alpha x the prompt's tokens of cache (see kvtier.cluster.choice)")
    p.add_argument("--lookup-timeout-s", type=float, default=0.5)
    p.add_argument("--cooldown-s", type=float, default=10.0, help="a failed instance is not "
                   "chosen for this long")
    s = p.add_argument_group("access and bounds (see kvtier.cluster.router_keys)")
    s.add_argument("--api-key-file", default="", help="API keys, one a line: KEY [TENANT] "
                   "[operator] (or one key in KVTIER_ROUTER__API_KEY); required off loopback")
    s.add_argument("--backend-api-key-file", default="", help="the key the router presents to "
                   "the instances (their vllm serve --api-key); callers' keys never go there")
    s.add_argument("--debug-headers", action="store_true", help="x-kvtier-* routing headers "
                   "for every caller, not only operators (they tell whether a prompt is cached)")
    s.add_argument("--max-body-bytes", type=int, default=16 * 1024**2)
    s.add_argument("--body-timeout-s", type=float, default=30.0, help="a request body must "
                   "arrive within this long (408)")
    s.add_argument("--request-timeout-s", type=float, default=600.0, help="bound on each "
                   "forwarded request, first byte to last (504 / an error event)")
    s.add_argument("--max-concurrency", type=int, default=1024, help="requests at once; "
                   "more get 503")
    s.add_argument("--tls-cert", default="", help="PEM certificate: serve https (and present "
                   "it to the controller and instances)")
    s.add_argument("--tls-key", default="", help="the certificate's key")
    s.add_argument("--tls-ca", default="", help="the cluster's CA: clients need a certificate "
                   "it signed (mutual TLS); https instances and controller are checked by it")
    s.add_argument("--insecure-no-tls", action="store_true", help="serve off loopback "
                   "without TLS (keys and prompts in clear)")
    p.set_defaults(func=_router)


def _router(args: argparse.Namespace) -> int:
    import logging

    from kvtier.cluster.router import Router
    from kvtier.cluster.router_keys import ENV_KEY, load_keys
    from kvtier.cluster.router_serve import RouterServing, router_server
    from kvtier.cluster.tokens import PromptTokens
    from kvtier.config import ConfigError, cli_token
    from kvtier.config.secrets import read_token_file
    from kvtier.net.tls import TlsFiles

    if bool(args.prefill) != bool(args.decode):
        sys.exit("kvtier router: PD mode needs both --prefill and --decode")
    if args.prefill and args.instance:
        sys.exit("kvtier router: give --instance or --prefill/--decode, not both")
    if not (args.instance or args.prefill or args.controller):
        sys.exit("kvtier router: give --instance URLs, --prefill/--decode, or --controller")
    for url in args.instance + args.prefill + args.decode + ([args.controller]
                                                             if args.controller else []):
        if not url.startswith(("http://", "https://")):
            sys.exit(f"kvtier router: {url!r} is not an http:// URL")
    if args.alpha < 0 or args.lookup_timeout_s <= 0 or args.cooldown_s < 0 or \
            args.request_timeout_s <= 0:
        sys.exit("kvtier router: --alpha and --cooldown-s must be >= 0, --lookup-timeout-s "
                 "and --request-timeout-s > 0")
    if args.model_path and not os.path.isdir(args.model_path):
        sys.exit(f"kvtier router: --model-path {args.model_path} is not a folder")
    try:
        token = cli_token("controller", "", args.controller_token_file,
                          ("--controller-token", "--controller-token-file"))
        backend_key = read_token_file("--backend-api-key-file", args.backend_api_key_file) \
            if args.backend_api_key_file else ""
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
        serving = RouterServing(args.host, args.port, load_keys(args.api_key_file,
                                                                os.environ.get(ENV_KEY, "")),
                                tls, args.insecure_no_tls, args.debug_headers,
                                args.max_body_bytes, args.body_timeout_s, args.max_concurrency)
        serving.check()
    except ConfigError as e:
        sys.exit(f"kvtier router: {e.key}: {e.problem}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the router logs its own line
    tokens = PromptTokens(args.model_path or None)
    tokens.load()
    router = Router(args.instance, args.controller, token, args.prefill, args.decode,
                    args.policy, args.alpha, args.lookup_timeout_s, args.cooldown_s,
                    tls=tls, backend_key=backend_key, request_timeout_s=args.request_timeout_s,
                    plain_discovered=True if args.insecure_no_tls else None)
    server = router_server(router, tokens, serving)
    pool = (f"PD: {len(args.prefill)} prefill, {len(args.decode)} decode" if router.pd
            else f"{len(args.instance)} instances")
    print(f"kvtier router on {serving.scheme}://{args.host}:{args.port}: policy "
          f"{args.policy}, {pool}{', controller ' + args.controller if args.controller else ''}"
          f", {len(serving.keys) or 'no'} API keys", flush=True)
    server.run()
    return 0
