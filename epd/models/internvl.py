"""InternVL in transformers' format (`InternVLForConditionalGeneration`, the "-hf" checkpoints:
InternVL2.5 / InternVL3 with a Qwen2 LLM), split at the disaggregation boundary like Qwen2-VL:

    encode_images(patches, grids)          -> per-image embeddings   (`visual`: InternViT, pixel
                                                                      shuffle, MLP projector)
    embed_tokens / forward / compute_logits                          (`model`: Qwen2, `lm_head`)

Positions. InternVL's LLM uses plain 1-D RoPE: the i-th token of a prompt is at position i,
image tokens included. The engine gives every model M-RoPE rows (t, h, w) from each image's
grid (epd.models.mrope); an InternVL image's grid is a strip one row tall, (1, m, m * tokens)
(epd.inputs.internvl_tiles), on which the width row numbers the image's tokens one after the
other and the text after it resumes right behind them, exactly as 1-D positions do:

    tokens:        t  t  <img>  I  I  I  I  </img>  t
    width row:     0  1  2      3  4  5  6  7       8      (= the token's index)
    t, h rows:     0  1  2      3  3  3  3  7       8

The LLM's rotary reads the width row for every frequency band (`mrope_section` (0, 0, d/2),
set by `VLModelConfig`), which makes it transformers' Qwen2 RoPE; the decode delta is 0.

Checkpoint names: as saved (`vision_tower.`, `multi_modal_projector.`, `language_model.model.`,
`language_model.lm_head.`) or as transformers 5 names them in memory (`model.vision_tower.`, ...).
"""

from __future__ import annotations

from epd.models.internvl_vision import InternVLVisual
from epd.models.qwen2_vl import Qwen2VLForConditionalGeneration

# Checkpoint prefix -> ours. `visual` holds the tower and the projector: all an encoder loads.
_CHECKPOINT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("vision_tower.", "visual.vision_tower."),
    ("model.vision_tower.", "visual.vision_tower."),
    ("multi_modal_projector.", "visual.multi_modal_projector."),
    ("model.multi_modal_projector.", "visual.multi_modal_projector."),
)


class InternVLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower_class = InternVLVisual

    def map_weight_name(self, checkpoint_name: str) -> tuple[str, object] | None:
        """Checkpoint tensor name -> (our parameter name, shard id), or None to skip it."""
        for old, new in _CHECKPOINT_PREFIXES:
            if checkpoint_name.startswith(old):
                return super().map_weight_name(new + checkpoint_name[len(old) :])
        return super().map_weight_name(checkpoint_name)
