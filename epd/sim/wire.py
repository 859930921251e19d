"""What a simulated transfer is charged: the bytes the real model's transfer would move.

The scripted compute's tensors are stand-ins (epd.engine.scripted_runner): its KV is one number per
token slot and one layer, not every layer, head and channel. The memory network charges each send
`latency + bytes / bandwidth`, so it must be told the real bytes:

| transfer key       | real bytes                                                              |
|--------------------|-------------------------------------------------------------------------|
| `mm:<hash>`        | image tokens x embedding width (mm_embed_width) x dtype size            |
| `kv:<rid>`         | tokens x (layers x 2 x kv_heads x head_dim x dtype size): the whole KV  |
| `kvl:<rid>:<i>`    | the same: the scripted runner has one layer, so its one part is all     |
| anything else      | what its tensors hold (a generator state, an empty discard notice)      |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epd.cluster.kv_handoff import KV_KEY, LAYER_KEY
from epd.config import ModelConfig
from epd.engine.kv_cache import bytes_per_block
from epd.transfer.memory import tensor_bytes

MM_KEY = "mm:"


@dataclass(frozen=True)
class ModelWireBytes:
    embed_bytes_per_token: int
    kv_bytes_per_token: int

    @classmethod
    def of(cls, model: ModelConfig) -> ModelWireBytes:
        elem = torch.tensor([], dtype=model.torch_dtype).element_size()
        kv = bytes_per_block(model.hf.text, 1, model.torch_dtype)
        return cls(model.hf.mm_embed_width * elem, kv)

    def __call__(self, key: str, tensors: dict[str, torch.Tensor]) -> int:
        if key.startswith(MM_KEY):
            return tensors["embeds"].shape[0] * self.embed_bytes_per_token
        kv = tensors.get("kv")
        if kv is not None and key.startswith((KV_KEY, LAYER_KEY)):
            # [layers, 2, tokens, heads, dim] whole, [2, tokens, heads, dim] per layer
            rest = {name: t for name, t in tensors.items() if name != "kv"}  # a generator state
            return kv.shape[-3] * self.kv_bytes_per_token + tensor_bytes(key, rest)
        return tensor_bytes(key, tensors)
