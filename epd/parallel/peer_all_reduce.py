"""Small all-reduces through the GPUs' peer memory: one kernel each, no NCCL.

A decode step at tp2 runs two all-reduces per layer (56 for a 28-layer model), each of a few
hundred KB at most (batch x hidden). NCCL's ring pays a fixed cost on each (its protocol's steps
and a proxy), ~1 ms of a 7B decode step in all, more than the bytes need. A one-shot all-reduce
moves them in one kernel: every rank copies its tensor into a buffer that every rank of the
group maps (torch's symmetric memory: CUDA IPC between the processes of one host), meets the
others at a barrier inside the kernel, then reads every rank's buffer and adds, in rank order, so
every rank gets the same sums. The kernel ends with a second barrier, so no rank overwrites its
buffer for the next all-reduce while a peer still reads it: one buffer is enough.

    rank r:  copy x -> buffer[r] | barrier | out = sum over ranks of buffer[k] | barrier

Tensors over `MAX_BYTES` (a prefill's activations) go through NCCL, whose bandwidth wins there;
so do dtypes the kernel does not take. It is a kernel like any other for a CUDA graph, so the
decode graphs capture it. Opt-in for now, EPD_PEER_ALL_REDUCE=1 (it has not yet run on two
GPUs: tests/gpu/test_peer_all_reduce.py and the tp2 step of BENCHMARKS.md decide the default);
off by itself where a rank cannot reach a peer's memory (no P2P between the GPUs): every rank
agrees on it before any buffer is shared, so all use it or none does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import distributed as dist

MAX_BYTES = 1 << 20  # a decode batch of 128 x 3584 bf16 fits; an 8k-token prefill does not
_DTYPES = (torch.bfloat16, torch.float32)  # what torch's one-shot kernel takes
_ALIGNMENT = 16  # the kernel's widest vector: the buffer's start is aligned to it, inputs must be
ENV_SWITCH = "EPD_PEER_ALL_REDUCE"


class PeerAllReduce:
    """Sums a small tensor over the ranks of the default process group through peer memory."""

    def __init__(self, buffer: torch.Tensor, group_name: str) -> None:
        self._buffer = buffer  # uint8, symmetric: every rank maps every rank's
        self._group_name = group_name

    @classmethod
    def open(cls, world_size: int, control: Any) -> PeerAllReduce | None:
        """Collective over the group's ranks (each on its CUDA device, nccl backend): the group's
        peer all-reduce, or None on every rank when any rank cannot have one. `control`: a gloo
        group for the agreement (its messages are host objects)."""
        device = torch.cuda.current_device()
        devices: list[int | None] = [None] * world_size
        dist.all_gather_object(devices, device, group=control)
        buffer = _allocate(device, devices)
        agreed = torch.tensor([buffer is not None], dtype=torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=control)
        if not agreed.item():
            return None
        from torch.distributed import _symmetric_memory as symm_mem

        group_name = dist.group.WORLD.group_name
        symm_mem.rendezvous(buffer, group_name)  # collective: every rank maps every buffer
        return cls(buffer, group_name)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` goes through peer memory: small, contiguous, of a dtype the kernel takes,
        and aligned as the buffer is (the kernel reads both with the same vector width)."""
        nbytes = x.numel() * x.element_size()
        return (
            x.is_cuda
            and x.dtype in _DTYPES
            and x.is_contiguous()
            and 0 < nbytes <= self._buffer.numel()
            and nbytes % 4 == 0
            and x.data_ptr() % _ALIGNMENT == 0
        )

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the ranks, in place (and returned); `fits(x)` must hold."""
        flat = x.view(-1)
        staging = self._buffer.view(x.dtype)[: flat.numel()]
        # The kernel copies `flat` into this rank's buffer, and each thread writes back only the
        # elements it copied, after the barrier: `flat` may be its output too.
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(staging, flat, "sum", self._group_name, flat)
        return x


def _allocate(device: int, devices: list[int | None]) -> torch.Tensor | None:
    """This rank's buffer, or None if it must not have one (switched off, a peer it cannot
    reach, no symmetric memory in this torch)."""
    if os.environ.get(ENV_SWITCH, "0") != "1":
        return None
    if any(d != device and not torch.cuda.can_device_access_peer(device, d) for d in devices):
        return None
    try:
        from torch.distributed import _symmetric_memory as symm_mem

        return symm_mem.empty(MAX_BYTES, dtype=torch.uint8, device=torch.device("cuda", device))
    except (ImportError, RuntimeError, AttributeError):
        return None
