"""How control messages travel between the router and its instances: a `ControlPlane`.

| plane                  | send(instance, message)       | receive(timeout_s)                      | used by |
|------------------------|-------------------------------|-----------------------------------------|---------|
| `ZmqControlPlane`      | msgpack on a PUSH socket to   | waits up to timeout_s on the PULL inbox | Cluster |
|                        | the instance's control inbox  | for the first message (or a `wake()`    |         |
|                        | (image files as frames of     | from another thread), then drains it    |         |
|                        | their own, or their place in  |                                         |         |
|                        | shared memory: shared_files)  |                                         |         |
| `InMemoryControlPlane` | onto the instance's queue     | everything queued, never waits          | tests,  |
|                        |                               |                                         | the sim |

The router core never touches a plane: it returns (instance, message) pairs and the shell sends them.
Bulk tensors never travel here (epd.cluster.messages).
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Protocol

import zmq

from epd.cluster.messages import ToInstance, ToRouter, decode_for_router, encode_frames
from epd.cluster.shared_files import SharedFiles


class ControlPlane(Protocol):
    def send(self, instance: str, message: ToInstance) -> None:
        """Queue `message` for `instance` (never blocks on the instance reading it)."""
        ...

    def connect(self, instance: str, control_address: str, reads_shared_files: bool = False) -> None:
        """Send to `instance` at this address from now on (a restarted instance binds a new one);
        `reads_shared_files`: it maps the API process's image files (cluster.shared_files)."""
        ...

    def receive(self, timeout_s: float) -> list[ToRouter]:
        """Every message for the router that arrived, in arrival order (per sender: in send order),
        waiting up to timeout_s for the first; [] if none came."""
        ...

    def wake(self) -> None:
        """From any thread: end a `receive` that is waiting now (or the next one) at once."""
        ...

    def close(self) -> None:
        """Release what the plane holds of its own; a later `wake` does nothing."""
        ...


class ZmqControlPlane:
    """One PUSH socket per instance (to its control inbox) and the router's PULL inbox."""

    def __init__(
        self,
        context: zmq.Context,
        inbox: zmq.Socket,
        addresses: Mapping[str, str],
        shared: SharedFiles | None = None,
        readers: Iterable[str] = (),
    ) -> None:
        self.inbox, self._context = inbox, context
        self._outboxes: dict[str, zmq.Socket] = {}
        # The API process's shared image files, and the instances that map them (cluster.shared_files).
        self.shared, self._readers = shared, set(readers)
        for instance, address in addresses.items():
            self.connect(instance, address, instance in self._readers)
        # A socket pair, not a zmq socket: wake() comes from other threads, and a zmq socket
        # belongs to one thread. (Not a bare pipe either: a wake after close() must fail, not
        # write to whatever reused the descriptor number.)
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_rx.setblocking(False)
        self._wake_tx.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(inbox, zmq.POLLIN)
        self._poller.register(self._wake_rx, zmq.POLLIN)

    def send(self, instance: str, message: ToInstance) -> None:
        # An encode task's image files (megabytes) go as frames of their own, not copied into a
        # msgpack buffer nor into zmq messages: pyzmq copies small frames anyway (below its
        # copy_threshold) and keeps a large one alive until libzmq has sent it.
        shared = self.shared if instance in self._readers else None
        self._outboxes[instance].send_multipart(encode_frames(message, shared), copy=False)

    def connect(self, instance: str, control_address: str, reads_shared_files: bool = False) -> None:
        if reads_shared_files:
            self._readers.add(instance)
        else:
            self._readers.discard(instance)
        old = self._outboxes.pop(instance, None)
        if old is not None:
            old.close(linger=0)  # what is queued there was for the process that died
        push = self._context.socket(zmq.PUSH)
        push.connect(control_address)
        self._outboxes[instance] = push

    def receive(self, timeout_s: float) -> list[ToRouter]:
        ready = dict(self._poller.poll(max(0, round(timeout_s * 1000))))
        if self._wake_rx.fileno() in ready or self._wake_rx in ready:
            self._drain_wakes()
        if self.inbox not in ready:
            return []
        messages = []
        while True:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            messages.append(decode_for_router(data))

    def wake(self) -> None:
        try:
            self._wake_tx.send(b"w")
        except BlockingIOError:
            pass  # full of wakes already: the next receive returns at once anyway
        except OSError:
            pass  # closed: nobody is waiting any more

    def close(self) -> None:
        self._wake_tx.close()
        self._wake_rx.close()

    def _drain_wakes(self) -> None:
        try:
            while self._wake_rx.recv(4096):
                pass
        except BlockingIOError:
            pass


class InMemoryControlPlane:
    """Queues in this process: the instances' side is `post` (to the router) and `take_sent`."""

    def __init__(self) -> None:
        self._inbox: deque[ToRouter] = deque()
        self._sent: dict[str, deque[ToInstance]] = {}

    def send(self, instance: str, message: ToInstance) -> None:
        self._sent.setdefault(instance, deque()).append(message)

    def connect(self, instance: str, control_address: str, reads_shared_files: bool = False) -> None:
        self._sent.pop(instance, None)  # queued for the instance that died

    def receive(self, timeout_s: float = 0.0) -> list[ToRouter]:
        # Never waits: in one thread nothing can arrive meanwhile (a simulator advances its clock).
        messages = list(self._inbox)
        self._inbox.clear()
        return messages

    def wake(self) -> None:
        pass  # receive never waits

    def close(self) -> None:
        pass

    def post(self, message: ToRouter) -> None:
        """An instance sends `message` to the router."""
        self._inbox.append(message)

    def take_sent(self, instance: str) -> list[ToInstance]:
        """What the router sent `instance` since the last call, in order."""
        queue = self._sent.pop(instance, deque())
        return list(queue)
