"""Layer 2: lossy KV quantization (opt-in): K per channel, V per token, 8 or 4 bits.

Understands one chunk layout only, vLLM CPU's ``[blocks, layers, kv_heads,
block_size, 2 * head_dim]`` with K in the first ``head_dim`` of the last axis
and V in the second (see ``kvtier.engine.layout``); dtypes bfloat16, float16
and float32. Anything else is refused (:func:`check_layout`), never guessed.

Groups, as in KIVI / CacheGen: K varies most across channels (a few channels
carry large values), so each K group is one channel of one head over the
``block_size`` tokens of one block; V varies most across tokens, so each V
group is one token of one head over ``head_dim`` channels. Each group stores
its minimum (rounded down to bf16) and step (rounded up to bf16, so that
``(max - min) / step <= 2**bits - 1``); a value is ``min + code * step``.

Error bound, per value ``x`` of a group with minimum ``lo`` and maximum ``hi``::

    |decoded - x| <= 0.51 * (hi - lo + |lo| / 128) / (2**bits - 1) + |x| * eps(dtype)

(the step rounded up, the minimum's bf16 rounding, then the cast back to the
chunk's dtype: eps = 2**-8 for bf16, 2**-11 for fp16, 2**-24 for fp32).

Before entropy coding a chunk is: K minima, K steps, V minima, V steps (bf16,
each byte-shuffled), then the K codes and the V codes (uint8; with 4 bits two
codes a byte, the first in the low nibble). Its size follows from the shape
(:func:`quantized_nbytes`), which bounds the decoder.
"""

from __future__ import annotations

import math

import numpy as np

_ITEM = {"bfloat16": 2, "float16": 2, "float32": 4}
_EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
LAYOUT = "[blocks, layers, kv_heads, block_size, 2 * head_dim] (vLLM CPU)"


def check_layout(dtype: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless the lossy codec understands a chunk of this dtype and shape."""
    if dtype not in _ITEM:
        raise ValueError(f"lossy codecs take bfloat16, float16 or float32 KV, not {dtype}")
    if len(shape) != 5 or min(shape) <= 0 or shape[4] % 4:
        raise ValueError(f"lossy codecs understand chunks of shape {LAYOUT} with an even "
                         f"head_dim, not {shape}; use a lossless codec for this layout")


def error_bound(lo: np.ndarray, hi: np.ndarray, x: np.ndarray, bits: int, dtype: str
                ) -> np.ndarray:
    """The documented bound on ``|decoded - x|`` (see the module docstring)."""
    return 0.51 * (hi - lo + np.abs(lo) / 128) / (2**bits - 1) + np.abs(x) * _EPS[dtype]


def quantized_nbytes(shape: tuple[int, ...], bits: int) -> int:
    """Size of :func:`quantize`'s output for a chunk of ``shape``."""
    b, layers, h, t, d2 = shape
    d = d2 // 2
    params = 2 * 2 * b * layers * h * (d + t)  # min and step, bf16, for K and V groups
    return params + 2 * math.prod((b, layers, h, t, d)) * bits // 8


def quantize(payload: np.ndarray, dtype: str, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """A raw chunk payload (uint8) -> params and codes (uint8), see the module docstring."""
    check_layout(dtype, shape)
    x = to_f32(payload, dtype).reshape(*shape[:4], 2, shape[4] // 2)
    if not np.isfinite(x).all():
        raise ValueError("lossy codecs take finite values only (this chunk has inf or nan)")
    kq, kmin, kstep = _quantize(x[..., 0, :], 3, bits)  # K: per channel over tokens
    vq, vmin, vstep = _quantize(x[..., 1, :], 4, bits)  # V: per token over channels
    params = np.concatenate([p.reshape(-1) for p in (kmin, kstep, vmin, vstep)])
    codes = np.concatenate([kq.reshape(-1), vq.reshape(-1)])
    if bits == 4:
        codes = codes[0::2] | (codes[1::2] << 4)
    return np.concatenate([_shuffle2(params.view(np.uint8)), codes])


def dequantize(data: np.ndarray, dtype: str, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """Inverse of :func:`quantize`: the raw payload (uint8) of a chunk of ``shape``."""
    b, layers, h, t, d2 = shape
    d = d2 // 2
    nk, nv = b * layers * h * d, b * layers * h * t
    nparams = 2 * (2 * nk + 2 * nv)
    params = _unshuffle2(data[:nparams]).view(np.uint16)
    kmin, kstep, vmin, vstep = np.split(_bf16_to_f32(params), np.cumsum([nk, nk, nv]))
    codes = data[nparams:]
    if bits == 4:
        codes = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(-1)
    n = b * layers * h * t * d
    grid = (b, layers, h, t, d)
    k = _dequantize(codes[:n].reshape(grid), kmin.reshape(b, layers, h, 1, d),
                    kstep.reshape(b, layers, h, 1, d))
    v = _dequantize(codes[n:].reshape(grid), vmin.reshape(b, layers, h, t, 1),
                    vstep.reshape(b, layers, h, t, 1))
    return from_f32(np.concatenate([k, v], axis=-1), dtype)


def _quantize(x: np.ndarray, axis: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    levels = 2**bits - 1
    lo16 = _bf16_directed(x.min(axis=axis, keepdims=True), up=False)
    lo = _bf16_to_f32(lo16)
    step16 = _bf16_directed((x.max(axis=axis, keepdims=True) - lo) / levels, up=True)
    step = _bf16_to_f32(step16)
    if not (np.isfinite(lo).all() and np.isfinite(step).all()):
        raise ValueError("values too large for the lossy codec's bf16 scales")
    q = np.rint((x - lo) / np.where(step == 0, 1, step))
    return np.clip(q, 0, levels).astype(np.uint8), lo16, step16


def _dequantize(codes: np.ndarray, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * step + lo


def to_f32(payload: np.ndarray, dtype: str) -> np.ndarray:
    """A raw payload's values as float32 (flat)."""
    if dtype == "bfloat16":
        return _bf16_to_f32(payload.view(np.uint16))
    return payload.view(np.float16 if dtype == "float16" else np.float32).astype(np.float32)


def from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> a raw payload (flat uint8), rounded to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if dtype == "bfloat16":
        u = x.view(np.uint32)
        out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return out.view(np.uint8)
    return x.astype(np.float16 if dtype == "float16" else np.float32).view(np.uint8)


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _bf16_directed(x: np.ndarray, up: bool) -> np.ndarray:
    """float32 -> bf16 bits, rounded toward +inf (``up``) or -inf."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    inexact = (u & 0xFFFF) != 0
    negative = (u >> 31) == 1
    away = inexact & (negative != up)  # away from zero is up for positives, down for negatives
    return ((u >> 16) + away).astype(np.uint16)


def _shuffle2(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data.reshape(-1, 2).T).reshape(-1)


def _unshuffle2(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data.reshape(2, -1).T).reshape(-1)
