"""The router: owns every request's lifecycle across instances, in the front process.

| module             | what it holds                                                                |
|--------------------|------------------------------------------------------------------------------|
| `core.py`          | `RouterCore`: the pure state machine (messages in, messages out, no sockets) |
| `lifecycle.py`     | one `Stage` per request, the table of stages and transitions                 |
| `placement.py`     | which instance takes each part of a request (policies)                       |
| `ledger.py`        | the work each instance holds (reservations), which loads and failures read   |
| `held_embeddings.py` | which images each P holds or is about to get: what need not be encoded  |
| `recovery.py`      | what happens to a request when an instance dies or a transfer gives up       |
| `role_switch.py`   | moving an instance between P and D: drain, reconfigure, rejoin (timed)       |
| `control_plane.py` | how messages travel: `ZmqControlPlane` (production), `InMemoryControlPlane`  |
| `shell.py`         | `Router` = core + control plane: what `Cluster` and the entrypoints drive    |
"""

from epd.cluster.router.control_plane import ControlPlane, InMemoryControlPlane, ZmqControlPlane
from epd.cluster.router.core import InstanceHandle, Outgoing, RouterCore
from epd.cluster.router.lifecycle import IllegalTransition, RequestRecord, Stage
from epd.cluster.router.shell import Router

__all__ = [
    "ControlPlane",
    "IllegalTransition",
    "InMemoryControlPlane",
    "InstanceHandle",
    "Outgoing",
    "RequestRecord",
    "Router",
    "RouterCore",
    "Stage",
    "ZmqControlPlane",
]
