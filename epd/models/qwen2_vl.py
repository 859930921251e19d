"""Qwen2-VL and Qwen2.5-VL, split at the disaggregation boundary.

    encode_images(patches, grids)            -> per-image embeddings     (all E needs: `visual`)
    embed_tokens(ids, mm_embeds, mm_index)   -> inputs_embeds            (P and D: `model`, `lm_head`)
    forward(inputs_embeds, positions)        -> hidden states
    compute_logits(hidden)                   -> logits

An instance builds only the parts its roles need (`parts`), and the weight map skips
checkpoint tensors of the parts it does not hold: an encoder-only instance never
allocates LLM weights, and the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from epd.models.config import VLModelConfig
from epd.models.qwen2_llm import Qwen2Model
from epd.models.qwen2_vl_vision import VisionTransformer
from epd.parallel.linear import lm_head_linear

VISION = "vision"
LANGUAGE = "language"
ALL_PARTS = frozenset({VISION, LANGUAGE})

# Checkpoint projection -> (our fused module, shard id inside it).
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

# transformers >= 4.52 nests the parts under `model.`; original checkpoints do not.
_CHECKPOINT_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


class Qwen2VLForConditionalGeneration(nn.Module):
    # What a subclass swaps to serve another generation (Qwen3-VL).
    vision_tower_class: type[nn.Module] = VisionTransformer
    language_model_class: type[Qwen2Model] = Qwen2Model

    def __init__(self, config: VLModelConfig, parts: frozenset[str] = ALL_PARTS) -> None:
        super().__init__()
        self.config = config
        self.parts = frozenset(parts)
        self.visual = self.vision_tower_class(config.vision) if VISION in parts else None
        self.model = self.language_model_class(config.text) if LANGUAGE in parts else None
        self.lm_head = None
        if LANGUAGE in parts:
            text = config.text
            tied = self.model.embed_tokens if text.tie_word_embeddings else None
            self.lm_head = lm_head_linear(text.hidden_size, text.vocab_size, tied)

    # ---- encoder side -------------------------------------------------------------------------

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        grids: Sequence[tuple[int, int, int]],
        tower: Callable[[torch.Tensor, Sequence[tuple[int, int, int]]], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Packed patches of several images -> one [tokens_i, llm_hidden] tensor per image.
        `tower`: what runs the vision tower instead of calling it (its CUDA graphs:
        epd.models.vision_graphs)."""
        if self.visual is None:
            raise RuntimeError("this instance holds no vision weights")
        merged = (tower if tower is not None else self.visual)(pixel_values, grids)
        merge = self.config.vision.spatial_merge_size**2
        return list(merged.split([t * h * w // merge for t, h, w in grids]))

    # ---- language side ------------------------------------------------------------------------

    def embed_tokens(
        self,
        input_ids: torch.Tensor,
        mm_embeds: torch.Tensor | None = None,
        mm_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image embeddings written over the placeholder rows.

        `mm_index[j]` is the row of the flat batch that takes `mm_embeds[j]`.
        """
        embeds = self._language().embed_tokens(input_ids)
        if mm_embeds is not None and len(mm_embeds):
            embeds = embeds.index_copy(0, mm_index, mm_embeds.to(embeds.dtype))
        return embeds

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._language()(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._language()
        return self.lm_head(hidden)

    def _language(self) -> Qwen2Model:
        if self.model is None:
            raise RuntimeError("this instance holds no language-model weights")
        return self.model

    # ---- weights ------------------------------------------------------------------------------

    def map_weight_name(self, checkpoint_name: str) -> tuple[str, object] | None:
        """Checkpoint tensor name -> (our parameter name, shard id), or None to skip it."""
        name = checkpoint_name
        for old, new in _CHECKPOINT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
        part = VISION if name.startswith("visual.") else LANGUAGE
        if part not in self.parts or "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.config.text.tie_word_embeddings:
            return None  # tied: the embedding is the head
        for ckpt, (fused, shard) in PACKED_MODULES.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{fused}."), shard
        return name, None
