"""Engine configuration: one frozen dataclass per concern, derived values as properties.

Per-instance variants are made with `dataclasses.replace`, never by mutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from epd.engine.queue_policy import DEFAULT_MAX_WAIT_S, STAGES, QueuePolicy, StagePolicies, make_queue_policy
from epd.models.config import VLModelConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    model: str
    dtype: str = "float32"
    load_format: str = "safetensors"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    hf: VLModelConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; choose from {sorted(_DTYPES)}")
        if not (Path(self.model) / "config.json").exists():
            raise FileNotFoundError(f"{self.model!r} is not a model directory (no config.json)")
        object.__setattr__(self, "hf", VLModelConfig.from_pretrained(self.model))

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def derived_max_model_len(self) -> int:
        return self.max_model_len or self.hf.text.max_position_embeddings


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as the memory below holds
    kv_cache_memory_bytes: int = 1 << 30
    enable_prefix_caching: bool = True
    # Set: the KV cache takes this share of the CUDA device's memory, less weights and the
    # activation peak (epd.engine.memory), instead of kv_cache_memory_bytes.
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.gpu_memory_utilization is not None:
            check_gpu_memory_utilization(self.gpu_memory_utilization)
            if self.num_kv_blocks is not None:
                raise ValueError(
                    "give num_kv_blocks or gpu_memory_utilization, not both: each sizes the KV cache"
                )


def check_gpu_memory_utilization(value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {value}")


# The step budget with chunked prefill when none is given. A step runs at most this many tokens,
# which bounds how long running decodes wait for a prefill (TPOT); a larger one prefills in fewer
# steps (TTFT), each re-reading the KV of the chunks before it. Tune it per GPU and workload.
DEFAULT_CHUNKED_PREFILL_TOKENS = 2048


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # Tokens one step computes, shared by decodes and prefill chunks. None: see `budget`.
    max_num_batched_tokens: int | None = None
    # Split a prompt's prefill over steps so that it never holds up running decodes for long.
    # Only engines that decode chunk: one that hands its KV off prefills whole (epd.engine.llm_engine).
    enable_chunked_prefill: bool = True
    # The order of the encode, prefill and decode queues (epd.engine.queue_policy): fcfs, slo or
    # priority for every stage, or per stage ('encode=slo,prefill=fcfs'; see `policies`).
    scheduling_policy: str = "fcfs"
    slo_ttft: float | None = None  # seconds to the first token of a request that names none
    max_queue_wait_s: float = DEFAULT_MAX_WAIT_S  # a request waiting this long is served next
    # SLO scheduling (epd.engine.scheduler): TPOT target of requests that name none, refusing
    # requests that cannot meet their TTFT deadline, and the profile that predicts step times.
    slo_tpot: float | None = None
    reject_late: bool = False
    slo_profile: str | None = None  # None: predicted from the instance's own recent steps

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        StagePolicies.parse(self.scheduling_policy)  # ValueError naming the bad stage or policy
        if self.slo_ttft is not None and not self.slo_ttft > 0:
            raise ValueError("slo_ttft must be > 0")
        if self.slo_tpot is not None and not self.slo_tpot > 0:
            raise ValueError("slo_tpot must be > 0")
        if not self.max_queue_wait_s > 0:
            raise ValueError("max_queue_wait_s must be > 0")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")

    @property
    def policies(self) -> StagePolicies:
        """`scheduling_policy` read per stage."""
        return StagePolicies.parse(self.scheduling_policy)

    def queue_policy(self, stage: str | None = None) -> QueuePolicy:
        """The queue policy of `stage` (encode, prefill or decode); None: the one every stage has
        (ValueError when the stages differ: the caller must say which it is)."""
        policies = self.policies
        if stage is None:
            names = {policies.of(s) for s in STAGES}
            if len(names) > 1:
                raise ValueError(f"scheduling_policy {self.scheduling_policy!r} differs by stage: name one")
            stage = STAGES[0]
        return make_queue_policy(policies.of(stage), self.slo_ttft, self.max_queue_wait_s)

    def budget(self, max_model_len: int) -> int:
        """Tokens per step. Chunked: the given budget, else DEFAULT_CHUNKED_PREFILL_TOKENS. Whole
        prompts: at least max_model_len, so that any prompt fits one step."""
        if self.enable_chunked_prefill:
            return self.max_num_batched_tokens or DEFAULT_CHUNKED_PREFILL_TOKENS
        return max(self.max_num_batched_tokens or 0, max_model_len)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    device: str = "cpu"
    attention_backend: str = "auto"  # triton on CUDA, torch_sdpa elsewhere (epd.attention.backend)
    cuda_graphs: bool | None = None  # None: for decode steps whenever the device and backend allow
    # Replay the vision tower as CUDA graphs: E-only instances and encode-ahead (epd.models.vision_graphs).
    vision_cuda_graphs: bool = False
    # Launch a decode step before the host has read the last one's tokens (epd.engine.async_scheduling).
    async_scheduling: bool = False
    # Encode new requests' images beside the steps, before scheduling them (epd.engine.encode_ahead).
    # None: where the tower runs on a CUDA device (on the CPU it would only take the steps' cores).
    encode_ahead: bool | None = None

    @property
    def max_num_batched_tokens(self) -> int:
        """Tokens in the largest step (what the memory profile runs), see SchedulerConfig.budget."""
        return self.scheduler.budget(self.model.derived_max_model_len)

    def encodes_ahead(self, device: torch.device) -> bool:
        """Whether an engine of this config that holds the vision tower on `device` encodes ahead."""
        return device.type == "cuda" if self.encode_ahead is None else self.encode_ahead
