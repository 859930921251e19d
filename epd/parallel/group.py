"""The ranks of one tensor-parallel instance and the collectives they run together.

A `TensorParallelGroup` is (rank, world size) plus collectives over torch.distributed's default
process group: a worker process belongs to exactly one instance, so the default group is that
instance's group (gloo on the CPU, nccl on GPUs; the same calls either way). Which share of the
weights a rank holds depends only on (rank, world size), so a group that never `join`ed still
says how to build and load a rank's model (what the in-process sharding tests do); only its
collectives need the joined process group.

Rank 0's commands to its workers go through the group's command channel (`send_command`,
`receive_command`: a shared-memory ring, epd.parallel.channel), set up in `join`; a worker waits
there for the next command for as long as its instance is idle, and ends with `ChannelClosed`
when rank 0 is gone (or by its lifeline first, epd.parallel.lifeline). Other objects (and the
channel's own set-up) go over a second group, gloo whatever the backend (`broadcast_object`:
pickled bytes belong on the host, and an nccl broadcast would need them on the device first);
its timeout is `COMMAND_TIMEOUT`, not gloo's default half hour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import torch
from torch import distributed as dist

from epd.parallel.channel import CommandReceiver, CommandSender, open_channel
from epd.parallel.peer_all_reduce import PeerAllReduce

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
COMMAND_TIMEOUT = timedelta(days=365)  # an idle worker waits for its next command this long


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    world_size: int
    # The gloo group objects travel in (set by `join`; None: the default group).
    commands: Any = field(default=None, compare=False, repr=False)
    # Rank 0's command channel to the workers (set by `join` when there are workers).
    channel: CommandSender | CommandReceiver | None = field(default=None, compare=False, repr=False)
    # Small sums through peer memory (set by `join` between GPUs that reach each other's).
    peer: PeerAllReduce | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size}")

    @classmethod
    def join(
        cls,
        init_method: str,
        rank: int,
        world_size: int,
        backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> TensorParallelGroup:
        """Join the instance's group; returns when every rank has joined.

        `init_method`: where the ranks meet, `tcp://127.0.0.1:PORT` or `file:///path` (a file
        that does not exist yet). `backend`: None picks nccl where CUDA is available, else gloo.
        """
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a group: one instance per worker")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)
        commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
        channel = peer = None
        if world_size > 1:
            channel = open_channel(rank, world_size, partial(_broadcast_object, rank=rank, group=commands))
        if world_size > 1 and backend == "nccl":
            peer = PeerAllReduce.open(world_size, commands)
        return cls(rank, world_size, commands, channel, peer)

    def leave(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def send_command(self, command: object) -> None:
        """On rank 0: every worker's next `receive_command` returns `command` (in order)."""
        if not isinstance(self.channel, CommandSender):
            raise RuntimeError(f"rank {self.rank} of {self.world_size} has no workers to command")
        self.channel.send(command)

    def receive_command(self) -> object:
        """On a worker: rank 0's next command (waits for it; raises `ChannelClosed` when rank 0 is
        gone)."""
        if not isinstance(self.channel, CommandReceiver):
            raise RuntimeError(f"rank {self.rank} of {self.world_size} receives no commands")
        return self.channel.receive()

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`x` reduced over the ranks, in place (and returned): every rank gets the same values.
        Small sums go through peer memory (epd.parallel.peer_all_reduce), the rest through NCCL."""
        if op == "sum" and self.peer is not None and self.peer.fits(x):
            return self.peer.reduce(x)
        dist.all_reduce(x, op=_OPS[op])
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` (same shapes), concatenated along `dim` in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank, in place (the others pass a tensor of its shape)."""
        dist.broadcast(x, src=src)
        return x

    def gather(self, x: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's `x` (same shapes), in rank order, on rank `dst`; None on the others."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(x, parts, dst=dst)
        return parts

    def scatter(
        self, out: torch.Tensor, parts: list[torch.Tensor] | None = None, src: int = 0
    ) -> torch.Tensor:
        """Rank `src` gives rank r `parts[r]` (shaped like `out`), written into `out` (returned)."""
        parts = None if parts is None else [p.contiguous() for p in parts]
        dist.scatter(out, parts if self.rank == src else None, src=src)
        return out

    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        """Rank `src`'s `obj` on every rank (pickled, over `commands`: for control data such as a
        step's batch; tensors in it must be on the host)."""
        return _broadcast_object(obj, self.rank, self.commands, src)

    def gather_objects(self, obj: object, dst: int = 0) -> list[object] | None:
        """Every rank's `obj` (pickled, over `commands`), in rank order, on rank `dst`; None on the
        others. For control data (what each worker's own sends became)."""
        box = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, box, dst=dst, group=self.commands)
        return box


def _broadcast_object(obj: object, rank: int, group: Any, src: int = 0) -> object:
    box = [obj if rank == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def backend_for(device: str | torch.device) -> str:
    """The collectives' backend for ranks on `device`: nccl between GPUs, gloo on the CPU (whatever
    else the machine has: an instance on the CPU of a GPU host still talks gloo)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def is_parallel(group: TensorParallelGroup | None) -> bool:
    """Whether `group` splits anything: None and a group of one build the single-device model."""
    return group is not None and group.world_size > 1
