"""Layer 6: a step's layer-wise loads in the worker connector (``layerwise: true``).

vLLM calls ``wait_for_layer_load(layer_name)`` right before each attention
layer reads paged KV (after writing the step's new K/V). The connector's
loads in ``start_load_kv`` copy the blocks the forward pass also writes, and
leave every other block to be moved here, one layer per call
(:class:`~kvtier.engine.cache_engine.LayerwiseLoad`). At the end of the step
(``wait_for_save``) the loads are released; a load with a layer vLLM never
announced had that layer's attention read blocks not yet loaded, so its
blocks are handed back as load errors (vLLM drops those requests' output of
the step and recomputes), never left as wrong KV.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from kvtier.engine.cache_engine import LayerwiseLoad

log = logging.getLogger("kvtier.vllm")


class LayerwiseLoads:
    """This step's layer-wise loads of one worker."""

    def __init__(self, layer_names: Iterable[str] = ()) -> None:
        self.index = {name: i for i, name in enumerate(layer_names)}
        self.pending: list[LayerwiseLoad] = []
        """Where ``CacheEngine.retrieve_kv(layerwise=...)`` puts this step's loads."""

    def __bool__(self) -> bool:
        return bool(self.pending)

    def wait(self, layer_name: str) -> bool:
        """Make ``layer_name`` of every pending load ready; False if kvtier does not
        know the layer (then every layer is moved now: correct, not overlapped). A
        load whose copy fails is marked failed (its blocks are recomputed): this
        runs inside vLLM's forward pass, which must not see the error."""
        layer = self.index.get(layer_name)
        for load in self.pending:
            if load.failed:
                continue
            try:
                if layer is None:
                    load.finish()
                else:
                    load.scatter(layer)
            except Exception:
                log.exception("kvtier: a layer-wise load failed; its blocks are recomputed")
                load.failed = True
        return layer is not None

    def finish(self, errors: set[int], stats: Any) -> None:
        """Release the step's loads; the blocks of any that failed or had a layer never
        made ready go into ``errors`` (reported to vLLM as load errors), counted in
        ``stats``."""
        pending, self.pending = self.pending, []
        for load in pending:
            if load.todo or load.failed:
                if not load.failed:
                    log.warning("kvtier: layers %s of a layer-wise load were not announced; "
                                "%d blocks recomputed", sorted(load.todo), len(load.block_ids))
                errors.update(load.block_ids)
                stats.add(load_failures=1)
            try:
                load.close()
            except Exception:  # the others are still released
                log.exception("kvtier: releasing a layer-wise load failed")
