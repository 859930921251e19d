"""`transfer="auto"` across hosts: each producer/consumer pair gets the backend that fits it.

| the two ends                     | same host  | different hosts |
|----------------------------------|------------|-----------------|
| both on CUDA devices             | cuda_ipc   | nccl            |
| otherwise (one or both on a CPU) | shm        | tcp             |

The choice is a function of the two addresses, so it is the same for every send of a pair (FIFO per
pair holds: one pair, one backend) and known as soon as the consumer's address is (at start-up,
through the control plane). An auto connector holds the consumer side of every backend a peer may
pick (their producer sides start at their first send) and advertises them all in one address:

    auto|<host id>|<cuda or cpu>|cuda_ipc=tcp://...|nccl=nccl://...|shm=tcp://...|tcp=tcp://...

The host id is the hostname and the kernel's boot id: two containers of one machine with their own
hostnames count as two hosts (they may not share CUDA IPC or /dev/shm), which costs speed, never
correctness.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import torch

from epd.transfer.base import Connector, Received, SendResult, check_send_args, create_backend

_GPU_BACKENDS = ("cuda_ipc", "nccl", "shm", "tcp")
_CPU_BACKENDS = ("shm", "tcp")


@dataclasses.dataclass(frozen=True)
class End:
    """One end of a pair, as its address describes it."""

    host_id: str
    on_gpu: bool
    addresses: dict[str, str]  # backend name -> that backend's consumer address


def this_host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:  # not Linux: the hostname alone
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def choose(producer: End, consumer: End) -> str:
    """The backend for sends from `producer` to `consumer` (the table in the module docstring)."""
    both_gpu = producer.on_gpu and consumer.on_gpu
    if producer.host_id == consumer.host_id:
        return "cuda_ipc" if both_gpu else "shm"
    return "nccl" if both_gpu else "tcp"


def format_address(end: End) -> str:
    parts = [f"{name}={address}" for name, address in end.addresses.items()]
    return "|".join(["auto", end.host_id, "cuda" if end.on_gpu else "cpu", *parts])


def parse_address(address: str) -> End:
    """An auto connector's address taken apart; ValueError for anything else."""
    parts = address.split("|") if isinstance(address, str) else []
    if len(parts) < 4 or parts[0] != "auto" or parts[2] not in ("cuda", "cpu"):
        raise ValueError(f"not an auto connector address: {address!r}")
    addresses = dict(part.split("=", 1) for part in parts[3:])
    return End(parts[1], parts[2] == "cuda", addresses)


class AutoConnector(Connector):
    """The backends a pair may need, behind one address; options go to each backend (send_timeout_s),
    `host_id` overrides this host's identity (tests: two 'hosts' in one process)."""

    name = "auto"

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        host: str = "127.0.0.1",
        host_id: str | None = None,
        **options: Any,
    ) -> None:
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self._backends: dict[str, Connector] = {}
        try:
            for name in _GPU_BACKENDS if on_gpu else _CPU_BACKENDS:
                self._backends[name] = create_backend(name, device=device, host=host, **options)
        except BaseException:
            self.close()
            raise
        addresses = {name: backend.address for name, backend in self._backends.items()}
        self.end = End(host_id or this_host_id(), on_gpu, addresses)
        self._address = format_address(self.end)
        self._dest_of: dict[tuple[str, str], str] = {}  # (backend, its dest address) -> auto address

    @property
    def address(self) -> str:
        return self._address

    def backend_for(self, dest: str) -> str:
        """Which backend sends to `dest` (ValueError if `dest` is no auto connector's address)."""
        return choose(self.end, parse_address(dest))

    def send(
        self, dest: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        check_send_args(key, tensors, meta)
        peer = parse_address(dest)
        name = choose(self.end, peer)
        if name not in peer.addresses:
            raise ValueError(f"{dest!r} has no {name} endpoint, which this pair needs")
        self._dest_of[(name, peer.addresses[name])] = dest
        self._backends[name].send(peer.addresses[name], key, tensors, meta)

    def poll_sent(self) -> list[SendResult]:
        out = []
        for name, backend in self._backends.items():
            for result in backend.poll_sent():  # reported under the address the caller sent to
                dest = self._dest_of.get((name, result.dest), result.dest)
                out.append(dataclasses.replace(result, dest=dest))
        return out

    def poll_received(self) -> list[Received]:
        return [item for backend in self._backends.values() for item in backend.poll_received()]

    def pollables(self) -> list[Any]:
        return [p for backend in self._backends.values() for p in backend.pollables()]

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
