"""Liveness by heartbeat: the router process keeps telling every instance that it is still there.

An instance's launcher need not be its parent (Ray, another host), so a parent pid says nothing
about whether anyone still needs the instance. Silence from the router does:

| side     | what                                                   | when                                 |
|----------|--------------------------------------------------------|--------------------------------------|
| router   | `HeartbeatSender`, a daemon thread, sends `Heartbeat()`| every `interval_s`, from the         |
| process  | to each instance on PUSH sockets of its own            | instance's InstanceReady to `stop()` |
| instance | notes when it last received anything on its control    | on every control message; judged     |
|          | socket; exits once that is `heartbeat_timeout_s` ago   | after draining its inbox, from its   |
|          | (epd.cluster.instance.shell)                           | InstanceReady on                     |

The thread beats whether or not anyone drives the router (an offline `LLM` idle in a script keeps
its instances), and stops with the router process: SIGKILL it and every instance exits within
about `heartbeat_timeout_s`. A timeout holds `BEATS_PER_TIMEOUT` beats, so one late beat is no death.
"""

from __future__ import annotations

import logging
import queue
import threading

import zmq

from epd.cluster.messages import Heartbeat, encode

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 30.0  # how long an instance waits for the router: InstanceConfig's default
BEATS_PER_TIMEOUT = 5
# Beats queued for an instance that stopped reading: one that arrives tells as much as a thousand.
BEATS_QUEUED = 4
STOP_WAIT_S = 5.0


def heartbeat_interval(timeout_s: float) -> float:
    """How often to beat for instances that wait `timeout_s`: at most every HEARTBEAT_INTERVAL_S,
    and at least BEATS_PER_TIMEOUT times per timeout (short timeouts, in tests)."""
    if timeout_s <= 0:
        raise ValueError(f"heartbeat timeout must be positive, not {timeout_s}")
    return min(HEARTBEAT_INTERVAL_S, timeout_s / BEATS_PER_TIMEOUT)


class HeartbeatSender:
    """A daemon thread that sends `Heartbeat()` to every added instance each `interval_s`.

    Its sockets are its own (a zmq socket belongs to one thread, so the router's are not touched;
    an instance's PULL inbox takes both connections). `add` and `stop` may come from any thread.
    """

    def __init__(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._added: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epd-heartbeat", daemon=True)
        self._thread.start()

    def add(self, instance: str, control_address: str) -> None:
        """Heartbeat `instance` at its control inbox from the next beat on."""
        self._added.put((instance, control_address))

    def stop(self) -> None:
        """Stop beating and close the thread's sockets. Idempotent."""
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=STOP_WAIT_S)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        ctx = zmq.Context()
        sockets: dict[str, zmq.Socket] = {}
        beat = encode(Heartbeat())
        try:
            while not self._stopped.is_set():
                self._connect_added(ctx, sockets)
                for instance, sock in sockets.items():
                    _send_beat(instance, sock, beat)
                self._stopped.wait(self.interval_s)
        finally:
            ctx.destroy(linger=0)  # closes the sockets: nothing queued is worth delivering now

    def _connect_added(self, ctx: zmq.Context, sockets: dict[str, zmq.Socket]) -> None:
        while True:
            try:
                instance, address = self._added.get_nowait()
            except queue.Empty:
                return
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, BEATS_QUEUED)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            old = sockets.pop(instance, None)
            if old is not None:
                old.close()  # a restarted instance: beat its new address only
            sockets[instance] = sock


def _send_beat(instance: str, sock: zmq.Socket, beat: bytes) -> None:
    try:
        sock.send(beat, zmq.NOBLOCK)
    except zmq.Again:
        # The instance's side takes no more (its zmq I/O thread reads even during a long step, so
        # it is gone or unreachable). Not ours to judge: the router asks the launcher's is_alive.
        logger.debug("heartbeat to %s not queued: earlier ones were not taken", instance)
