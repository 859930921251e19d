"""Qwen3-VL (dense), split at the disaggregation boundary like Qwen2-VL (`qwen2_vl.py`).

Differences from Qwen2.5-VL: a Qwen3 language model (q/k RMSNorm per head, no q/k/v bias,
interleaved M-RoPE: `TextConfig`), a vision tower with a learned position embedding and
16-pixel patches (`qwen3_vl_vision.py`), and deepstack: the tower also merges the outputs of
a few of its blocks (`deepstack_visual_indexes`, k of them), and the LLM adds level i to its
hidden states at the image rows right after its layer i, for i < k.

Wire format: ONE tensor per image, so that the MM cache, the connectors and the transfer
code carry Qwen3-VL's embeddings exactly as Qwen2-VL's. The main embedding and the k deepstack
levels are concatenated along the hidden dim:

    encode_images -> per image [tokens, hidden * (1 + k)]
                     = [ main | level 0 | level 1 | ... | level k-1 ]   (each `hidden` wide)

`VLModelConfig.mm_embed_width` is that width: an MM cache holding these must be that wide.
`embed_tokens` splits the rows again: the main slice goes over the placeholder rows as for
Qwen2-VL, the levels travel to `forward` with the rows they belong to (`DeepstackInputs`).
A step without image rows gets a plain tensor, as from Qwen2-VL (decode, CUDA graphs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from epd.models.layers import fused
from epd.models.qwen2_llm import Qwen2Model
from epd.models.qwen2_vl import Qwen2VLForConditionalGeneration
from epd.models.qwen3_vl_vision import Qwen3VisionTransformer


class DeepstackInputs(NamedTuple):
    """What `embed_tokens` gives `forward` when the step has image rows."""

    embeds: torch.Tensor  # [tokens, hidden]: token embeddings, main image embeddings written over
    rows: torch.Tensor  # [image rows]: where the image rows sit in the flat batch
    levels: torch.Tensor  # [image rows, k, hidden]: level i is added after LLM layer i


class Qwen3Model(Qwen2Model):
    """The Qwen3 decoder (a Qwen2 one with the Qwen3 switches of `TextConfig`) that takes deepstack."""

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, deepstack: DeepstackInputs | None = None
    ) -> torch.Tensor:
        if deepstack is None:
            return super().forward(inputs_embeds, positions)
        cos, sin = self.rotary_emb(positions, inputs_embeds.dtype)
        x, residual = inputs_embeds, None
        hook = self._after_layer
        num_levels = deepstack.levels.shape[1]
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin)
            if i < num_levels:
                # The layer's output summed with the stream first, then the level added at the
                # image rows: transformers' order of additions, so fp32 results agree bit for bit.
                x = (residual + x).index_add_(0, deepstack.rows, deepstack.levels[:, i])
                residual = None
            if hook is not None:
                hook(i)
        if residual is None:
            return self.norm(x)
        return fused.add_rms_norm(x, residual, self.norm)[0]


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower_class = Qwen3VisionTransformer
    language_model_class = Qwen3Model

    def embed_tokens(
        self,
        input_ids: torch.Tensor,
        mm_embeds: torch.Tensor | None = None,
        mm_index: torch.Tensor | None = None,
    ) -> torch.Tensor | DeepstackInputs:
        """Token embeddings with the main image embeddings written over the placeholder rows
        (`mm_index[j]` takes `mm_embeds[j]`), and the deepstack levels of those rows."""
        if mm_embeds is None or not len(mm_embeds):
            return super().embed_tokens(input_ids)
        hidden = self.config.text.hidden_size
        if mm_embeds.shape[1] != self.config.mm_embed_width:
            raise ValueError(
                f"Qwen3-VL image rows are {self.config.mm_embed_width} wide (main + deepstack), "
                f"got {mm_embeds.shape[1]}"
            )
        embeds = super().embed_tokens(input_ids, mm_embeds[:, :hidden], mm_index)
        levels = mm_embeds[:, hidden:].unflatten(1, (-1, hidden)).to(embeds.dtype)
        return DeepstackInputs(embeds, mm_index, levels)

    def forward(self, inputs_embeds: torch.Tensor | DeepstackInputs, positions: torch.Tensor) -> torch.Tensor:
        if isinstance(inputs_embeds, DeepstackInputs):
            return self._language()(inputs_embeds.embeds, positions, inputs_embeds)
        return self._language()(inputs_embeds, positions)
