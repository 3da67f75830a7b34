"""vLLM's own serving benchmark (``vllm bench serve``, prefix-repetition dataset)
against vLLM alone, kvtier's memory tier and vLLM's native offloading, in one run:
``kvtier bench itl`` (:mod:`kvtier.bench.itl`, where the setup is described), kept
here under its old name.

    .venv/bin/python benchmarks/prefix_repetition.py [--quick] [--json] [--matrix]
"""

from __future__ import annotations

import sys

from kvtier.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "itl", *sys.argv[1:]]))
