"""What goes into an instance's key namespace, computed from vLLM's own engine config
(the tiny model; no engine started): the page format vLLM-CPU's attention kernel
writes, the model's config and overrides, random weights, the codec class and the
instance salt. Each must separate keys; nothing else may."""

from __future__ import annotations

import dataclasses

import pytest

from kvtier.testing.vllm_cpu import key_namespace
from tests.vllm_run import model  # noqa: F401

pytestmark = pytest.mark.vllm


def test_the_page_format_is_the_attention_isa_vllm_picks(model: str) -> None:
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    ns = key_namespace(model)
    assert ns.page_format == "cpu_attn:" + _get_attn_isa(torch.bfloat16, 128, 64, "auto")
    assert ns.page_format.split(":")[1] in {"amx", "vec", "vec16", "neon", "vxe", "vsx", "rvv"}
    # vec16 is vLLM's choice for blocks that are not a multiple of 32 tokens: another format.
    assert key_namespace(model, block_size=16).page_format == "cpu_attn:vec16"


def test_codec_class_separates_lossy_instances_only(model: str) -> None:
    raw, zstd = key_namespace(model), key_namespace(model, {"disk.codec": "zstd"})
    q8 = key_namespace(model, {"disk.codec": "q8"})
    both = key_namespace(model, {"disk.codec": "q8", "redis.codec": "q4"})
    assert raw == zstd and raw.codec_class == "lossless"  # lossless codecs share keys
    assert (q8.codec_class, both.codec_class) == ("q8", "q4+q8")
    assert len({raw.seed(), q8.seed(), both.seed()}) == 3


def test_model_identity_covers_config_overrides_and_dummy_weights(model: str) -> None:
    base = key_namespace(model)
    rope = key_namespace(model, hf_overrides={"rope_theta": 1234.0})
    dummy = key_namespace(model, load_format="dummy")
    named = key_namespace(model, {"model_id": "stable-name"})
    assert "|config=" in base.model_id and base.model_id != rope.model_id
    assert "|weights=dummy" in dummy.model_id and "|weights=dummy" not in base.model_id
    # model_id renames the model; what changes its KV is kept with it.
    assert named.model_id.startswith("stable-name|config=")
    assert named.model_id.split("|", 1)[1] == base.model_id.split("|", 1)[1]
    assert len({base.seed(), rope.seed(), dummy.seed(), named.seed()}) == 4


def test_instance_salt_and_request_salt_combine(model: str) -> None:
    a = key_namespace(model, {"salt": "deployment-a"}).with_salt("tenant")
    b = key_namespace(model, {"salt": "deployment-b"}).with_salt("tenant")
    assert a.seed() != b.seed() and dataclasses.replace(a, salt="deployment-b") == b
