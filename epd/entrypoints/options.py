"""The engine's options, declared once: the fields of `EngineArgs`.

Each option is a field with its type, default and help text (`option(...)`). `LLM(model,
**options)` takes the fields by name and `epd serve` makes a `--kebab-case` flag of each
(epd/cli.py), so neither keeps a list of its own that could drift from this one.

    EngineArgs(model="path/to/Qwen2.5-VL", layout="1E+1P+1D", kv_cache_memory_bytes=2 << 30)

The CLI reads these declarations to build `--help`, which must answer without loading torch:
so the engine's modules are imported inside the methods that need them, not at the top.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epd.cluster.router.auto_roles import RoleSwitchingOptions
    from epd.config import EngineConfig
    from epd.entrypoints.backend import EngineBackend
    from epd.inputs.processor import InputLimits, InputProcessor

OPTION = "epd.option"  # the key of an option's `Option` in its field's metadata

_SIZE = re.compile(r"(?i)\s*(\d+)\s*([kmgt]?)(i?)b?\s*")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'1048576', '512MiB', '1G' -> bytes (K/M/G/T, with or without i: powers of 1024 both ways)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1048576, 512MiB, 1G)")
    number, unit, _ = match.groups()
    return int(number) * _UNITS[unit.lower()]


def format_bytes(size: int) -> str:
    """1 << 30 -> '1GiB': the largest unit that writes `size` exactly (parse_bytes reads it back)."""
    for unit, scale in reversed(_UNITS.items()):
        if size and size % scale == 0:
            return f"{size // scale}{unit.upper()}iB" if unit else str(size)
    return str(size)


def parse_utilization(text: str) -> float:
    """'0.9' -> 0.9; a share of device memory, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"not a share of device memory in (0, 1]: {text!r} (e.g. 0.9)")
    return value


def parse_scheduling_policy(text: str) -> str:
    """'slo' or 'encode=slo,prefill=fcfs' -> its shortest form (epd.engine.queue_policy.StagePolicies)."""
    from epd.engine.queue_policy import StagePolicies  # no torch: --help stays light

    try:
        return StagePolicies.parse(text).text
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Option:
    """What the CLI needs beyond a field's name, type and default."""

    help: str
    parse: Callable[[str], Any] | None = None  # text -> value; None: the field's type (str, int, float)
    show: Callable[[Any], str] | None = None  # how --help writes the default; None: as it is
    choices: Sequence[str] | None = None
    # None: --kebab-case of the field's name. A bool that defaults to True must name the flag
    # that turns it off (--disable-prefix-caching): a flag that sets the default does nothing.
    flag: str | None = None


def option(default: Any, help: str, **how: Any) -> Any:
    """A field of EngineArgs that is an engine option; `how`: the rest of `Option`."""
    return field(default=default, metadata={OPTION: Option(help, **how)})


def _bytes_option(default: int, help: str) -> Any:
    return option(default, help, parse=parse_bytes, show=format_bytes)


def _no_limits() -> InputLimits:
    from epd.inputs.processor import InputLimits

    return InputLimits()


