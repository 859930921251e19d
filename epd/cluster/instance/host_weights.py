"""Both parts of the model kept in host memory, so that an instance can add or drop E at run time.

An instance started with `switchable_roles` loads the whole checkpoint once (vision tower and
language model) into host memory, pinned when its device is a GPU. A role switch that needs a part
it does not hold builds that part from this copy: a host-to-device copy, not a disk read. On a CPU
device the host is the device: the part's parameters *are* the host tensors (no copy, no second
allocation), which is what "pinned" means there.

| what the instance holds now           | where the part's weights live                           |
|---------------------------------------|---------------------------------------------------------|
| the host copy (always, once started)  | host memory: every parameter of the checkpoint          |
| the vision tower (E)                  | the device: a copy of `visual.*` (CPU: the host tensors)|
| the language model (P, D)             | the device: a copy of the rest (CPU: the host tensors)  |

Dropping a part frees only its device copy; the host copy stays for the next switch, so switching
back and forth allocates no more host memory than the first time.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from epd.clock import Clock
from epd.config import EngineConfig, ModelConfig
from epd.engine.factory import ModelParts, parts_around
from epd.engine.mm_cache import MMCache
from epd.models.config import VLModelConfig
from epd.models.loader import build_model
from epd.models.qwen2_vl import ALL_PARTS, LANGUAGE, VISION
from epd.models.registry import get_model_class


class HostWeights:
    """The checkpoint's tensors in host memory, and the parts built from them on a device."""

    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        self.model_config, self.device = model, device
        # Dummy weights are drawn on the GPU and copied down: drawing 16 GB of them on the host
        # took minutes (epd.models.loader.init_dummy_weights), real ones are read on the host.
        on_gpu = device.type == "cuda" and model.load_format == "dummy"
        full = build_model(
            model.model,
            parts=ALL_PARTS,
            dtype=model.torch_dtype,
            device=device if on_gpu else "cpu",
            load_format=model.load_format,
            seed=model.seed,
        )
        self.tensors = _pinned(full.state_dict()) if device.type == "cuda" else full.state_dict()
        del full  # on a GPU: its memory goes back before the instance sizes its caches
        if on_gpu:
            torch.cuda.empty_cache()
        self.copy_seconds = 0.0  # of the last part built: the "weights" phase of a switch

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def build(self, parts: frozenset[str]) -> nn.Module:
        """The model holding only `parts`, on the device, its weights from the host copy."""
        config = VLModelConfig.from_pretrained(self.model_config.model)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.model_config.torch_dtype)
        try:
            with torch.device(self.device):
                model = get_model_class(config.architecture)(config, parts=parts)
        finally:
            torch.set_default_dtype(previous)
        started = time.perf_counter()
        wanted = {name: self.tensors[name] for name in model.state_dict()}
        # On the CPU the host tensors become the parameters (nothing copied); on a GPU they are
        # copied into the parameters just allocated there.
        model.load_state_dict(wanted, strict=True, assign=self.device.type == "cpu")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.copy_seconds = time.perf_counter() - started
        return model.eval().requires_grad_(False)

    def vision_tower(self, model: ModelConfig, device: torch.device, clock: Clock) -> nn.Module:
        """A `VisionFactory` (epd.cluster.instance.encode_stage) over the host copy."""
        return self.build(frozenset({VISION}))

    def model_parts(
        self,
        config: EngineConfig,
        *,
        encode_locally: bool,
        mm_cache: MMCache | None,
        clock: Clock,
        instance: str | None,
    ) -> ModelParts:
        """A `PartsFactory` (epd.engine.factory) over the host copy: as `load_model_parts`, with the
        model built from host memory instead of read from the checkpoint."""
        model = self.build(ALL_PARTS if encode_locally else frozenset({LANGUAGE}))
        return parts_around(
            model, config, encode_locally=encode_locally, mm_cache=mm_cache, clock=clock, instance=instance
        )


def _pinned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Page-locked copies (the copy to the device runs at full speed), one per tensor shared by
    several names (tied embeddings stay one tensor)."""
    by_storage: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        key = tensor.untyped_storage().data_ptr()
        if key not in by_storage:  # from the host or from the GPU it was drawn on
            by_storage[key] = torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor)
        out[name] = by_storage[key]
    return out
