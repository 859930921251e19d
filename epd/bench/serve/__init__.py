"""`epd bench`: the multimodal serving benchmark, driving any OpenAI-compatible server over HTTP.

| module       | what                                                                    |
|--------------|-------------------------------------------------------------------------|
| cli          | the `epd bench` / `bench sweep` / `bench plot` flags -> a BenchSpec     |
| spec         | frozen configs of a run and the parsers of flag values                  |
| workload     | BenchRequest, the workload factory; synthetic, shapes_task, jsonl, text |
| arrivals     | Poisson / gamma send times                                              |
| client       | one streamed request, timed on the client                               |
| runner       | one run: requests at their send times, concurrency cap                  |
| metrics      | percentiles, throughput, SLO attainment, goodput, stage means           |
| results      | the results JSON                                                        |
| plots/report | PNGs and the rich tables                                                |
| bench/sweep  | the commands: one server; one server per layout (launcher)              |
"""
