"""The encode stage of an encoder-only instance: the `EncoderWorker` (epd.cluster.encoder_worker).

An instance that also prefills (EP, EPD) has no encode stage: its engine encodes its own
requests' images in-process (epd.cluster.instance.engine_host).
"""

from __future__ import annotations

from typing import Protocol

import torch

from epd.clock import Clock
from epd.cluster.encoder_worker import EncoderWorker
from epd.cluster.instance.config import InstanceConfig
from epd.cluster.instance.stage import Outbox, StageManager
from epd.cluster.messages import DestinationGone, EmbeddingNotSent, EncodeTask, ReleaseEmbedding
from epd.cluster.pixel_decoder import PixelDecoder
from epd.cluster.stats import mm_cache_stats
from epd.config import ModelConfig
from epd.engine.mm_cache import MMCache
from epd.models.loader import build_model
from epd.models.qwen2_vl import VISION
from epd.transfer.base import Connector, SendResult


class EncodeStage(StageManager):
    def __init__(self, worker: EncoderWorker, outbox: Outbox) -> None:
        self.worker, self.outbox = worker, outbox

    def on_message(self, msg: object) -> None:
        if isinstance(msg, EncodeTask):
            self.worker.add(msg)
        elif isinstance(msg, ReleaseEmbedding):
            self.worker.release(msg.content_hash, msg.dest)
        elif isinstance(msg, DestinationGone):
            self.worker.dest_gone(msg.dest)

    def not_sent(self, result: SendResult) -> None:
        """An embedding send (`mm:<hash>`) failed for good: no receipt will unpin that copy, so it
        is unpinned now, and the router has P ask again (a later send finds it cached here)."""
        content_hash = result.key.removeprefix("mm:")
        self.worker.release(content_hash, result.dest)
        error = result.error or "send failed"
        self.outbox.send(EmbeddingNotSent(self.worker.instance, content_hash, result.dest, error))

    def step(self) -> None:
        for done in self.worker.step():
            self.outbox.send(done)

    def has_work(self) -> bool:
        return bool(self.worker.has_work() or self.worker.done)

    def busy_requests(self) -> int:
        return len(self.worker.queue) + len(self.worker.done)  # done: reports not yet sent

    def stats(self) -> dict[str, float]:
        return {
            **mm_cache_stats(self.worker.cache),
            "encode_queue_images": len(self.worker.queue),
            "images_encoded_total": self.worker.num_encoded,
        }


class VisionFactory(Protocol):
    """Builds what an encoder-only instance encodes with: a module offering `encode_images` and
    `config.vision.spatial_merge_size` (as the model does), on `device`, reading time from `clock`."""

    def __call__(self, model: ModelConfig, device: torch.device, clock: Clock) -> torch.nn.Module: ...


def load_vision_tower(model: ModelConfig, device: torch.device, clock: Clock) -> torch.nn.Module:
    """The vision tower alone (no language weights), from the checkpoint."""
    return build_model(
        model.model,
        parts=frozenset({VISION}),
        dtype=model.torch_dtype,
        device=device,
        load_format=model.load_format,
        seed=model.seed,
    )


def build_encoder_worker(
    cfg: InstanceConfig,
    cache: MMCache,
    connector: Connector,
    decode_pixels: PixelDecoder,
    clock: Clock,
    vision: VisionFactory = load_vision_tower,
) -> EncoderWorker:
    """The vision tower `vision` builds (by default the checkpoint's) and its worker."""
    device = torch.device(cfg.engine.device)
    model = vision(cfg.engine.model, device, clock)
    return EncoderWorker(
        model,
        cache,
        connector,
        device,
        cfg.name,
        decode_pixels,
        cfg.max_encode_batch_patches,
        clock=clock,
        queue_policy=cfg.engine.scheduler.queue_policy("encode"),  # --scheduling-policy's encode stage
        vision_graphs=cfg.engine.vision_cuda_graphs,
    )