@dataclass(frozen=True)
class EngineArgs:
    """Everything needed to start an engine; shared by `LLM`, `AsyncEngine` and the CLI.

    Two fields are not options: `model` (LLM's first argument, the CLI's --model: a model
    directory, or a Hub id ORG/NAME that `resolved` turns into one) and `limits` (what a
    request may bring; the CLI builds it from its input-limit flags).
    """

    model: str
    revision: str | None = option(
        None, "branch, tag or commit of a Hub model (--model ORG/NAME; default: main); not for a directory"
    )
    layout: str = option(
        "1EPD",
        "instance groups, e.g. 1EPD, 2EP+1D, 1E+1P+1D; a group ending in @tpN runs each of its "
        "instances tensor-parallel over N devices, e.g. 1EPD@tp2, 1E+1P@tp2+1D (P or D groups only)",
    )
    device: str = option("cpu", "device of every instance (cpu, cuda, cuda:1, ...)")
    devices: str | None = option(
        None,
        "one device per instance in layout order (N for an @tpN instance, rank 0 first), comma-separated",
    )
    transfer: str = option(
        "auto",
        "connector between instances: cuda_ipc, nccl, shm, tcp (auto: cuda_ipc between GPUs, else shm; "
        "with --launcher ray, per pair: cuda_ipc between GPUs of one host, nccl between GPUs of two, "
        "shm within a host, else tcp)",
    )
    launcher: str = option(
        "local",
        "where instances run: local processes, or Ray actors on any node of a Ray cluster (needs "
        "epd[ray]; a layout group ending in @NAME runs only on nodes labelled epd-group=NAME, "
        "e.g. 2E@encoders+1P+1D; see docs/deploy.md)",
        choices=("local", "ray"),
    )
    ray_address: str | None = option(
        None, "the Ray cluster to join with --launcher ray (default: RAY_ADDRESS, or the local one)"
    )
    kv_streaming: str = option(
        "auto",
        "P -> D KV: layer by layer during prefill, or whole after it (auto: layer with cuda_ipc)",
        choices=("auto", "layer", "request"),
    )
    transfer_retries: int = option(
        2,
        "times a failed transfer (embeddings E -> P, KV P -> D) is sent again on the same pair; "
        "after the last the request is placed anew on other instances, or fails",
    )
    transfer_timeout: float = option(
        30.0, "seconds one attempt of a transfer waits for its receiver to take it before it fails"
    )
    transfer_staging_bytes: int = _bytes_option(
        1 << 30,
        "GPU memory each cuda_ipc sender (an instance, each rank of a tensor-parallel one) keeps to "
        "stage what it sends until the receiver has copied it; a send waits for room",
    )
    dtype: str = option("float32", "weights", choices=("float32", "float16", "bfloat16"))
    load_format: str = option(
        "safetensors",
        "dummy: random weights of the real shapes (benchmarks)",
        choices=("safetensors", "dummy"),
    )
    max_model_len: int | None = option(
        None, "context length, prompt + output (default: the model's, capped by the KV cache)"
    )
    block_size: int = option(16, "tokens per KV cache block")
    num_kv_blocks: int | None = option(
        None, "KV blocks per instance (default: as many as kv-cache-memory-bytes holds)"
    )
    kv_cache_memory_bytes: int = _bytes_option(1 << 30, "KV cache size per instance")
    gpu_memory_utilization: float | None = option(
        None,
        "share of each instance's CUDA device memory for weights, activations and KV cache "
        "(e.g. 0.9); the KV cache gets the rest, instead of kv-cache-memory-bytes",
        parse=parse_utilization,
    )
    mm_cache_bytes: int = _bytes_option(256 << 20, "multimodal embedding cache per encode/prefill instance")
    shared_file_bytes: int = _bytes_option(
        1 << 30,
        "shared memory for the image files in flight, which encoders on the server's host read in "
        "place instead of receiving them over a socket (0: always over the socket)",
    )
    enable_prefix_caching: bool = option(
        True, "never reuse KV blocks across requests", flag="--disable-prefix-caching"
    )
    max_num_seqs: int = option(256, "requests per running batch")
    max_num_batched_tokens: int | None = option(
        None,
        "tokens per engine step, shared by decodes and prefill chunks (default: 2048 with chunked "
        "prefill; without it, or on a prefill-only instance, at least max-model-len)",
    )
    enable_chunked_prefill: bool = option(
        True,
        "prefill each prompt in one step, beside the decodes, instead of in chunks that fit the "
        "step's token budget (prefill-only instances never chunk)",
        flag="--disable-chunked-prefill",
    )
    scheduling_policy: str = option(
        "fcfs",
        "order of the encode, prefill and decode queues: fcfs (first come first served), slo "
        "(earliest TTFT deadline first, those that can no longer meet theirs after the others) or "
        "priority (lowest priority value first); one for every stage, or per stage: "
        "encode=slo,prefill=fcfs,decode=slo (a stage not named: fcfs; decode: a decode-only "
        "instance's queue). Under slo and priority a request that waited max-queue-wait seconds is "
        "served next",
        parse=parse_scheduling_policy,
    )
    slo_ttft: float | None = option(
        None, "TTFT deadline in seconds of a request that sets no slo_ttft (default: none)"
    )
    max_queue_wait: float = option(
        10.0, "seconds a request may wait in a queue before it is served next, whatever its slack"
    )
    # SLO scheduling, parts 3 and 4 (epd.engine.scheduler, epd.engine.step_estimator).
    slo_tpot: float | None = option(
        None,
        "TPOT target in seconds of a request that sets no slo_tpot: an instance that decodes keeps "
        "each step's predicted time within the tightest target it holds (default: none)",
    )
    reject_late: bool = option(
        False,
        "refuse at once (429 with Retry-After) a request that cannot meet its TTFT deadline even if "
        "served next, instead of serving it best-effort after the others",
    )
    slo_profile: str | None = option(
        None,
        "an `epd profile` file that predicts step times for SLO scheduling (default: each instance "
        "fits its own recent steps)",
    )
    seed: int = option(0, "seed of weights (dummy) and unseeded sampling")
    attention_backend: str = option(
        "auto", "torch_sdpa or triton (auto: triton on CUDA where installed, else torch_sdpa)"
    )
    cuda_graphs: bool | None = option(
        None, "replay decode steps as CUDA graphs (default: whenever the device and attention backend can)"
    )
    vision_cuda_graphs: bool = option(
        False,
        "encoder-only instances, and instances encoding ahead (see --encode-ahead), replay the vision "
        "tower as CUDA graphs, one per batch shape seen twice (Qwen2-VL / Qwen2.5-VL towers; frees "
        "the host from launching it)",
    )
    async_scheduling: bool = option(
        False,
        "launch each decode step before the host has read the last step's tokens, so that scheduling "
        "and input building overlap the device's work (pure-decode steps of greedy or seeded requests; "
        "other steps run as before; @tpN instances send the ids to their workers on the device)",
    )
    encode_ahead: bool | None = option(
        None,
        "instances that hold the vision tower and the language model encode new requests' images "
        "beside their steps, on a CUDA stream of their own, so that running decodes do not wait for "
        "the tower (default: where the tower runs on a CUDA device; --no-encode-ahead: inside the "
        "steps; BENCHMARKS.md weighs both)",
    )
    instance_silence_timeout: float = option(
        10.0,
        "seconds without a word from an instance (its loop reports 4 times a second) before the "
        "router takes it for dead (stopped, hung) and redoes its work elsewhere",
    )
    instance_restarts: int = option(5, "times a dead instance is started again (0: never)")
    switchable_roles: bool = option(
        False, "keep both model parts in host memory so that E can be switched at run time (admin API)"
    )
    # Automatic role switching (epd.cluster.router.auto_roles): its mode and knobs.
    role_switching: str = option(
        "off",
        "auto: the router moves instances between roles by itself when the planner's simulator "
        "predicts that another layout serves the recent requests better (off: only by hand, admin API)",
        choices=("auto", "off"),
    )
    role_switching_profile: str | None = option(
        None,
        "profile (epd profile) whose cost model the automatic switching simulates with "
        "(default: linear costs, calibrated from the instances' step times)",
    )
    role_switching_margin: float = option(
        0.1,
        "SLO attainment (a share) a new layout must be predicted to add before an automatic switch; "
        "or, attainment no worse, twice this share off the mean latency",
    )
    role_switching_dwell: float = option(
        30.0, "seconds an instance keeps its roles after a switch before it may be switched automatically"
    )
    role_switching_window: float = option(
        30.0,
        "seconds of recent requests the automatic switching predicts from (their attainment of "
        "--slo-ttft and --slo-tpot; without either, their mean latency)",
    )
    limits: InputLimits = field(default_factory=_no_limits)

    def resolved(self) -> EngineArgs:
        """These args with `model` a local directory: a Hub id's snapshot in the Hub cache, or
        downloaded into it (epd/models/hub.py; weights skipped with dummy ones). Called once, first,
        by LLM and AsyncEngine, so that every consumer, the instance processes included, reads the
        same snapshot. ModelNotFoundError (a FileNotFoundError) in one line if there is none."""
        from epd.models.hub import resolve_model

        local = resolve_model(self.model, self.revision, weights=self.load_format != "dummy")
        return self if local == self.model else replace(self, model=local)

    def engine_config(self) -> EngineConfig:
        from epd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

        return EngineConfig(
            model=ModelConfig(
                self.model,
                dtype=self.dtype,
                load_format=self.load_format,
                max_model_len=self.max_model_len,
                seed=self.seed,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                num_kv_blocks=self.num_kv_blocks,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                enable_prefix_caching=self.enable_prefix_caching,
                gpu_memory_utilization=self.gpu_memory_utilization,
            ),
            scheduler=SchedulerConfig(
                self.max_num_seqs,
                self.max_num_batched_tokens,
                self.enable_chunked_prefill,
                scheduling_policy=self.scheduling_policy,
                slo_ttft=self.slo_ttft,
                max_queue_wait_s=self.max_queue_wait,
                slo_tpot=self.slo_tpot,
                reject_late=self.reject_late,
                slo_profile=self.slo_profile,
            ),
            device=self.device,
            attention_backend=self.attention_backend,
            cuda_graphs=self.cuda_graphs,
            vision_cuda_graphs=self.vision_cuda_graphs,
            async_scheduling=self.async_scheduling,
            encode_ahead=self.encode_ahead,
        )

    def build(self, processor: InputProcessor) -> EngineBackend:
        """In this process for a single aggregated instance; else one process per instance."""
        from epd.cluster.cluster import Cluster
        from epd.cluster.launcher import make_launcher
        from epd.cluster.layout import Layout
        from epd.engine.llm_engine import LLMEngine

        layout = Layout.parse(self.layout)
        config = self.engine_config()
        # A tensor-parallel instance needs its workers started by a launcher: never in process.
        in_process = layout.num_devices == 1 and layout.is_aggregated and self.devices is None
        if in_process and self.launcher == "local":
            if self.role_switching == "auto":
                raise ValueError(
                    f"role_switching auto needs instances to switch; layout {self.layout} has one"
                )
            return LLMEngine(config, processor.tokenizer)
        launcher = make_launcher(self.launcher, self.ray_address)
        cluster = Cluster(
            layout,
            config,
            launcher=launcher,
            host=launcher.host,
            devices=self.devices or self.device,
            transfer=self.transfer,
            kv_streaming=self.kv_streaming,
            transfer_retries=self.transfer_retries,
            transfer_timeout_s=self.transfer_timeout,
            transfer_staging_bytes=self.transfer_staging_bytes,
            mm_cache_bytes=self.mm_cache_bytes,
            shared_file_bytes=self.shared_file_bytes,
            silence_timeout_s=self.instance_silence_timeout,
            max_restarts=self.instance_restarts,
            switchable_roles=self.switchable_roles,
            role_switching=self.role_switching_options(),
        )
        if cluster.shared_files is not None:  # data URLs are decoded where the encoders read them
            processor.file_buffers = cluster.shared_files.take
        return cluster

    def role_switching_options(self) -> RoleSwitchingOptions | None:
        """The automatic role switching these options ask for; None when off. ValueError if bad."""
        from epd.cluster.router.auto_roles import AutoRolesConfig, RoleSwitchingOptions

        if self.role_switching not in ("auto", "off"):
            raise ValueError(f"role_switching must be auto or off, not {self.role_switching!r}")
        if self.role_switching == "off":
            return None
        config = AutoRolesConfig(
            margin=self.role_switching_margin,
            latency_margin=2 * self.role_switching_margin,
            dwell_s=self.role_switching_dwell,
            window_s=self.role_switching_window,
        )
        return RoleSwitchingOptions(config, self.role_switching_profile, self.slo_ttft, self.slo_tpot)


def engine_options() -> list[Field]:
    """The fields of EngineArgs that are options, in the order they are declared."""
    return [f for f in fields(EngineArgs) if OPTION in f.metadata]
