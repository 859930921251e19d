"""Wire format shared by the byte-moving connectors: a dict of tensors <-> (header, raw byte buffers).

Each tensor travels as its raw bytes plus a TensorSpec (name, dtype name, shape, nbytes). The bytes are
always taken through a uint8 view of a contiguous CPU copy, so dtypes numpy lacks (bfloat16, float8)
need no special case and 0-d, empty and non-contiguous tensors follow the same path. Devices never
appear on the wire: receivers allocate CPU tensors and place them with `.to(device)`. Headers are
msgspec msgpack; `meta` must be msgpack-encodable (tuples come back as lists).
"""

from __future__ import annotations

import math
import mmap
from typing import Any

import msgspec
import numpy as np
import torch


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]
    nbytes: int


class Header(msgspec.Struct, frozen=True):
    """Everything about one key except its bytes."""

    key: str
    sent_at: float
    meta: dict[str, Any]
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)


_HUGE_PAGE_MIN_BYTES = 4 << 20  # below this, huge pages save little and waste up to 2 MiB
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only

_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def encode(message: msgspec.Struct | dict[str, Any]) -> bytes:
    """msgpack bytes of a header-like struct (or of a meta dict, to check it early)."""
    return _encoder.encode(message)


def decoder(kind: type) -> msgspec.msgpack.Decoder:
    """A typed msgpack decoder; one per message type, reused (decoders are cheap to call, not to build)."""
    return msgspec.msgpack.Decoder(kind)


def check_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """`meta` as the consumer will see it (a msgpack round trip: tuples become lists), or TypeError if
    msgpack cannot encode it. Every backend applies it in send(), so a layout change changes nothing."""
    try:
        return _meta_decoder.decode(encode(meta or {}))
    except (TypeError, msgspec.MsgspecError) as exc:  # MsgspecError: e.g. a top-level key that is no str
        raise TypeError(f"meta is not msgpack-encodable with str keys: {exc}") from exc


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    nbytes = tensor.numel() * tensor.element_size()
    return TensorSpec(name, _dtype_name(tensor.dtype), tuple(tensor.shape), nbytes)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of `tensor` as a flat uint8 memoryview over a contiguous CPU tensor.

    Copies only when it must (other device, non-contiguous, conjugate/negative views); otherwise it
    shares memory, so a fresh tensor's view is writable and can be filled in place (recv_into, preadv).
    The memoryview keeps the tensor it views alive.
    """
    return memoryview(_flat_bytes(tensor).numpy())


def pack(tensors: dict[str, torch.Tensor]) -> tuple[tuple[TensorSpec, ...], list[memoryview]]:
    """(specs, buffers) for a dict of tensors; buffers[i] holds the bytes of specs[i]."""
    specs = tuple(spec_of(name, tensor) for name, tensor in tensors.items())
    return specs, [byte_view(tensor) for tensor in tensors.values()]


def allocate(spec: TensorSpec) -> torch.Tensor:
    """A fresh, contiguous CPU tensor matching `spec`, to be filled through byte_view().

    Large ones are backed by an anonymous mapping that asks for transparent huge pages: receiving a
    large tensor is dominated by first-touch page faults, not by copying (64 MB on a 2-core VM: 50 ms
    with 4 KiB pages, 15 ms with huge pages). The tensor keeps the mapping alive; freeing it unmaps.
    """
    dtype = checked_dtype(spec)
    if spec.nbytes < _HUGE_PAGE_MIN_BYTES or _MADV_HUGEPAGE is None:
        return torch.empty(spec.shape, dtype=dtype)
    mapping = mmap.mmap(-1, spec.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(_MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).reshape(spec.shape)


def checked_dtype(spec: TensorSpec) -> torch.dtype:
    """The dtype of `spec`, or ValueError when shape, dtype and nbytes disagree: a header from the wire
    is checked before any memory is reserved for it."""
    dtype = dtype_from_name(spec.dtype)
    itemsize = dtype.itemsize
    if any(dim < 0 for dim in spec.shape) or math.prod(spec.shape) * itemsize != spec.nbytes:
        raise ValueError(f"tensor {spec.name!r}: {spec.shape} of {spec.dtype} is not {spec.nbytes} bytes")
    return dtype


def unpack(
    specs: tuple[TensorSpec, ...], buffers: list[Any], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors on `device` copied out of `buffers` (any buffer-protocol objects, read-only is fine).

    The result owns its memory: the buffers may be released or reused as soon as this returns.
    """
    if len(specs) != len(buffers):
        raise ValueError(f"{len(specs)} tensor specs but {len(buffers)} buffers")
    out = {}
    for spec, buffer in zip(specs, buffers):
        source = np.frombuffer(buffer, dtype=np.uint8)
        if source.nbytes != spec.nbytes:
            raise ValueError(f"tensor {spec.name!r}: expected {spec.nbytes} bytes, got {source.nbytes}")
        tensor = allocate(spec)
        np.copyto(_flat_bytes(tensor).numpy(), source)
        out[spec.name] = tensor.to(device)
    return out


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Flat uint8 CPU tensor over the bytes of `tensor` (a view when it is already contiguous on CPU)."""
    if tensor.layout != torch.strided:
        raise TypeError(f"only dense (strided) tensors can be sent, not {tensor.layout}")
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} on the wire")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
