"""The planner (DESIGN.md, "Planner"): measure a device, simulate layouts on it, pick one.

| package / module | what                                                                        |
|------------------|-----------------------------------------------------------------------------|
| profile/         | `epd profile`: per-stage costs measured on a device, fitted, saved as JSON;  |
|                  | `Profile.compute_costs()` is the cost model `epd.sim` runs on                |
| search/          | `epd plan`: every layout of n GPUs and the engines' batch limits, simulated  |
|                  | with `epd simulate` at a few rates each; the best, or the fewest GPUs for a  |
|                  | rate, as a ranked table and an `epd serve` command                           |
"""
