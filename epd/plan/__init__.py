"""The planner (DESIGN.md, "Planner"): measure a device, simulate layouts on it, pick one.

| package / module | what                                                                        |
|------------------|-----------------------------------------------------------------------------|
| profile/         | `epd profile`: per-stage costs measured on a device, fitted, saved as JSON;  |
|                  | `Profile.compute_costs()` is the cost model `epd.sim` runs on                |
"""
