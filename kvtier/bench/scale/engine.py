"""vLLM's own scheduler, with a connector and no model, for the scheduler-overhead part.

vLLM's ``Scheduler`` is built from a real ``VllmConfig`` (the local tiny model's config;
no weights are loaded, no forward pass runs) and creates the connector itself, as in
``vllm serve``. Each step it schedules, and the "model" answers with one token for every
request whose prompt is done (none for a prefill still in chunks), like a model runner.
The workers' side is echoed, as it would report once done: every load and save the
step's metadata asked for completed (kvtier: the saved chunks stored in memory; native:
its jobs finished), and the finished requests whose blocks were held, sent. Every call
vLLM makes into the connector is timed.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kvtier.testing.models import build_model

KVTIER = {"kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": {"memory": {"max_bytes": "64MiB"}}}
NATIVE = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"spec_name": "CPUCopyOffloadingSpec",
                                        "spec_module_path": "kvtier.bench.peers.vllm_native_cpu",
                                        "cpu_bytes_to_use": 64 << 20}}


def vllm_config(connector: dict[str, Any], block_size: int, max_len: int, max_seqs: int) -> Any:
    """A VllmConfig for the tiny model with ``connector`` (its scheduler side only runs)."""
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # no position runs anyway
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the result
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(build_model("tiny")), skip_tokenizer_init=True,
                      max_model_len=max_len, block_size=block_size, max_num_seqs=max_seqs,
                      max_num_batched_tokens=8192, enable_prefix_caching=True,
                      prefix_caching_hash_algo="xxhash",
                      kv_transfer_config=KVTransferConfig(**connector))
    return args.create_engine_config()


class TimedScheduler:
    """vLLM's scheduler over ``num_blocks`` KV blocks, its connector's calls timed."""

    def __init__(self, vc: Any, num_blocks: int) -> None:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,
                                                KVCacheGroupSpec)
        from vllm.v1.structured_output import StructuredOutputManager

        mc, pc, bs = vc.model_config, vc.parallel_config, vc.cache_config.block_size
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=mc.get_num_kv_heads(pc),
                                 head_size=mc.get_head_size(), dtype=mc.dtype)
        layers = [f"model.layers.{i}.self_attn.attn" for i in range(mc.get_num_layers(pc))]
        kcc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
        vc.cache_config.num_gpu_blocks = num_blocks
        hash_fn = get_hash_fn_by_name(vc.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.block_hasher = get_request_block_hasher(bs, hash_fn)
        self.sched = Scheduler(vc, kcc, StructuredOutputManager(vc), block_size=bs)
        self.connector = self.sched.connector
        self.connector_s = 0.0  # seconds spent in the connector's methods so far
        self._depth = 0  # a connector method calling another is timed once
        self._mark = 0.0  # connector_s at the end of the last step
        for name in dir(KVConnectorBase_V1):
            if not name.startswith("_") and callable(getattr(self.connector, name, None)):
                setattr(self.connector, name, self._timed(getattr(self.connector, name)))

    def _timed(self, fn: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            self._depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.connector_s += time.perf_counter() - t
        return call

    def add(self, req_id: str, prompt: list[int]) -> None:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
        self.sched.add_request(Request(req_id, prompt, params, None,
                                       block_hasher=self.block_hasher))

    def finish(self, req_id: str) -> None:
        from vllm.v1.request import RequestStatus

        self.sched.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)

    def step(self) -> tuple[float, float, bool]:
        """One engine step: (connector seconds since the last step, with the calls that
        adding and finishing requests made; vLLM scheduler seconds of the step in all;
        whether a prefill is still in progress)."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        t = time.perf_counter()
        out = self.sched.schedule()
        reqs = self.sched.requests
        ids = list(out.num_scheduled_tokens)
        prefilling = False
        sampled = []
        for r in ids:
            req = reqs[r]
            done = req.num_computed_tokens + out.num_scheduled_tokens[r] >= req.num_prompt_tokens
            prefilling |= not done
            sampled.append([7] if done else [])
        finished = {r for r, req in reqs.items() if req.is_finished()}  # blocks held
        result = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                   sampled_token_ids=sampled,
                                   kv_connector_output=KVConnectorOutput(
                                       finished_sending=finished or None,
                                       kv_connector_worker_meta=_worker_report(
                                           out.kv_connector_metadata)))
        self.sched.update_from_output(out, result)
        spent, self._mark = self.connector_s - self._mark, self.connector_s
        return spent, time.perf_counter() - t, prefilling

    def close(self) -> None:
        self.connector.shutdown()


def _worker_report(meta: Any) -> Any:
    """What the workers report after running ``meta`` with every transfer done."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
        OffloadingWorkerMetadata)

    from kvtier.connectors.vllm.meta import KvtierMetadata, KvtierWorkerMeta

    if isinstance(meta, KvtierMetadata):
        return KvtierWorkerMeta(stored=[k for save in meta.saves
                                        for k in save.keys[0][save.start_chunk:]],
                                epoch=meta.epoch)
    if hasattr(meta, "store_jobs"):
        return OffloadingWorkerMetadata(completed_jobs={job: 1 for job in
                                                        [*meta.store_jobs, *meta.load_jobs]})
    return None
