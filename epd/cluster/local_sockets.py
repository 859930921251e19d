"""Where the router and an instance on one host talk: a Unix-domain socket (ZMQ `ipc://`), not TCP
on loopback.

Why: an encode task carries its image files (megabytes each) router -> E on these sockets, and
every token comes back on them. On the H200 host (16 cores; BENCHMARKS.md, `epd.bench.zmq_frames`)
a 3.7 MB frame costs its sender 0.45-0.47 ms of CPU on ipc against 0.66-0.68 on loopback TCP, its
receiver about the same (0.46-0.47 against 0.45-0.54), and arrives in 0.46-0.48 ms against
0.72-0.81. (On the 2-core development VM the two are alike, ipc's sender at times slower.)

How an instance knows it shares the router's host: the router makes a private directory
(`SocketDir`) and names it in every `InstanceConfig`. An instance that sees that directory runs
where the router runs, on the same filesystem (the name is random: another host or another
container's /tmp has no such directory), and binds its inbox and reaches the router's there;
one that does not (a Ray worker on another node) uses TCP, as before.

| end       | the directory is visible       | it is not          |
|-----------|--------------------------------|--------------------|
| router    | binds its inbox on both        | (it made it)       |
| instance  | binds ipc, connects to the     | binds TCP, connects|
|           | router's ipc inbox             | to the router's TCP|

The cluster removes its directory when it stops. A router process killed (SIGKILL) cannot: the
next `SocketDir` made on the host removes the directories whose owner (a pid and its start time,
written in each) no longer runs.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import zmq

from epd.proc_stat import STARTTIME, stat_fields

# sockaddr_un's sun_path holds 108 bytes with its NUL: a longer path cannot be bound.
MAX_SOCKET_PATH = 107
ROUTER_SOCKET = "router"
PREFIX = "epd-sockets-"
OWNER = "owner"  # "<pid> <its start time>": who made the directory


class SocketDir:
    """A private directory for one cluster's Unix sockets; `remove` (idempotent) deletes it."""

    def __init__(self, parent: str | None = None) -> None:
        parent = parent or tempfile.gettempdir()
        remove_abandoned(parent)
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)  # mode 0700: this user's only
        Path(self.path, OWNER).write_text(_owner_of(os.getpid()) or "")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_abandoned(parent: str) -> list[str]:
    """Remove this user's socket directories in `parent` whose owner no longer runs (a router
    killed before it could remove its own); the paths removed. One without an owner file is
    left: it may be a router's that has not written it yet."""
    removed = []
    for path in glob.glob(os.path.join(parent, PREFIX + "*")):
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            owner = Path(path, OWNER).read_text()
        except OSError:
            continue
        pid = owner.split()[0] if owner.split() else ""
        if pid.isdigit() and _owner_of(int(pid)) != owner:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _owner_of(pid: int) -> str | None:
    """ "<pid> <start time>" of a running process (the start time tells a reused pid apart);
    None if none runs under that pid."""
    try:
        return f"{pid} {stat_fields(f'/proc/{pid}/stat')[STARTTIME]}"
    except OSError:
        return None


def local_address(socket_dir: str | None, name: str) -> str | None:
    """A fresh `ipc://` address in `socket_dir` for `name`, or None where this process does not see
    the directory (another host) or the path would be too long to bind."""
    if socket_dir is None or not os.path.isdir(socket_dir):
        return None
    # A restarted instance binds anew while its predecessor's file may linger: a name of its own.
    path = os.path.join(socket_dir, f"{name}-{uuid.uuid4().hex[:8]}")
    return f"ipc://{path}" if len(path) <= MAX_SOCKET_PATH else None


def bind_inbox(sock: zmq.Socket, host: str, socket_dir: str | None, name: str) -> str:
    """Bind `sock` where its peers on this host reach it fastest; the address they connect to."""
    address = local_address(socket_dir, name)
    if address is not None:
        sock.bind(address)
        return address
    port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"


def router_inbox_path(socket_dir: str) -> str:
    """The router's inbox in its own socket directory (fixed: instances derive it from the dir)."""
    return os.path.join(socket_dir, ROUTER_SOCKET)


def bind_router_locally(inbox: zmq.Socket, socket_dir: str) -> None:
    """Bind the router's inbox in its socket directory too (it stays bound on TCP for instances on
    other hosts); skipped where the path would be too long to bind (instances then use TCP)."""
    path = router_inbox_path(socket_dir)
    if len(path) <= MAX_SOCKET_PATH:
        inbox.bind(f"ipc://{path}")


def reach_router(socket_dir: str | None, tcp_address: str) -> str:
    """The address an instance sends to the router on: its Unix socket if this process sees it."""
    if socket_dir is not None:
        path = router_inbox_path(socket_dir)
        if os.path.exists(path):
            return f"ipc://{path}"
    return tcp_address
