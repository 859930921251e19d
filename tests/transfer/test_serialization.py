"""The wire format on its own: pack -> header bytes -> unpack gives back equal tensors."""

from __future__ import annotations

import msgspec
import pytest
import torch

from epd.transfer.serialization import Header, byte_view, decoder, encode, pack, spec_of, unpack

CASES = {
    "float32": torch.randn(3, 5),
    "bfloat16": torch.randn(4, 2).to(torch.bfloat16),
    "float16": torch.randn(6).half(),
    "int64": torch.arange(-5, 5),
    "bool": torch.tensor([True, False, True]),
    "zero_dim": torch.tensor(3.25),
    "empty": torch.empty(0, 7, dtype=torch.bfloat16),
    "non_contiguous": torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2].t(),
    "conjugate_view": torch.randn(3, dtype=torch.complex64).conj(),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pack_unpack_round_trip(name: str) -> None:
    tensor = CASES[name]
    specs, buffers = pack({name: tensor})
    header = decoder(Header).decode(encode(Header("k", 1.5, {"a": [1, "b"]}, specs)))
    back = unpack(header.tensors, [bytes(b) for b in buffers])[name]  # bytes: read-only, not retained
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor.resolve_conj())
    assert back.is_contiguous()
    assert header.meta == {"a": [1, "b"]} and header.nbytes == tensor.numel() * tensor.element_size()


def test_contiguous_cpu_tensors_are_not_copied() -> None:
    tensor = torch.arange(10, dtype=torch.int32)
    view = byte_view(tensor)
    view[:4] = b"\x07\x00\x00\x00"  # writes through: the sent bytes are the caller's memory (zero-copy)
    assert tensor[0].item() == 7


def test_wrong_buffer_size_is_rejected() -> None:
    specs = (spec_of("x", torch.zeros(4)),)
    with pytest.raises(ValueError, match="expected 16 bytes"):
        unpack(specs, [b"\0" * 15])


def test_unknown_dtype_on_the_wire_is_rejected() -> None:
    spec = msgspec.structs.replace(spec_of("x", torch.zeros(1)), dtype="Tensor")  # torch.Tensor: no dtype
    with pytest.raises(ValueError, match="unknown dtype"):
        unpack((spec,), [b"\0" * 4])


def test_a_spec_whose_shape_and_size_disagree_is_rejected_before_allocating() -> None:
    spec = msgspec.structs.replace(spec_of("x", torch.zeros(4)), shape=(1 << 40,))
    with pytest.raises(ValueError, match="is not 16 bytes"):
        unpack((spec,), [b"\0" * 16])
