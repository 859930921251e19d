"""Shared pieces of the GPU roofline benchmarks: the model directory, synthetic requests and
images, FLOP and byte counts, timers.

The model is a full-size config with random weights (`load_format="dummy"`): Qwen2.5-VL-7B's
from shared/model-configs by default, or one of epd/bench/configs (`BENCH_CONFIGS`), with the
tiny test tokenizer (its special-token ids written into the config so that prompts built with it
index the real embedding).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch
from epd.inputs.image_processor import ImageProcessorConfig, image_grid_thw
from epd.inputs.internvl_tiles import tile_count
from epd.inputs.types import ImageInput, PlaceholderRange, ProcessedPrompt
from epd.models.config import TextConfig, VisionConfig
from epd.models.registry import INTERNVL, QWEN3_VL
from epd.sampling_params import SamplingParams
from epd.testing.checkpoints import build_internvl_tokenizer
from epd.testing.tokenizer import build_qwen_tokenizer, special_token_ids

SHARED_CONFIGS = Path("/work/shared/model-configs")
# Full-size configs epd ships, each NAME.json with its NAME_preprocessor_config.json (Qwen3-VL's
# is qwen3_vl_preprocessor_config.json): Qwen3-VL-8B, InternVL3-8B, and an InternVL2-26B-like
# shape (InternViT-6B's tower, a 20B Qwen2 LLM).
BENCH_CONFIGS = Path(__file__).parent / "configs"


# --dry-run: the same configs shrunk to run on a CPU in seconds (checks the script, not the chip).
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip
TINY_VISION = {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
               "out_hidden_size": 128, "fullatt_block_indexes": [1, 3]}  # fmt: skip
TINY_QWEN3_VISION = {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                     "out_hidden_size": 128, "num_position_embeddings": 64,
                     "deepstack_visual_indexes": [0, 2]}  # fmt: skip
# InternVL: 112 px tiles (8 x 8 patches, 16 tokens a tile): the memory profile's dummy images
# (epd.engine.memory: 96 x 96 patches, then a strip) are whole tiles down to 16 tokens.
TINY_INTERNVL_TILE = 112
TINY_INTERNVL_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "image_size": [TINY_INTERNVL_TILE] * 2}  # fmt: skip


def build_model_dir(
    out: Path, src: Path = SHARED_CONFIGS, config_name: str = "qwen2_5_vl_7b.json", tiny: bool = False
) -> Path:
    """A loadable model directory (config, preprocessor config, tokenizer; no weights).

    The preprocessor config is src/NAME_preprocessor_config.json, else the one of the config's
    model_type (src/qwen2_5_vl_preprocessor_config.json for Qwen2.5-VL)."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / config_name).read_text())
    preprocessor = json.loads(_preprocessor_path(src, config_name, config).read_text())
    if tiny:
        _shrink(config, preprocessor)
    if config.get("architectures") == [INTERNVL]:
        # InternVL's tokenizer adds its image tokens; the config takes their ids.
        ids = build_internvl_tokenizer(out)
        config["image_token_id"] = ids["image_token_id"]
    else:
        build_qwen_tokenizer(out)
        ids = special_token_ids(out)
        config.update({k: v for k, v in ids.items() if k != "pad_token_id"})
    if "text_config" in config:  # nested configs: the text config's ids win over the top level's
        config["text_config"].update(eos_token_id=ids["eos_token_id"], bos_token_id=ids["bos_token_id"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    generation = {"eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def _preprocessor_path(src: Path, config_name: str, config: dict) -> Path:
    own = src / config_name.replace(".json", "_preprocessor_config.json")
    return own if own.exists() else src / f"{config.get('model_type', 'qwen2_5_vl')}_preprocessor_config.json"


def _shrink(config: dict, preprocessor: dict) -> None:
    """The tiny --dry-run shapes, written into a full-size config (flat or nested) in place."""
    architecture = (config.get("architectures") or [""])[0]
    if architecture == INTERNVL:
        config["text_config"].update(TINY)
        config["vision_config"].update(TINY_INTERNVL_VISION)
        preprocessor["size"] = {"height": TINY_INTERNVL_TILE, "width": TINY_INTERNVL_TILE}
    elif architecture == QWEN3_VL:
        config["text_config"].update(TINY, head_dim=32)  # 4 heads of 32: M-RoPE bands 6 + 5 + 5
        config["text_config"]["rope_scaling"]["mrope_section"] = [6, 5, 5]
        config["vision_config"].update(TINY_QWEN3_VISION)
    else:
        config.update(TINY)
        config["rope_scaling"]["mrope_section"] = [4, 6, 6]
        config["vision_config"].update(TINY_VISION)


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
    """FLOPs of one encode of these images, counted from the config: every matmul (2 per
    multiply-add) and attention's QK^T and PV (4 * width per query-key pair); norms,
    activations, rotary and the position lookups are left out (a few percent at most).

    Qwen towers, per patch: patch embedding (patch_dim x h), each block's q/k/v/out (4 h^2) and
    MLP (3 h x inter gated for Qwen2.5-VL, else 2); attention inside each image, or inside each
    window for Qwen2.5-VL's windowed blocks; the merger (h m^2 -> h m^2 -> out) on every merged
    token, once more per Qwen3-VL deepstack level. InternVL: `_internvl_flops`."""
    if cfg.internvl is not None:
        return _internvl_flops(cfg, grids)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    patches = sum(t * gh * gw for t, gh, gw in grids)
    mlp = 3 * h * inter if cfg.variant == "qwen2_5_vl" else 2 * h * inter
    per_token = 4 * h * h + mlp
    full_pairs = sum(t * (gh * gw) ** 2 for t, gh, gw in grids)  # each frame attends within itself
    full_blocks = len(cfg.fullatt_block_indexes) if cfg.variant == "qwen2_5_vl" else cfg.depth
    window_blocks = cfg.depth - full_blocks
    window_pairs = _window_pairs(cfg, grids) if window_blocks else 0
    attn = 4 * h * (full_blocks * full_pairs + window_blocks * window_pairs)
    group = h * cfg.spatial_merge_size**2
    merger = (patches // cfg.spatial_merge_size**2) * (group * group + group * cfg.out_hidden_size)
    mergers = 1 + len(cfg.deepstack_visual_indexes)
    return 2 * patches * cfg.patch_dim * h + 2 * cfg.depth * patches * per_token + attn + 2 * mergers * merger


def _window_pairs(cfg: VisionConfig, grids: list[tuple[int, int, int]]) -> int:
    """Query-key pairs of one windowed block: each window (side in patches) attends within itself."""
    window = cfg.window_size // cfg.patch_size
    return sum(
        t * (min(window, gh - r) * min(window, gw - c)) ** 2
        for t, gh, gw in grids
        for r in range(0, gh, window)
        for c in range(0, gw, window)
    )


def _internvl_flops(cfg: VisionConfig, grids: list[tuple[int, int, int]]) -> float:
    """InternVL, per tile of n patches (L = n + 1 tokens with the CLS token): patch embedding
    (n x patch_dim x h); each block's q/k/v/out (4 h^2) and MLP (2 h x inter) on L tokens, and
    full attention over the tile's L tokens; the projector (h m^2 -> out -> out) on the n / m^2
    tokens of the pixel shuffle. Tiles never attend to each other: the cost is linear in tiles."""
    h, inter, m, out = cfg.hidden_size, cfg.intermediate_size, cfg.spatial_merge_size, cfg.out_hidden_size
    n = (cfg.internvl.image_size // cfg.patch_size) ** 2
    tiles = sum(math.prod(g) for g in grids) // n
    length = n + 1
    blocks = cfg.depth * (2 * length * (4 * h * h + 2 * h * inter) + 4 * h * length**2)
    projector = 2 * (n // m**2) * (h * m * m * out + out * out)
    return tiles * (2 * n * cfg.patch_dim * h + blocks + projector)


# ---- images ---------------------------------------------------------------------------------


def image_grid(processor: ImageProcessorConfig, side: int) -> tuple[tuple[int, int, int], int]:
    """(patch grid, tiles) of a side x side px image as the model's processor sends it to the
    tower: Qwen, resized to whole merge groups (tiles 0); InternVL, its tiles and thumbnail
    (epd.inputs.internvl_tiles) as a strip of their tokens."""
    tiles = tile_count(side, side, processor.tiling) if processor.tiling is not None else 0
    return image_grid_thw(side, side, processor), tiles


def image_batch(
    processor: ImageProcessorConfig, vision: VisionConfig, side: int, count: int, device
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Packed random patches of `count` side x side px images and their grids: one encode's input.
    float32, as the input processor gives them (the patch embedding casts them itself)."""
    grid, _ = image_grid(processor, side)
    pixels = torch.randn(count * math.prod(grid), vision.patch_dim, device=device)
    return pixels, [grid] * count


@torch.inference_mode()
def encode(model: nn.Module, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> None:
    model.encode_images(pixels, grids)


def encoder_figures(
    model: nn.Module, pixels: torch.Tensor, grids: list[tuple[int, int, int]], flops_ceiling: float
) -> dict[str, float]:
    """Time one packed encode of these images: ms, images/s, ms an image, TFLOP/s and MFU
    (`encoder_flops` / time / `flops_ceiling`, the measured matmul rate)."""
    sec = adaptive_wall_time(partial(encode, model, pixels, grids))
    flops = encoder_flops(model.config.vision, grids)
    n = len(grids)
    return dict(ms=sec * 1e3, img_s=n / sec, ms_per_image=sec * 1e3 / n,
                TFLOPs=flops / sec / 1e12, MFU=flops / sec / flops_ceiling)  # fmt: skip


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


def adaptive_wall_time(fn: Callable[[], object], budget: float = 0.5, lo: int = 3, hi: int = 20) -> float:
    """`wall_time` with as many runs (lo..hi) as fit in about `budget` seconds, judged by one
    warm-up run: small cases get enough samples, a slow one (seconds) still runs only lo times."""
    first = max(wall_time(fn, 0, 1), 1e-9)
    return wall_time(fn, 0, max(lo, min(hi, int(budget / first))))


def matmul_rate(n: int, device) -> float:
    """FLOP/s of an n x n x n bf16 matmul: the measured rate MFU figures divide by."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / device_time(partial(torch.matmul, a, b), 3, 10)


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
