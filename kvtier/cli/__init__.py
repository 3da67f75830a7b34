"""Layer 9: the ``kvtier`` command line: argument parsing and printing only.

Each subcommand is a few lines that call into :mod:`kvtier.bench` and
:mod:`kvtier.testing`; heavy imports (torch, vLLM) happen when a subcommand runs,
so ``kvtier --help`` is fast and needs no optional extra.
"""
