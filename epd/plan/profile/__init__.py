"""`epd profile`: what each stage costs on a device, measured with the real model, fitted, saved.

| module               | what                                                                 |
|----------------------|----------------------------------------------------------------------|
| grids.py             | the shapes timed per stage (CUDA and CPU defaults, --quick)          |
| measure.py           | steps of the real runner and vision batches of the real tower, timed |
| measure_parallel.py  | steps of a tensor-parallel instance (`--tp 1,2`): its ranks spawned  |
| measure_transfer.py  | connectors between two devices, timed by payload size                |
| features.py          | each stage's cost terms (what the cost is linear in)                 |
| fit.py               | non-negative least squares on relative error; the fit's error        |
| store.py             | `Profile` and its JSON (metadata, raw timings, coefficients)         |
| costs.py             | `ProfileCosts`: the fitted models as the simulator's `ComputeCosts`  |
| profiler.py          | measure -> fit -> `Profile`, with the device and model metadata      |
| report.py, cli.py    | the printed fit summary; `epd profile` (and `python -m epd.plan.profile`) |

    from epd.plan.profile import load_profile
    profile = load_profile("profile.json")
    costs = profile.compute_costs()            # ClusterSpec(costs=costs) in epd.sim
    tp2 = costs.at_degree(2)                   # an @tp2 instance's (a profile made with --tp 1,2)
    latency_s, bytes_per_s = profile.transfer("cuda_ipc")

Importing this package loads neither torch nor the model code.
"""

from epd.plan.profile.costs import ProfileCosts
from epd.plan.profile.store import Profile, load_profile

__all__ = ["Profile", "ProfileCosts", "load_profile"]
