"""Base of the socket-based connectors (shm, tcp): a PULL socket to receive, a SendLoop thread to send.

Consumer side: one PULL socket bound to `tcp://<host>:<free port>` at creation; that endpoint is the
connector's address. The caller's thread reads it in poll_received() (never blocking: ZMQ delivers a
multipart message whole, so once its first part is there, all parts are) and may wait on it through
pollables(). Many producers may push to one consumer: ZMQ fair-queues between them, FIFO per producer.

Producer side: see sender.py. Subclasses supply encode (job -> frames), discard (undo encode for a
failed job) and receive (frames -> Received).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from typing import Any

import msgspec
import torch
import zmq

from epd.transfer.base import Connector, ConnectorClosedError, Received, SendResult, check_send_args
from epd.transfer.sender import SendJob, SendLoop
from epd.transfer.serialization import check_meta

logger = logging.getLogger(__name__)


class ZmqConnector(Connector):
    """Shared plumbing; `send_timeout_s` bounds how long a send waits for its dest to accept it."""

    def __init__(
        self, *, device: str | torch.device = "cpu", host: str = "127.0.0.1", send_timeout_s: float = 30.0
    ) -> None:
        self.device = torch.device(device)
        self._send_timeout_s = send_timeout_s
        self._pull = zmq.Context.instance().socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(f"tcp://{host}:*")  # the OS picks a free port: no collisions, no retries
        self._address = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sender: SendLoop | None = None  # started by the first send(): pure consumers need no thread
        self._sender_lock = threading.Lock()
        self._closed = False

    @property
    def address(self) -> str:
        return self._address

    # ---- producer side ----
    def send(
        self, dest: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        check_send_args(key, tensors, meta)
        self._check_tensors(tensors)
        meta = check_meta(meta)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        job = SendJob(dest, key, dict(tensors), meta, nbytes, time.time(), time.perf_counter())
        self._prepare(job)
        self._ensure_sender().submit(job)

    def poll_sent(self) -> list[SendResult]:
        if self._closed or self._sender is None:
            return []
        return self._sender.results()

    def _ensure_sender(self) -> SendLoop:
        with self._sender_lock:
            if self._closed:
                raise ConnectorClosedError(f"send on a closed {self.name} connector ({self._address})")
            if self._sender is None:
                self._sender = SendLoop(self._encode, self._discard, self._send_timeout_s, self.name)
            return self._sender

    # ---- consumer side ----
    def poll_received(self) -> list[Received]:
        out: list[Received] = []
        while not self._closed:
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                received = self._receive(frames)
                if received is not None:  # None: a backend's own control message (cuda_ipc acks)
                    out.append(received)
            # A malformed message, or a segment its producer already reclaimed, must not stop the loop.
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, OSError) as exc:
                logger.warning("%s connector %s dropped a message: %s", self.name, self._address, exc)
        return out

    def pollables(self) -> list[Any]:
        return [] if self._closed else [self._pull]

    def close(self) -> None:
        with self._sender_lock:
            if self._closed:
                return
            self._closed = True
        if self._sender is not None:
            self._sender.close()
        self._drop_unread()
        self._pull.close(linger=0)

    def _drop_unread(self) -> None:
        """Hook run at close on messages queued for us but never polled (shm unlinks their segments)."""

    # ---- backend hooks ----
    def _check_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise TypeError for tensors this backend cannot send from here; default: any tensor."""

    def _prepare(self, job: SendJob) -> None:
        """Work on the caller's thread before the job is queued (cuda_ipc: stream-ordered staging)."""

    @abstractmethod
    def _encode(self, job: SendJob) -> list[Any]:
        """Frames carrying `job` (runs on the send thread, only once the dest can take them)."""

    def _discard(self, job: SendJob) -> None:
        """Undo what _encode left behind for a job that failed or was abandoned; default: nothing."""

    @abstractmethod
    def _receive(self, frames: list[zmq.Frame]) -> Received | None:
        """The Received carried by one message's frames, or None for a message the backend consumed
        itself (runs on the caller's thread)."""
