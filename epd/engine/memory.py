"""The KV cache sized from the device's memory, like vLLM's `gpu_memory_utilization`.

    KV cache = utilization x total device memory
               - what this process holds once its weights are loaded     (used_after_load)
               - the activation peak of the largest step it will run      (activation_peak)

The largest step is measured by running it once with dummy inputs (`run_dummy_step`): a prefill
of `max_num_batched_tokens` tokens in one sequence (EngineConfig's: the step budget with chunked
prefill, else at least max_model_len; a prefill-only engine profiles whole prompts), preceded,
where the instance holds the vision tower, by encoding images that fill those tokens (a step
encodes the images of the tokens it prefills), and followed by logits for `max_num_seqs` rows.
An engine that encodes ahead (epd.engine.encode_ahead) runs the tower beside its steps, on a
stream of its own: their peaks add up, so the profile runs the tower on a stream of its own first
(the allocator keeps each stream's freed blocks for that stream), then the step.

Figures are the caching allocator's reserved bytes: what it holds is what the device cannot give
the KV cache, rounding and fragmentation included. The share left over, 1 - utilization, covers
what the allocator never sees: the CUDA context, cuBLAS and Triton workspaces, CUDA graph pools
(together about 0.5-1 GiB a process). Instances sharing a GPU each take their own share
(e.g. 0.45 and 0.45): every figure here is this process's, never the device's.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from epd.attention.backend import AttentionBackend, get_attention_backend
from epd.attention.context import AttentionMetadata, build_device_metadata, forward_context
from epd.config import EngineConfig, check_gpu_memory_utilization
from epd.engine.kv_cache import allocate_kv_cache, bind_kv_cache
from epd.models.layers.attention import PagedAttention

logger = logging.getLogger(__name__)

GIB = 1 << 30
# The dummy step's images: 1344 px squares (96 x 96 patches), the largest the benchmarks send.
DUMMY_IMAGE_PATCHES = 96


@dataclass(frozen=True)
class MemoryProfile:
    used_after_load: int  # bytes this process holds before the step: weights, caches, ...
    activation_peak: int  # bytes the step needed on top of that, at its peak


def kv_cache_bytes(total: int, utilization: float, used_after_load: int, activation_peak: int) -> int:
    """Bytes left for the KV cache in `utilization` x `total` once weights and activations are in."""
    check_gpu_memory_utilization(utilization)
    budget = int(total * utilization)
    needed = used_after_load + activation_peak
    if needed >= budget:
        raise ValueError(
            f"weights and activations need {needed / GIB:.2f} GiB ({used_after_load / GIB:.2f} GiB "
            f"loaded + {activation_peak / GIB:.2f} GiB activation peak), and gpu_memory_utilization "
            f"{utilization} of {total / GIB:.2f} GiB allows {budget / GIB:.2f} GiB: nothing is left "
            "for the KV cache; raise gpu_memory_utilization (or lower max_num_batched_tokens)"
        )
    return budget - needed


def resolve_kv_cache_bytes(config: EngineConfig, model: nn.Module) -> int:
    """The KV cache's bytes for an engine whose `model` is loaded: `kv_cache_memory_bytes`, or,
    with `gpu_memory_utilization` set, what that share of the CUDA device leaves (profiled)."""
    cache = config.cache
    utilization = cache.gpu_memory_utilization
    if utilization is None:
        return cache.kv_cache_memory_bytes
    device = torch.device(config.device)
    if device.type != "cuda":
        raise ValueError(
            f"gpu_memory_utilization sizes the KV cache from a CUDA device's memory; the device is "
            f"{device}: size the cache with kv_cache_memory_bytes (or num_kv_blocks) instead"
        )
    num_tokens = config.max_num_batched_tokens
    profile = profile_memory(
        model, device, num_tokens, config.scheduler.max_num_seqs, config.attention_backend, cache.block_size,
        encoder_beside=config.encodes_ahead(device),
    )  # fmt: skip
    total = torch.cuda.get_device_properties(device).total_memory
    kv = kv_cache_bytes(total, utilization, profile.used_after_load, profile.activation_peak)
    logger.info(
        "KV cache %.2f GiB = %.2f x %.2f GiB - %.2f GiB loaded - %.2f GiB peak of a %d-token step",
        kv / GIB, utilization, total / GIB, profile.used_after_load / GIB,
        profile.activation_peak / GIB, num_tokens,
    )  # fmt: skip
    return kv


def profile_memory(
    model: nn.Module,
    device: torch.device,
    num_tokens: int,
    max_num_seqs: int = 1,
    attention_backend: str = "auto",
    block_size: int = 16,
    encoder_beside: bool = False,
) -> MemoryProfile:
    """What this process holds now and what `run_dummy_step` needs on top (CUDA only);
    `encoder_beside`: plus what encoding its images needs, where the tower runs beside the steps."""
    free_cached_memory(device)
    used = torch.cuda.memory_reserved(device)
    allocated = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if encoder_beside and model.visual is not None:
        # As encode-ahead does: the tower on a stream of its own, whose freed blocks the
        # allocator keeps for that stream, so the step after it cannot reuse them.
        with torch.cuda.stream(torch.cuda.Stream(device)):
            encode_dummy_images(model, device, num_tokens)
    run_dummy_step(model, device, num_tokens, max_num_seqs, attention_backend, block_size)
    torch.cuda.synchronize(device)
    # What the step made the allocator reserve; at least what it allocated: where this process
    # still holds segments with free room (tensors of earlier work), the step may fit in them and
    # reserve nothing new, but that room is not the cache's to count on.
    peak = max(
        torch.cuda.max_memory_reserved(device) - used,
        torch.cuda.max_memory_allocated(device) - allocated,
    )
    free_cached_memory(device)
    # What the run leaves held stays held. Without this, a cache sized for the tower's own stream
    # came out 34 MiB over on an H200, most likely the cuBLAS workspace that a stream's first
    # matmuls make and that outlives the stream.
    kept = max(0, torch.cuda.memory_reserved(device) - used)
    return MemoryProfile(used_after_load=used + kept, activation_peak=peak)


def free_cached_memory(device: torch.device) -> None:
    """Drop unreachable tensors and hand the allocator's unused blocks back to the device
    (nothing to do on the CPU: its allocator keeps no cache, and no figure here reads it)."""
    if device.type != "cuda":
        return
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


@torch.inference_mode()
def run_dummy_step(
    model: nn.Module,
    device: torch.device,
    num_tokens: int,
    max_num_seqs: int = 1,
    attention_backend: str = "auto",
    block_size: int = 16,
) -> torch.Tensor:
    """The largest step an engine with this model runs, on dummy inputs; any device.

    Returns the float32 probabilities of the `min(max_num_seqs, num_tokens)` logit rows (the
    sampler's working copy). The attention layers write to a one-block scratch cache (every
    token to the same block: the values are garbage, the shapes and kernels are the engine's)
    and are unbound afterwards, so the engine's runner binds its own cache next.
    """
    backend = get_attention_backend(attention_backend, device)
    scratch = allocate_kv_cache(model.config.text, 1, block_size, next(model.parameters()).dtype, device)
    bind_kv_cache(model, scratch, backend)
    try:
        hidden = _prefill_with_images(
            model, device, num_tokens, _one_sequence(num_tokens, block_size, device, backend)
        )
        logits = model.compute_logits(hidden[-min(max_num_seqs, num_tokens) :])
        return logits.float().softmax(-1)
    finally:
        for layer in model.modules():
            if isinstance(layer, PagedAttention):
                layer.kv_cache = None


def _prefill_with_images(
    model: nn.Module, device: torch.device, num_tokens: int, meta: AttentionMetadata
) -> torch.Tensor:
    """Hidden states of one prompt of `num_tokens` (image rows first, where the model encodes)."""
    mm_embeds = encode_dummy_images(model, device, num_tokens)
    mm_index = None if mm_embeds is None else torch.arange(len(mm_embeds), device=device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    embeds = model.embed_tokens(ids, mm_embeds, mm_index)
    positions = torch.arange(num_tokens, device=device).repeat(3, 1)  # as text: t = h = w
    with forward_context(meta):
        return model(embeds, positions)


def dummy_image_grids(num_tokens: int, merge: int = 2, side: int = DUMMY_IMAGE_PATCHES) -> list[tuple]:
    """(t, h, w) patch grids of images whose merged tokens add up to `num_tokens`: squares of
    `side` patches, then one strip `merge` patches tall for the rest."""
    per_image = (side // merge) ** 2
    grids = [(1, side, side)] * (num_tokens // per_image)
    rest = num_tokens % per_image
    if rest:
        grids.append((1, merge, merge * rest))
    return grids


def encode_dummy_images(model: nn.Module, device: torch.device, num_tokens: int) -> torch.Tensor | None:
    """Embeddings of dummy images that fill `num_tokens` (None: the model has no tower)."""
    if model.visual is None:
        return None
    vision = model.config.vision
    grids = dummy_image_grids(num_tokens, vision.spatial_merge_size)
    # float32 pixels, as the input processor gives them: the patch embedding casts them itself.
    pixels = torch.randn(sum(math.prod(g) for g in grids), vision.patch_dim, device=device)
    return torch.cat(model.encode_images(pixels, grids))


def _one_sequence(
    num_tokens: int, block_size: int, device: torch.device, backend: AttentionBackend
) -> AttentionMetadata:
    """One fresh sequence of `num_tokens`, all its blocks the scratch block 0."""
    table = [0] * -(-num_tokens // block_size)
    tensors = None
    if backend.needs_device_metadata:
        tensors = build_device_metadata([num_tokens], [num_tokens], [table], device)
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device) % block_size,
        query_starts=[0],
        query_lens=[num_tokens],
        seq_lens=[num_tokens],
        block_tables=[table],
        block_size=block_size,
        tensors=tensors,
    )
