"""What each stage's cost is a linear function of: the terms of the fitted cost models.

A measured (or simulated) step is described by its shape; each stage turns a shape into one number
per term, and its cost is sum(coefficient * term) with every coefficient >= 0 (epd.plan.profile.fit).

| stage    | shape                           | terms and why                                            |
|----------|---------------------------------|----------------------------------------------------------|
| prefill  | (new, context) per sequence:    | step: launches, host work; token: every matmul of every  |
| (eager   | any step the runner runs        | new token; attention_pair: each new token attends to     |
|  steps)  | eagerly (prefills, chunks, and  | its context and the new tokens before it; sequence:      |
|          | decodes mixed with them)        | per-sequence work (LM head row, metadata)                |
| decode   | (1, context) per sequence: a    | step: weights read once per step; sequence: per row      |
|          | pure decode step (a CUDA graph  | (padded up to the graph's size: padding rows compute);   |
|          | replay where the device has     | context_token: every KV row read                         |
|          | them)                           |                                                          |
| encode   | (t, h, w) patch grid per image  | batch: launches; image: per-image layout work; patch:    |
|          |                                 | matmuls per patch; patch_pair: full-attention blocks,    |
|          |                                 | quadratic within each image (windowed blocks are linear) |
| transfer | payload bytes                   | latency: the fixed cost; byte: 1 / bandwidth             |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Sequences = Sequence[tuple[int, int]]  # (new tokens, context tokens) per sequence of a step
Grid = tuple[int, int, int]
# How shapes are stored (epd.plan.profile.store): runs of equal items, [count, *item], so that a
# decode of 256 sequences is one row: [[256, 1, 4096]].
Runs = Sequence[Sequence[int]]

PREFILL_TERMS = ("step", "token", "attention_pair", "sequence")
DECODE_TERMS = ("step", "sequence", "context_token")
ENCODE_TERMS = ("batch", "image", "patch", "patch_pair")
TRANSFER_TERMS = ("latency", "byte")
# The host CPU (epd.plan.profile.measure_host): decoding scales with the file's pixels, resizing and
# patchifying with the patches made.
FRONT_END_TERMS = ("request", "image", "pixel")
PATCHES_TERMS = ("image", "pixel", "patch")

TERMS: dict[str, tuple[str, ...]] = {
    "prefill": PREFILL_TERMS,
    "decode": DECODE_TERMS,
    "encode": ENCODE_TERMS,
    "transfer": TRANSFER_TERMS,
    "front_end": FRONT_END_TERMS,
    "patches": PATCHES_TERMS,
}


def prefill_terms(seqs: Sequences) -> list[float]:
    # A new token at position p sees p + 1 keys: sequence i's new tokens see
    # context_i + 1 .. context_i + new_i of them.
    pairs = sum(new * context + new * (new + 1) / 2 for new, context in seqs)
    return [1.0, float(sum(new for new, _ in seqs)), float(pairs), float(len(seqs))]


def decode_terms(seqs: Sequences, padded_batch: int | None = None) -> list[float]:
    """`padded_batch`: the batch size the step really computes (a CUDA graph's size), if larger."""
    rows = max(len(seqs), padded_batch or 0)
    return [1.0, float(rows), float(sum(new + context for new, context in seqs))]


def encode_terms(grids: Sequence[Grid]) -> list[float]:
    patches = [t * h * w for t, h, w in grids]
    return [1.0, float(len(patches)), float(sum(patches)), float(sum(p * p for p in patches))]


def transfer_terms(nbytes: int) -> list[float]:
    return [1.0, float(nbytes)]


def pad_to_graph(graph_sizes: Sequence[int]) -> Callable[[int], int | None]:
    """The batch size a pure decode of n sequences replays at (None: no graph holds it, or none exist)."""

    def padded(n: int) -> int | None:
        return next((size for size in sorted(graph_sizes) if size >= n), None)

    return padded


def as_runs(items: Sequence[Sequence[int]]) -> list[list[int]]:
    """[a, a, b] -> [[2, *a], [1, *b]]: consecutive equal items counted."""
    runs: list[list[int]] = []
    for item in items:
        if runs and runs[-1][1:] == list(item):
            runs[-1][0] += 1
        else:
            runs.append([1, *item])
    return runs


def from_runs(runs: Runs) -> list[tuple[int, ...]]:
    return [tuple(run[1:]) for run in runs for _ in range(run[0])]


def terms_of(stage: str, shape: object, graph_sizes: Sequence[int] = ()) -> list[float]:
    """The term values of one stored measurement shape (epd.plan.profile.store) of `stage`."""
    if stage == "prefill":
        return prefill_terms(from_runs(shape))
    if stage == "decode":
        seqs = from_runs(shape)
        return decode_terms(seqs, pad_to_graph(graph_sizes)(len(seqs)))
    if stage == "encode":
        return encode_terms(from_runs(shape))
    if stage == "transfer":
        return transfer_terms(int(shape))
    if stage == "front_end":  # [images, pixels of each]: one size per request
        count, pixels = shape
        return [1.0, float(count), float(count * pixels)]
    if stage == "patches":  # [pixels, t, h, w]
        pixels, t, h, w = shape
        return [1.0, float(pixels), float(t * h * w)]
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(TERMS)}")
