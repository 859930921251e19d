"""The shapes `epd profile` times: small grids per stage, sized for the device.

CUDA defaults span what a 7B model meets while serving on one H200 (decode batches up to the
largest graph, prefills up to 16k tokens a step, up to 8 images a vision batch) in about two
minutes of measuring. CPU defaults are for tiny models: a quick run takes seconds. Every grid is a
command-line option (epd.plan.profile.cli).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

Step = list[tuple[int, int]]  # (new, context) per sequence


@dataclass(frozen=True)
class Grids:
    decode_batches: tuple[int, ...]  # sequences per pure decode step
    decode_contexts: tuple[int, ...]  # context tokens of each sequence
    prefill_seqs: tuple[int, ...]  # sequences per prefill step
    prefill_tokens: tuple[int, ...]  # new tokens of each sequence
    prefill_contexts: tuple[int, ...]  # cached tokens of each sequence (prefix hits, chunks)
    mixed_decodes: tuple[int, ...]  # decodes riding along one prefill of each prefill_tokens size
    max_step_tokens: int  # prefill steps computing more new tokens are left out
    encode_images: tuple[int, ...]  # images per vision batch
    encode_sides: tuple[int, ...]  # pixels per side (square images; multiples of 28)
    max_encode_patches: int  # vision batches with more patches are left out
    transfer_mb: tuple[float, ...]  # payload sizes
    warmup: int  # untimed runs before each shape
    repeats: int  # timed runs per shape (the median is kept)

    def decode_steps(self, max_len: int) -> list[Step]:
        return [
            [(1, context)] * batch
            for context in self.decode_contexts
            for batch in self.decode_batches
            if context < max_len
        ]

    def prefill_steps(self, max_len: int) -> list[Step]:
        uniform = [
            [(new, context)] * seqs
            for seqs in self.prefill_seqs
            for new in self.prefill_tokens
            for context in self.prefill_contexts
            if seqs * new <= self.max_step_tokens and new + context <= max_len
        ]
        decode_context = self.decode_contexts[len(self.decode_contexts) // 2]
        mixed = [
            [(1, decode_context)] * decodes + [(new, 0)]
            for decodes in self.mixed_decodes
            for new in self.prefill_tokens
            if decodes + new <= self.max_step_tokens and max(new, decode_context + 1) <= max_len
        ]
        return uniform + mixed

    def encode_batches(self, patch_size: int = 14) -> list[list[tuple[int, int, int]]]:
        batches = []
        for side in self.encode_sides:
            grid = (1, side // patch_size, side // patch_size)
            for images in self.encode_images:
                if images * grid[1] * grid[2] <= self.max_encode_patches:
                    batches.append([grid] * images)
        return batches


CUDA = Grids(
    decode_batches=(1, 8, 32, 64, 128, 192, 256),
    decode_contexts=(512, 2048, 8192),
    prefill_seqs=(1, 2, 8),
    prefill_tokens=(32, 256, 1024, 4096, 8192),
    prefill_contexts=(0, 2048, 8192),
    mixed_decodes=(16, 64),
    max_step_tokens=16384,
    encode_images=(1, 2, 4, 8),
    encode_sides=(224, 448, 672, 896, 1344),
    max_encode_patches=65536,
    transfer_mb=(1, 16, 64, 256),
    warmup=2,
    repeats=5,
)

CPU = Grids(
    decode_batches=(1, 4, 16, 32),
    decode_contexts=(64, 256, 1024),
    prefill_seqs=(1, 4),
    prefill_tokens=(16, 64, 256, 1024),
    prefill_contexts=(0, 256),
    mixed_decodes=(4,),
    max_step_tokens=2048,
    encode_images=(1, 2, 4),
    encode_sides=(56, 112, 224),
    max_encode_patches=4096,
    transfer_mb=(0.0625, 1, 8),
    warmup=1,
    repeats=5,
)

QUICK = {  # --quick: fewer shapes and repetitions, for a first look or a test
    "cuda": dataclasses.replace(
        CUDA,
        decode_batches=(1, 32, 128, 256),
        decode_contexts=(512, 4096),
        prefill_seqs=(1, 4),
        prefill_tokens=(64, 1024, 4096),
        prefill_contexts=(0, 4096),
        mixed_decodes=(32,),
        encode_images=(1, 4),
        encode_sides=(448, 896, 1344),
        transfer_mb=(1, 64),
        warmup=1,
        repeats=3,
    ),
    "cpu": dataclasses.replace(
        CPU,
        decode_batches=(1, 8, 32),
        decode_contexts=(64, 512),
        prefill_tokens=(16, 128, 512),
        encode_images=(1, 4),
        transfer_mb=(0.0625, 1, 4),
        repeats=3,
    ),
}


def default_grids(device_type: str, quick: bool = False) -> Grids:
    """The grids for a device type ("cuda" or anything else: the CPU's)."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    if quick:
        return QUICK[kind]
    return CUDA if kind == "cuda" else CPU
