"""`epd plan`: the layout and engine limits that serve a workload best, searched on the simulator
(DESIGN.md, "Planner"; PAPER.md's resource-allocation optimizer).

| module           | what                                                                        |
|------------------|-----------------------------------------------------------------------------|
| layouts.py       | every valid layout of n GPUs (E/EP/EPD/P/PD/D instances), each once          |
| capacity.py      | work per request and role from the cost model; a layout's capacity estimate |
| knobs.py         | the engine limits tuned (--max-num-seqs, --max-num-batched-tokens); seeded  |
|                  | pattern search over their grids                                             |
| policies.py      | the queue policy per stage tried (--scheduling-policy), where requests have |
|                  | a TTFT SLO: which stages a layout has, the order of the trials              |
| evaluate.py      | one configuration at one rate: `epd simulate`'s simulation, bench's metrics |
| role_time.py     | compute time by role in a simulation: the bottleneck                        |
| rates.py         | a configuration's goodput: probe, bracket, bisect                           |
| search.py        | screen every layout, tune the best (knobs, then queue policies); fewest     |
|                  | GPUs for a rate (`Planner`)                                                 |
| serve_command.py | the planned `EngineArgs` as an `epd serve` command line                     |
| report.py        | the ranked table, the JSON document                                         |
| command.py       | `epd plan`: flags -> search -> table, serve command, --json                 |
| cli.py           | its parser (argparse only at import)                                        |
"""
