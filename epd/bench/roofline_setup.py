"""Shared pieces of the GPU roofline benchmark: the model directory, synthetic requests,
FLOP and byte counts, timers.

The model is Qwen2.5-VL-7B's shape with random weights (`load_format="dummy"`): the config
from shared/model-configs, the tiny test tokenizer (its special-token ids written into the
config so that prompts built with it index the real 152k-row embedding).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch
from epd.inputs.types import ImageInput, PlaceholderRange, ProcessedPrompt
from epd.models.config import TextConfig, VisionConfig
from epd.models.registry import INTERNVL
from epd.sampling_params import SamplingParams
from epd.testing.checkpoints import build_internvl_tokenizer
from epd.testing.tokenizer import build_qwen_tokenizer, special_token_ids

SHARED_CONFIGS = Path("/work/shared/model-configs")
# Full-size configs epd ships, each NAME.json with its NAME_preprocessor_config.json: Qwen3-VL-8B,
# InternVL3-8B, and an InternVL2-26B-like shape (InternViT-6B's tower, a 20B Qwen2 LLM).
BENCH_CONFIGS = Path(__file__).parent / "configs"


# --dry-run: the same config shrunk to run on a CPU in seconds (checks the script, not the chip).
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip
TINY_VISION = {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
               "out_hidden_size": 128, "fullatt_block_indexes": [1, 3]}  # fmt: skip


def build_model_dir(
    out: Path, src: Path = SHARED_CONFIGS, config_name: str = "qwen2_5_vl_7b.json", tiny: bool = False
) -> Path:
    """A loadable model directory (config, preprocessor config, tokenizer; no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / config_name).read_text())
    if config.get("architectures") == [INTERNVL]:
        if tiny:
            raise ValueError("the shrunk (tiny) config is Qwen2.5-VL's only")
        return _internvl_model_dir(out, src, config_name, config)
    build_qwen_tokenizer(out)
    ids = special_token_ids(out)
    if tiny:
        config.update(TINY)
        config["rope_scaling"]["mrope_section"] = [4, 6, 6]
        config["vision_config"].update(TINY_VISION)
    config.update({k: v for k, v in ids.items() if k != "pad_token_id"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(src / "qwen2_5_vl_preprocessor_config.json", out / "preprocessor_config.json")
    generation = {"eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def _internvl_model_dir(out: Path, src: Path, config_name: str, config: dict) -> Path:
    """InternVL: the tiny tokenizer with its image tokens, their ids in the config, and the
    config's own NAME_preprocessor_config.json (the tiles)."""
    ids = build_internvl_tokenizer(out)
    config["image_token_id"] = ids["image_token_id"]
    config["text_config"].update(eos_token_id=ids["eos_token_id"], bos_token_id=ids["bos_token_id"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = src / config_name.replace(".json", "_preprocessor_config.json")
    shutil.copy(preprocessor, out / "preprocessor_config.json")
    generation = {"eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


# ---- synthetic requests ---------------------------------------------------------------------


def text_request(rid: str, num_prompt: int, num_output: int = 0, seed: int = 0) -> Request:
    """A text-only request with `num_output` tokens already generated (all computed but the last)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = ProcessedPrompt(torch.randint(0, 600, (num_prompt,), generator=gen).tolist(), [], [])
    req = Request(rid, prompt, SamplingParams(temperature=0), merge_size=2)
    req.output_token_ids = torch.randint(0, 600, (num_output,), generator=gen).tolist()
    req.num_computed_tokens = num_prompt + num_output - 1 if num_output else 0
    return req


def image_request(rid: str, image_token: int, sides: list[int], text: int, hidden: int, device) -> Request:
    """Images of side x side pixels (embeddings already computed: the LLM prefill alone) + text."""
    ids, images, placeholders = [1] * (text // 4), [], []
    for i, side in enumerate(sides):
        grid = (1, side // 14, side // 14)
        tokens = grid[1] * grid[2] // 4
        placeholders.append(PlaceholderRange(len(ids), tokens))
        ids += [image_token] * tokens
        images.append(ImageInput(torch.empty(0), grid, f"{rid}-{i}"))
    ids += [2] * (text - text // 4)
    req = Request(
        rid, ProcessedPrompt(ids, images, placeholders), SamplingParams(temperature=0), merge_size=2
    )
    req.image_embeds = [
        torch.randn(p.length, hidden, device=device, dtype=torch.bfloat16) * 0.02 for p in placeholders
    ]
    return req


class BlockAllocator:
    """Hands out block ids in order, wrapping around the pool. Wrapping lets sequences share
    physical blocks when a benchmark's contexts exceed the cache: the bytes each sequence
    reads are the same, only their values repeat (the pool is far larger than L2)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size, self.next = num_blocks, block_size, 0
        self.wrapped = False

    def table(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // self.block_size)
        out = [(self.next + i) % self.num_blocks for i in range(n)]
        self.wrapped |= self.next + n > self.num_blocks
        self.next = (self.next + n) % self.num_blocks
        return out


def batch_of(requests: list[Request]) -> ScheduledBatch:
    batch = ScheduledBatch()
    for req in requests:
        batch.add(req, req.num_tokens_to_compute)
    return batch


# ---- counts ---------------------------------------------------------------------------------


def llm_matmul_params(cfg: TextConfig) -> tuple[int, int]:
    """(weights of all decoder layers' matmuls, LM head weights): what each token multiplies."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    layer = qkv + cfg.num_attention_heads * d * h + 3 * h * inter
    return cfg.num_hidden_layers * layer, h * cfg.vocab_size


def kv_bytes_per_token(cfg: TextConfig, elem: int = 2) -> int:
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * elem


def prefill_flops(cfg: TextConfig, query_lens: list[int], context_lens: list[int]) -> float:
    """Matmuls of every new token, the LM head at each sequence's last token, causal attention
    (QK^T and PV: 4 * dim flops per query-key pair, each query seeing its own prefix)."""
    layers, head = llm_matmul_params(cfg)
    pairs = sum(q * (c - q) + q * (q + 1) / 2 for q, c in zip(query_lens, context_lens))
    attn = 4 * cfg.head_dim * cfg.num_attention_heads * cfg.num_hidden_layers * pairs
    return 2 * layers * sum(query_lens) + 2 * head * len(query_lens) + attn


def encoder_flops(cfg: VisionConfig, grids: list[tuple[int, int, int]]) -> float:
    """Patch embedding, blocks (matmuls + window or full attention), merger."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    patches = sum(t * gh * gw for t, gh, gw in grids)
    mlp = 3 * h * inter if cfg.variant == "qwen2_5_vl" else 2 * h * inter
    per_token = 4 * h * h + mlp
    window = cfg.window_size // cfg.patch_size  # window side in patches
    full_pairs = sum((t * gh * gw) ** 2 for t, gh, gw in grids)
    window_pairs = sum(
        t * min(window, gh - r) * min(window, gw - c) * min(window, gh - r) * min(window, gw - c)
        for t, gh, gw in grids
        for r in range(0, gh, window)
        for c in range(0, gw, window)
    )
    full_blocks = len(cfg.fullatt_block_indexes) if cfg.variant == "qwen2_5_vl" else cfg.depth
    attn = 4 * h * (full_blocks * full_pairs + (cfg.depth - full_blocks) * window_pairs)
    group = h * cfg.spatial_merge_size**2
    merger = (patches // cfg.spatial_merge_size**2) * (group * group + group * cfg.out_hidden_size)
    return 2 * patches * cfg.patch_dim * h + 2 * cfg.depth * patches * per_token + attn + 2 * merger


# ---- timing ---------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds of `fn`, host clock, the device synchronised before and after."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds of `fn` on the GPU, by CUDA events around each call (host clock on a CPU)."""
    if not torch.cuda.is_available():
        return wall_time(fn, warmup, iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graph_time(fn: Callable[[], object], calls: int = 20) -> float:
    """Median seconds of one `fn` with launch overhead removed: `calls` calls are captured in a
    CUDA graph, whose replays are timed (host clock on a CPU)."""
    if not torch.cuda.is_available():
        return wall_time(fn, 1, 3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return device_time(graph.replay, 2, 5) / calls
