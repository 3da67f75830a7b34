"""The ``kvtier`` command: demo, bench, model, inspect."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, help) of each ``kvtier bench`` subcommand; imported lazily.
_BENCHES = ["kvtier.cli.bench_engine", "kvtier.cli.bench_tiers", "kvtier.cli.bench_serve",
            "kvtier.cli.bench_report"]
_COMMANDS = ["kvtier.cli.model_build", "kvtier.cli.demo"]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands whose module fails to import are left out)."""
    parser = argparse.ArgumentParser(prog="kvtier", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks (each runs its baseline in the same run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name in _BENCHES:
        _add(name, bench_sub)
    for name in _COMMANDS:
        _add(name, sub)
    return parser


def _add(module: str, sub: argparse._SubParsersAction) -> None:
    try:
        importlib.import_module(module).add_parser(sub)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # a real missing dependency: say so
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvtier`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
