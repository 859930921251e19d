"""The fitted cost model the simulator runs on: `ComputeCosts` (epd.engine.scripted_runner).

Which model prices a step follows the path the real runner (epd.engine.model_runner) takes:
- a pure decode step (every sequence one new token past its prompt) that a captured CUDA graph
  holds: the decode model, at the graph's padded batch size; where the device has no graphs
  (CPU), pure decode steps were measured eagerly and use the decode model too;
- anything else (prefills, chunks, decodes riding along with them, a decode batch larger than
  every graph) runs eagerly: the prefill model, decodes counted as one-token sequences.
Vision batches: the encode model. Image rows in a prefill cost what text rows cost (the
embeddings were made by the encoder; writing them in is a copy).

A tensor-parallel instance (`@tpN`) prices its steps with the prefill and decode models fitted at
its degree (`at_degree`; a profile made with `epd profile --tp 1,N`) and its vision batches with
the degree-1 encode model (the tower runs whole on rank 0 at every degree).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epd.plan.profile.features import decode_terms, encode_terms, pad_to_graph, prefill_terms
from epd.plan.profile.fit import StageFit

if TYPE_CHECKING:
    from epd.engine.scheduler import ScheduledBatch


@dataclass(frozen=True)
class DegreeFits:
    """The step models of one tensor-parallel degree > 1."""

    prefill: StageFit
    decode: StageFit
    graph_sizes: tuple[int, ...] = ()  # (): no graphs at this degree


@dataclass(frozen=True)
class ProfileCosts:
    prefill: StageFit
    decode: StageFit
    encode: StageFit
    graph_sizes: tuple[int, ...] = ()  # (): the device replays no graphs
    # The step models of the other tensor-parallel degrees measured, by degree.
    parallel: Mapping[int, DegreeFits] = field(default_factory=dict, hash=False)

    def at_degree(self, degree: int) -> ProfileCosts:
        """The costs of an instance of tensor-parallel `degree` (these ones at 1); ValueError for a
        degree the profile did not measure."""
        if degree == 1:
            return self
        fits = self.parallel.get(degree)
        if fits is None:
            measured = ", ".join(map(str, (1, *sorted(self.parallel))))
            raise ValueError(
                f"the profile has no costs at tensor-parallel degree {degree} (measured: {measured}); "
                f"measure them with `epd profile --tp 1,{degree}`"
            )
        return ProfileCosts(fits.prefill, fits.decode, self.encode, fits.graph_sizes)

    def step_seconds(self, batch: ScheduledBatch) -> float:
        """One engine forward over `batch`."""
        seqs = [(n, req.num_computed_tokens) for req, n in zip(batch.requests, batch.num_new_tokens)]
        if _is_pure_decode(batch):
            padded = pad_to_graph(self.graph_sizes)(len(seqs))
            if padded is not None or not self.graph_sizes:
                return self.decode.predict(decode_terms(seqs, padded))
        return self.prefill.predict(prefill_terms(seqs))

    def encode_seconds(self, grids: Sequence[tuple[int, int, int]]) -> float:
        """One vision batch of images with these patch grids."""
        return self.encode.predict(encode_terms(grids))


@dataclass(frozen=True)
class ProfileHostCosts:
    """The host CPU's work around the model (epd.sim.host_costs.HostCosts), from fits of
    epd.plan.profile.measure_host's timings."""

    front_end: StageFit
    patches: StageFit

    def front_end_seconds(self, image_pixels: Sequence[int]) -> float:
        """The API process's work on a request whose images have these pixel counts."""
        return self.front_end.predict([1.0, float(len(image_pixels)), float(sum(image_pixels))])

    def patches_seconds(self, pixels: int, grid: tuple[int, int, int]) -> float:
        """One image file of `pixels` pixels -> its uint8 patches of `grid`."""
        t, h, w = grid
        return self.patches.predict([1.0, float(pixels), float(t * h * w)])


def _is_pure_decode(batch: ScheduledBatch) -> bool:
    """The runner's test for a graph step: one new token per request, past its prompt."""
    return len(batch) > 0 and all(
        n == 1 and req.num_computed_tokens >= req.num_prompt_tokens
        for req, n in zip(batch.requests, batch.num_new_tokens)
    )
