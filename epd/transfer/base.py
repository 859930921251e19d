"""The connector interface: how named tensors move from a producer instance to a consumer instance.

A connector is one object per instance that plays both sides: it sends (producer side) to other
instances' addresses and receives (consumer side) at its own `address`. E -> P moves multimodal
embeddings ("mm:<hash>"), P -> D moves KV blocks ("kv:<request_id>"); the connector knows neither, it
moves dicts of tensors plus a little msgpack metadata under a key the producer picks.

Backends are looked up by name (`create_connector`), imported lazily so a GPU backend never loads on a
machine that does not use it; `create_connector` puts bounded retries of failed sends around the backend
(retry.py). Devices never appear on the wire: a consumer places what it receives
with `.to(its device)`, so cuda_ipc / nccl backends fit the same interface.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class Received:
    """One key as it arrived at the consumer."""

    key: str  # producer-chosen name, e.g. "mm:<hash>" or "kv:<request_id>"
    tensors: dict[str, torch.Tensor]  # on the consumer's device given at creation
    meta: dict[str, Any]  # small msgpack-able metadata sent along (tuples come back as lists)
    nbytes: int  # payload bytes, summed over the tensors
    sent_at: float  # producer's time.time() when send() was called (same host clocks)


@dataclass
class SendResult:
    """Completion of one send(), reported by poll_sent(); `seconds` runs from the send() call to then."""

    key: str
    dest: str
    ok: bool
    nbytes: int
    seconds: float
    error: str | None = None


class ConnectorClosedError(RuntimeError):
    """send() on a connector after close()."""


class Connector(ABC):
    """Moves named tensors from a producer instance to a consumer instance, asynchronously.

    Contract, every backend:
      1. Ordering: keys sent from one connector to one `dest` arrive in send() order (FIFO per
         (producer, dest) pair). Nothing is promised across pairs.
      2. send() never blocks on the consumer: it validates its arguments, queues the work and returns;
         the bytes move on a background thread (or not at all, for `local`). A consumer that is slow,
         stopped or gone delays or fails the send, never the caller.
      3. Buffer ownership: the caller may drop or free its tensors as soon as send() returns; the
         connector keeps a reference (or a copy) until the key's SendResult is reported. Writing INTO
         those tensors before then is not allowed: byte-moving backends read them lazily (zero-copy
         sends), and `local` hands the very same objects to the consumer.
      4. Completion: poll_sent() reports each send exactly once, as ok=True when the connector has
         finished with the caller's tensors and handed the payload to the transport (it does not mean
         the consumer has polled it), or ok=False with an error (peer unreachable for too long, disk
         full, unsupported tensor). For one dest, ok results come in send order; a failure is reported
         as soon as it happens. Transport failures are never raised in the caller; bad arguments
         (wrong types, meta that msgpack cannot encode, an address `local` cannot reach) raise at once.
      5. poll_sent() and poll_received() never block. pollables() lists what an instance loop may wait
         on (zmq.Poller) for poll_received() to have work; after it fires, poll_received() may still
         return [] (a spurious wake-up) and must be called again on the next wake-up.
      6. Threads: send() and poll_sent() may be called from any thread; the consumer side
         (poll_received, pollables) from one thread at a time.
      7. close() is idempotent and frees every OS resource the connector holds (sockets, threads,
         shared-memory files), including files this side created for a peer that crashed before
         reading them. Sends not yet completed are abandoned, unreported. Afterwards poll_sent(),
         poll_received() and pollables() return [], and send() raises ConnectorClosedError: polling a
         closed connector is a harmless question during shutdown, sending into one is a lost payload.
      8. A producer that needs its keys delivered waits for their SendResults before close(); for `shm`
         it must also outlive the consumer's read (close() reclaims segments nobody read).
    """

    name: ClassVar[str]

    @property
    @abstractmethod
    def address(self) -> str:
        """Where producers send to reach this instance (its consumer side)."""

    # ---- producer side ----
    @abstractmethod
    def send(
        self, dest: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        """Queue `tensors` under `key` for the connector at address `dest`; returns at once."""

    @abstractmethod
    def poll_sent(self) -> list[SendResult]:
        """Sends completed (or failed) since the last call, each reported once."""

    # ---- consumer side ----
    @abstractmethod
    def poll_received(self) -> list[Received]:
        """Keys that arrived since the last call, per-producer FIFO, tensors on this connector's device."""

    @abstractmethod
    def pollables(self) -> list[Any]:
        """zmq sockets or OS fds that become readable when poll_received() may have data; [] for local."""

    @abstractmethod
    def close(self) -> None:
        """Free every resource; idempotent (see the class contract, item 7)."""

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_send_args(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None) -> None:
    """Raise TypeError for arguments no backend could send: these are caller bugs, not transport failures."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of str -> torch.Tensor, got {type(tensors).__name__}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors must map str -> torch.Tensor; got {name!r}: {type(tensor).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")


DEFAULT_RETRIES = 2  # of a failed send, on the same pair (epd.transfer.retry)

# Lazy registry: name -> "module:Class". A new backend adds one line (or calls register_connector).
_BACKENDS: dict[str, str] = {
    "local": "epd.transfer.local:LocalConnector",
    "shm": "epd.transfer.shm:ShmConnector",
    "tcp": "epd.transfer.tcp:TcpConnector",
    "cuda_ipc": "epd.transfer.cuda_ipc:CudaIpcConnector",
    "nccl": "epd.transfer.nccl:NcclConnector",
    "gloo": "epd.transfer.nccl:GlooConnector",  # nccl's logic over host memory
    "auto": "epd.transfer.auto:AutoConnector",  # per pair, from the ends: one of the above
}


def register_connector(name: str, target: str) -> None:
    """Make `create_connector(name)` build `target`, given as "package.module:ClassName"."""
    _BACKENDS[name] = target


def available_connectors() -> list[str]:
    """Registered backend names, in registration order."""
    return list(_BACKENDS)


def create_connector(
    name: str,
    *,
    device: str | torch.device = "cpu",
    host: str = "127.0.0.1",
    retries: int = DEFAULT_RETRIES,
    **options: Any,
) -> Connector:
    """Build the connector registered as `name`, a failed send retried on the same pair.

    `device` is where received tensors are placed; `host` is the interface a socket-based backend binds
    and advertises in its address. `retries`: how often a failed send goes out again before its failure
    is reported (epd.transfer.retry; 0: never). `options` go to the backend's
    constructor (e.g. send_timeout_s: how long one attempt waits for its dest).
    Raises ValueError, listing the registered names, for an unknown one.
    """
    from epd.transfer.retry import RetryingConnector

    backend = create_backend(name, device=device, host=host, **options)
    return RetryingConnector(backend, retries) if retries > 0 else backend


def create_backend(
    name: str, *, device: str | torch.device = "cpu", host: str = "127.0.0.1", **options: Any
) -> Connector:
    """The backend registered as `name` alone, without retries (arguments as `create_connector`)."""
    target = _BACKENDS.get(name)
    if target is None:
        raise ValueError(f"unknown connector {name!r}; available: {', '.join(_BACKENDS)}")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(device=device, host=host, **options)
