"""The real router and instance cores on virtual time, in one process: the harness of the tests, and
`epd simulate` (`epd bench`'s workload and results on a simulated layout).

| module            | what                                                                          |
|-------------------|-------------------------------------------------------------------------------|
| workload.py       | seeded requests: Poisson arrivals, prompts with images from a shared pool     |
| costs.py          | `LinearCosts`: how long a forward / a vision batch takes (or a fitted profile)|
|                   | `costs_at_degree`: an `@tpN` instance's (a profile's entry at N)              |
| cluster.py        | `SimCluster`: a layout's cores with scripted compute, memory connectors       |
| node.py           | `SimInstance`: one instance's shell (own clock, inbox, stamped outbox, turns) |
| gpu_share.py      | `SharedGpuClock`: an instance's clock, its GPU shared by the steps and a      |
|                   | tower encoding ahead (both slowed while they overlap: one documented speed)   |
| tower_lane.py     | `VirtualTower`: the engine's own encode-ahead, its tower on that second lane  |
| events.py         | `EventQueue` (what is due when), `EventLog` (what happened, and its digest)   |
| harness.py        | `Harness` / `simulate`: the event loop; `SimResult`                           |
| __main__.py       | `python -m epd.sim`: one run, its digest and figures as JSON                  |
| `epd simulate`:   |                                                                               |
| command.py        | its flags (`epd serve`'s engine options, `epd bench`'s workload) -> a spec    |
| simulation.py     | each rate on a fresh cluster; bench's results.json, plots and table           |
| bench_requests.py | bench's requests as the server would make them, without pixels               |
| images.py         | images known by their size: real grids, 3-byte stand-in patches              |
| bench_results.py  | what bench's client would have measured, from the harness's record           |
| runner.py         | the cost-model runner: a forward is its cost, every token the same           |
| model_shape.py    | narrow embeddings (real bytes, real cache capacity): fast on 7B shapes        |
| wire.py           | what a transfer is charged: the real model's bytes                            |

Connectors: epd.transfer.memory. Compute: epd.engine.scripted_runner (tests: tokens that check the
data path) or epd.sim.runner (`epd simulate`: only time); no weights are loaded.
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
