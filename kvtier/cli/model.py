"""``kvtier model build``: build (or reuse) a local random-weight model, print its folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvtier.testing.models import SHAPES, build_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``model build``."""
    model = subparsers.add_parser("model", help="build local random-weight test models")
    sub = model.add_subparsers(dest="model_command", required=True)
    p = sub.add_parser("build", help="build (or reuse) a model and print its directory")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--out", type=Path, default=None, help="default: cache dir (KVTIER_MODEL_DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: print(build_model(a.shape, a.out, a.seed)))
