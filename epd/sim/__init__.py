"""The real router and instance cores on virtual time, in one process: tests now, `epd simulate` later.

| module        | what                                                                          |
|---------------|-------------------------------------------------------------------------------|
| workload.py   | seeded requests: Poisson arrivals, prompts with images from a shared pool     |
| costs.py      | `LinearCosts`: how long a forward / a vision batch takes (until fitted ones)  |
| cluster.py    | `SimCluster`: a layout's cores with scripted compute, memory connectors       |
| node.py       | `SimInstance`: one instance's shell (own clock, inbox, stamped outbox, turns) |
| events.py     | `EventQueue` (what is due when), `EventLog` (what happened, and its digest)   |
| harness.py    | `Harness` / `simulate`: the event loop; `SimResult`                           |
| __main__.py   | `python -m epd.sim`: one run, its digest and figures as JSON                  |

Connectors: epd.transfer.memory. Compute: epd.engine.scripted_runner (no weights are loaded).
"""

from epd.sim.cluster import ClusterSpec, SimCluster, engine_config, scripted_compute
from epd.sim.costs import LinearCosts
from epd.sim.harness import Harness, SimResult, simulate
from epd.sim.workload import SimRequest, Workload, make_requests

__all__ = [
    "ClusterSpec",
    "Harness",
    "LinearCosts",
    "SimCluster",
    "SimRequest",
    "SimResult",
    "Workload",
    "engine_config",
    "make_requests",
    "scripted_compute",
    "simulate",
]
