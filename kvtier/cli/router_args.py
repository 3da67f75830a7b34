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
    p.set_defaults(func=_router)


def _router(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from kvtier.cluster.router import Router
    from kvtier.cluster.router_app import build_router_app
    from kvtier.cluster.tokens import PromptTokens
    from kvtier.config import ConfigError, cli_token

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
    if args.alpha < 0 or args.lookup_timeout_s <= 0 or args.cooldown_s < 0:
        sys.exit("kvtier router: --alpha and --cooldown-s must be >= 0, --lookup-timeout-s > 0")
    if args.model_path and not os.path.isdir(args.model_path):
        sys.exit(f"kvtier router: --model-path {args.model_path} is not a folder")
    try:
        token = cli_token("controller", "", args.controller_token_file,
                          ("--controller-token", "--controller-token-file"))
    except ConfigError as e:
        sys.exit(f"kvtier router: {e.key}: {e.problem}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the router logs its own line
    tokens = PromptTokens(args.model_path or None)
    tokens.load()
    router = Router(args.instance, args.controller, token, args.prefill, args.decode,
                    args.policy, args.alpha, args.lookup_timeout_s, args.cooldown_s)
    app = build_router_app(router, tokens)
    print(f"kvtier router on http://{args.host}:{args.port}: policy {args.policy}, "
          f"{'PD: ' + str(len(args.prefill)) + ' prefill, ' + str(len(args.decode)) + ' decode' if router.pd else str(len(args.instance)) + ' instances'}"
          f"{', controller ' + args.controller if args.controller else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_keep_alive=30)
    return 0
