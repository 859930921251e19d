"""Where a prefill gets its image embeddings from: one strategy object per instance.

- `LocalEncoder`: the instance holds the vision tower (roles E+P): encode here, packed.
- `CachedEmbeddings`: the embeddings arrived from an encoder instance into the MM cache.
The model runner calls `ensure()` the same way for both; no `if encoder_is_local:` in the loop.

With chunked prefill a prompt is computed over several steps: `ensure` is given where each
request's tokens end this step, and fills only the images that start before that end. An image
is encoded (or fetched) once, in the first step that reaches it, and kept in the request
(`image_embeds`) for the steps after, and for a recompute after preemption.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from epd.clock import Clock
from epd.engine.mm_cache import MMCache
from epd.engine.request import Request
from epd.inputs.types import ImageInput
from epd.lifetime import Event


class ImageEmbedder(ABC):
    @abstractmethod
    def ensure(self, requests: list[Request], ends: list[int] | None = None) -> None:
        """Fill `req.image_embeds[i]` for every image with tokens still to be computed before
        `ends[k]`, the end of this step's tokens of `requests[k]` (None: all its tokens)."""

    @abstractmethod
    def can_recompute(self, request: Request) -> bool:
        """Whether a preempted request's prompt can be recomputed here (else its KV is swapped out)."""


def _missing(requests: list[Request], ends: list[int] | None) -> list[tuple[Request, int]]:
    """(request, image index) of the images `ensure` must fill, in prompt order."""
    return [
        (req, i)
        for k, req in enumerate(requests)
        for i, ph in enumerate(req.prompt.placeholders)
        if req.image_embeds[i] is None
        and ph.end > req.num_computed_tokens
        and (ends is None or ph.offset < ends[k])
    ]


class LocalEncoder(ImageEmbedder):
    def __init__(
        self, model: torch.nn.Module, device: torch.device, clock: Clock, instance: str | None = None
    ) -> None:
        self.model, self.device, self.clock, self.instance = model, device, clock, instance

    def ensure(self, requests: list[Request], ends: list[int] | None = None) -> None:
        todo = _missing(requests, ends)
        if not todo:
            return
        images = [req.prompt.images[i] for req, i in todo]
        started = self.clock.now()
        for req, i in todo:
            req.record(Event.ENCODE_START, started, self.instance, i)
        embeds = self.encode(images)
        ended = self.clock.now()
        for (req, i), emb in zip(todo, embeds):
            req.image_embeds[i] = emb
            req.record(Event.ENCODE_END, ended, self.instance, i)

    def encode(self, images: list[ImageInput], tower: Callable | None = None) -> list[torch.Tensor]:
        """The images' embeddings, one tensor each (their patches uploaded, the tower run, or
        `tower` instead: its CUDA graphs, epd.models.vision_graphs). Called without a tower when
        none is given: the scripted runner's stand-in model takes none."""
        pixels = torch.cat([img.pixel_values for img in images]).to(self.device)
        grids = [img.grid_thw for img in images]
        return (
            self.model.encode_images(pixels, grids)
            if tower is None
            else self.model.encode_images(pixels, grids, tower)
        )

    def can_recompute(self, request: Request) -> bool:
        return True


class CachedEmbeddings(ImageEmbedder):
    """Reads embeddings that an encoder instance sent into this instance's MM cache.

    The instance admits a request to the scheduler only once all its images are cached
    (and pinned for it until its first token, so its later prefill chunks find them too),
    so a miss here is a bug, not a wait.
    """

    def __init__(self, cache: MMCache) -> None:
        self.cache = cache

    def ensure(self, requests: list[Request], ends: list[int] | None = None) -> None:
        for req, i in _missing(requests, ends):
            req.image_embeds[i] = self.cache.get(req.prompt.images[i].content_hash)

    def can_recompute(self, request: Request) -> bool:
        return all(
            emb is not None or img.content_hash in self.cache
            for emb, img in zip(request.image_embeds, request.prompt.images)
        )


class NoEmbeddings(ImageEmbedder):
    """A decode-only instance: prompts arrive with their KV computed, never as images."""

    def ensure(self, requests: list[Request], ends: list[int] | None = None) -> None:
        missing = _missing(requests, ends)
        if missing:
            raise RuntimeError(
                f"request {missing[0][0].request_id} needs image embeddings on a decode-only instance"
            )

    def can_recompute(self, request: Request) -> bool:
        return not request.prompt.images
