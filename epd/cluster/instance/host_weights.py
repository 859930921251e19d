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

import logging
import time
import weakref

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

logger = logging.getLogger(__name__)

PAGE = 4096  # each tensor's copy starts on a page of its own


class HostWeights:
    """The checkpoint's tensors in host memory, and the parts built from them on a device."""

    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        self.model_config, self.device = model, device
        # Dummy weights are drawn on the GPU and copied down: drawing 16 GB of them on the host
        # took minutes (epd.models.loader.init_dummy_weights), real ones are read on the host.
        on_gpu = device.type == "cuda" and model.load_format == "dummy"
        started = time.perf_counter()
        full = build_model(
            model.model,
            parts=ALL_PARTS,
            dtype=model.torch_dtype,
            device=device if on_gpu else "cpu",
            load_format=model.load_format,
            seed=model.seed,
        )
        if on_gpu:
            torch.cuda.synchronize(device)
        loaded = time.perf_counter()
        if device.type == "cuda":
            self.tensors, buffer = _pinned(full.state_dict())
            # Unregistered before the buffer can go: memory freed while still registered stays
            # locked. Not at exit: the CUDA context may be gone by then, and exit frees it anyway.
            weakref.finalize(self, _unregister, buffer).atexit = False
        else:
            self.tensors = full.state_dict()
        del full  # on a GPU: its memory goes back before the instance sizes its caches
        if on_gpu:
            torch.cuda.empty_cache()
        logger.info(
            "host copy of the weights: %.1f GB, %s in %.1f s, %s in %.1f s",
            self.nbytes / 1e9,
            f"drawn on {device}" if on_gpu else "loaded",
            loaded - started,
            "pinned and copied" if device.type == "cuda" else "kept",
            time.perf_counter() - loaded,
        )
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
        copied = sum(t.numel() * t.element_size() for t in wanted.values())
        logger.info("built %s on %s from the host copy: %.2f GB in %.3f s", "+".join(sorted(parts)),
                    self.device, copied / 1e9, self.copy_seconds)  # fmt: skip
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


def _pinned(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Page-locked copies of `tensors`, views of one host buffer of their exact size (tied names
    stay one tensor), and that buffer.

    Not a pinned tensor each (`pin_memory=True`): torch's pinned allocator rounds every allocation
    up to a power of two, which took the 7B shape's 16.6 GB of weights to 31.1 GB of locked
    memory per instance, and its cudaHostAlloc faults the pages in on one thread. Here the pages
    are faulted in by a fill on every intra-op thread, then the buffer is registered with CUDA."""
    offsets: dict[tuple, int] = {}  # one copy per distinct tensor, however many names it has
    total = 0
    for tensor in tensors.values():
        if _identity(tensor) not in offsets:
            offsets[_identity(tensor)] = total
            total += -(-_nbytes(tensor) // PAGE) * PAGE  # aligned for any dtype's view
    buffer = torch.empty(total + PAGE, dtype=torch.uint8)  # the allocator aligns to 64 bytes only
    buffer.zero_()  # faults every page in, in parallel: cudaHostRegister would, on one thread
    try:
        _register(buffer)
    except (RuntimeError, AttributeError) as exc:  # still correct unpinned: copies run slower
        logger.warning("host copy of the weights left unpinned: %s", exc)
    first_page = -buffer.data_ptr() % PAGE
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        key = _identity(tensor)
        if key not in copies:  # from the host or from the GPU it was drawn on
            start = first_page + offsets[key]
            view = buffer[start : start + _nbytes(tensor)].view(tensor.dtype).view(tensor.shape)
            copies[key] = view.copy_(tensor)
        out[name] = copies[key]
    return out, buffer


def _identity(tensor: torch.Tensor) -> tuple:
    """Two names hold the same tensor (tied weights) when they see the same memory the same way."""
    return tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _register(buffer: torch.Tensor) -> None:
    """Page-lock `buffer` for every CUDA context (cudaHostRegisterPortable)."""
    error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), _nbytes(buffer), 1))
    if error != 0:
        raise RuntimeError(
            f"cudaHostRegister of {_nbytes(buffer) / 1e9:.1f} GB of host memory failed: error {error}"
        )


def _unregister(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())  # an error if never registered: harmless
