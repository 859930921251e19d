"""What the entry points drive: one protocol for the in-process engine and a cluster of instances.

| backend        | what runs                         | instances         | where                        |
|----------------|-----------------------------------|-------------------|------------------------------|
| `LLMEngine`    | one aggregated engine (`1EPD`)    | "EPD0", always up | this process                 |
| `Cluster`      | the router and instance processes | one per layout    | epd.cluster: any other layout|
|                |                                   | group member      |                              |

`LLM` and `AsyncEngine` use only these methods, so a new backend (a Ray launcher, the
simulator's virtual cluster) plugs in without an `isinstance` in the entry points.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams


@runtime_checkable
class EngineBackend(Protocol):
    @property
    def max_model_len(self) -> int:
        """Longest prompt + output any request may have."""
        ...

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> object:
        """Queue a request. ValueError: it can never run (too long, ...); RuntimeError: no
        instance can take it now. Either concerns this request only."""
        ...

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free what it holds; unknown or finished ids are ignored."""
        ...

    def step(self) -> list[RequestOutput]:
        """Advance the work; the outputs of the requests that advanced."""
        ...

    def has_unfinished_requests(self) -> bool: ...

    def wake(self) -> None:
        """From any thread: a `step` waiting for work from elsewhere returns now (a submission)."""
        ...

    def poll_idle(self) -> list[RequestOutput]:
        """Housekeeping while no request runs (instance stats, liveness), without waiting."""
        ...

    def instance_stats(self) -> dict[str, dict[str, float]]:
        """Latest figures per instance name (epd.cluster.stats.STAT_HELP)."""
        ...

    def instances_up(self) -> dict[str, bool]: ...

    def missing_roles(self) -> list[str]:
        """Roles ("E", "P", "D") the layout has that no live instance holds now: [] while it can
        serve every request, whichever instances are down."""
        ...

    def shutdown(self) -> None:
        """Stop every process the backend started. Idempotent."""
        ...
