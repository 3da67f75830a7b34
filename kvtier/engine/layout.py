"""Layer 5: how an engine lays out its paged KV, and how kvtier lays out a chunk.

An engine keeps one KV tensor per layer, cut into fixed-size blocks along a
*block dimension*. Removing that dimension leaves the *page shape*: what one
block of one layer holds. kvtier stores a chunk as one contiguous tensor of
shape ``[blocks_per_chunk, num_layers, *page_shape]``: block-major, so for a
fixed layer the pages of consecutive chunks sit at one uniform stride and a
whole request moves with one indexed copy per layer.

Chunks keep the engine's page layout (no transposes on the hot path), so the
layout kind and block size are part of the key namespace: two engines with
different layouts never share chunks.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kvtier.errors import LayoutMismatch

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.uint8: "uint8", torch.int8: "int8", torch.float64: "float64"}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _name
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Stable name of a torch dtype (``"bfloat16"``)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    return _DTYPES_BY_NAME[name]


class LayoutKind(str, enum.Enum):
    """Paged KV layouts kvtier can move."""

    VLLM_CPU = "vllm_cpu"
    """vLLM CPU backend: ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` (K then V)."""
    FLASH_ATTN = "flash_attn"
    """vLLM GPU flash-attention: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""


@dataclass(frozen=True)
class PagedLayout:
    """The shape of an engine's per-layer paged KV tensors."""

    kind: LayoutKind
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def block_dim(self) -> int:
        """The dimension of a layer tensor that indexes blocks."""
        return 1 if self.kind is LayoutKind.FLASH_ATTN else 0

    @property
    def page_shape(self) -> tuple[int, ...]:
        """One block of one layer: the layer tensor's shape without the block dimension."""
        h, b, d = self.num_kv_heads, self.block_size, self.head_dim
        if self.kind is LayoutKind.FLASH_ATTN:
            return (2, b, h, d)
        return (h, b, 2 * d)

    def layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's tensor holding ``num_blocks`` blocks."""
        page = list(self.page_shape)
        page.insert(self.block_dim, num_blocks)
        return tuple(page)

    @property
    def itemsize(self) -> int:
        """Bytes per KV element."""
        return torch.empty(0, dtype=torch_dtype(self.dtype)).element_size()

    @property
    def page_nbytes(self) -> int:
        """Bytes of one block of one layer."""
        return math.prod(self.page_shape) * self.itemsize

    def chunk_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of a stored chunk spanning ``num_blocks`` blocks."""
        return (num_blocks, self.num_layers, *self.page_shape)

    def chunk_nbytes(self, num_blocks: int) -> int:
        """Bytes of a stored chunk spanning ``num_blocks`` blocks."""
        return num_blocks * self.num_layers * self.page_nbytes

    def signature(self) -> str:
        """Namespace string: two layouts share chunks only if their signatures match."""
        return (f"{self.kind.value}:L{self.num_layers}:H{self.num_kv_heads}:D{self.head_dim}"
                f":B{self.block_size}:{self.dtype}")

    def check(self, kv_caches: Sequence[torch.Tensor]) -> int:
        """Raise LayoutMismatch unless the tensors fit this layout; return num_blocks."""
        if len(kv_caches) != self.num_layers:
            raise LayoutMismatch(f"expected {self.num_layers} layer tensors, "
                                 f"got {len(kv_caches)}")
        first = kv_caches[0]
        num_blocks = first.shape[self.block_dim] if first.dim() > self.block_dim else -1
        want = self.layer_shape(num_blocks)
        for i, t in enumerate(kv_caches):
            if tuple(t.shape) != want or dtype_name(t.dtype) != self.dtype:
                raise LayoutMismatch(f"layer {i}: KV tensor {tuple(t.shape)} {t.dtype} does "
                                     f"not match {self.kind.value} layout {want} {self.dtype}")
            if not t.is_contiguous():
                raise LayoutMismatch(f"layer {i}: KV tensor is not contiguous")
        return num_blocks


def detect_layout(kv_caches: Sequence[torch.Tensor], num_kv_heads: int, head_dim: int,
                  block_size: int) -> PagedLayout:
    """Recognise the layout of an engine's KV tensors from their shape."""
    if not kv_caches:
        raise LayoutMismatch("no KV tensors to detect a layout from")
    t = kv_caches[0]
    dtype = dtype_name(t.dtype)
    for kind in LayoutKind:
        layout = PagedLayout(kind, len(kv_caches), num_kv_heads, head_dim, block_size, dtype)
        nb = t.shape[layout.block_dim] if t.dim() > layout.block_dim else -1
        if tuple(t.shape) == layout.layer_shape(nb):
            layout.check(kv_caches)
            return layout
    raise LayoutMismatch(f"unrecognised KV layout {tuple(t.shape)} for {num_kv_heads} KV heads, "
                         f"head dim {head_dim}, block size {block_size}")
