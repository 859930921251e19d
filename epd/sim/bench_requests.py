"""`epd bench`'s requests for the simulator: the same draws, then what the server makes of them.

    build_requests (epd.bench.serve.workload, namespace "run<i>" as `epd bench` uses for rate i;
        synthetic images named by their size and seed instead of drawn: epd.sim.images)
    -> the server's input processing without pixels (SizedImageProcessor): token ids with image
       placeholders, images with their real grids
    -> sampling params as the server builds them from the body (epd.server.sampling)
    send times: epd.bench.serve.arrivals with the seed `epd bench` uses for rate i

A request the server would refuse with a 400 (an unreadable image, a prompt that leaves no room for
max_tokens) is not sent: it is kept with its error, as the benchmark records it.
"""

from __future__ import annotations

from dataclasses import dataclass

from epd.bench.serve.arrivals import arrival_offsets
from epd.bench.serve.spec import BenchSpec
from epd.bench.serve.workload import BenchRequest, build_requests, derive_seed
from epd.inputs.errors import InvalidInputError
from epd.inputs.processor import InputProcessor
from epd.sampling_params import SamplingParams
from epd.sim.images import standin_url
from epd.sim.workload import SimRequest

# Body fields of a request that become its sampling params (as the server reads them), besides
# max_tokens. Dataset lines may carry more; the server would take those too, the simulation has
# nothing to do with them.
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
    "slo_ttft", "slo_tpot", "priority",  # what the server's extension fields set (epd.server.sampling)
)  # fmt: skip


@dataclass(frozen=True)
class BenchRun:
    """The requests of one rate of a bench spec, by their index in the workload."""

    drawn: list[BenchRequest]  # what `epd bench` would send
    offsets: list[float]  # when, from the start of the run
    requests: dict[int, SimRequest]  # what the router gets
    refused: dict[int, str]  # what the server would refuse, and why


def request_id(index: int) -> str:
    return f"r{index:05d}"


def bench_run(
    spec: BenchSpec, run: int, processor: InputProcessor, max_model_len: int, tokenizer_dir: str | None
) -> BenchRun:
    """Rate `run` of `spec` as the simulator serves it."""
    namespace = f"run{run}"
    drawn = build_requests(spec.workload, spec.num_requests, spec.seed, namespace, tokenizer_dir, standin_url)
    offsets = arrival_offsets(len(drawn), spec.arrivals[run], derive_seed(spec.seed, "arrivals", run))
    requests, refused = {}, {}
    for i, (bench, offset) in enumerate(zip(drawn, offsets)):
        try:
            prompt = processor.process_chat(bench.messages)
            params = sampling_params(bench, len(prompt.prompt_token_ids), max_model_len)
        except (InvalidInputError, ValueError) as e:
            refused[i] = f"HTTP 400: {e}"
            continue
        requests[i] = SimRequest(request_id(i), offset, prompt, params)
    return BenchRun(drawn, offsets, requests, refused)


def sampling_params(request: BenchRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    """The params the server would build (epd.server.sampling); ValueError where it answers 400."""
    room = max_model_len - prompt_len
    if room < 1:
        raise ValueError(f"the prompt has {prompt_len} tokens; the maximum context is {max_model_len}")
    max_tokens = room if request.max_tokens is None else request.max_tokens
    if max_tokens > room:
        raise ValueError(
            f"{prompt_len} prompt + {max_tokens} output tokens exceed the context {max_model_len}"
        )
    fields = {name: request.extra[name] for name in SAMPLING_FIELDS if request.extra.get(name) is not None}
    return SamplingParams(**{"temperature": 1.0, **fields, "max_tokens": max_tokens})
