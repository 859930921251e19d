"""Which share of each Hugging Face weight of the Qwen2 language model a tensor-parallel rank holds.

Megatron's split: each attention layer's heads and each MLP's intermediate columns are divided
among the ranks, so a rank computes its heads (and their KV) and its MLP columns from the whole
hidden state, and the two projections back to the hidden size (o_proj, down_proj) give partial
sums that one all-reduce per sublayer adds up. Everything else is replicated.

| HF weight (per layer unless named)     | split       | dim | pieces                                   |
|----------------------------------------|-------------|-----|------------------------------------------|
| self_attn.q_proj .weight/.bias         | query heads | 0   | world size                               |
| self_attn.k_proj, v_proj .weight/.bias | kv heads    | 0   | min(world, kv heads): with fewer kv heads|
|                                        |             |     | than ranks, world / kv ranks share one   |
| self_attn.o_proj.weight                | its input   | 1   | world size (row-parallel: partial sums)  |
| mlp.gate_proj, up_proj .weight         | its output  | 0   | world size                               |
| mlp.down_proj.weight                   | its input   | 1   | world size (row-parallel: partial sums)  |
| norms, q_norm/k_norm (Qwen3)           | replicated  |     |                                          |
| lm_head.weight                         | vocabulary  | 0   | world size, when the vocabulary divides  |
|                                        |             |     | (else replicated); all-gathered logits   |
| model.embed_tokens                     | replicated  |     | (a tied head reads its rows of it)       |
| visual.* (the vision tower)            | replicated  |     | (or split by heads and MLP columns when |
|                                        |             |     |  asked: epd.parallel.vision's table)     |

Rank r takes piece `r * pieces // world` of a tensor cut into `pieces` equal parts along `dim`:
piece r when every rank has its own, and the kv head of r's query heads when ranks share one
(query head i attends with kv head i // (heads / kv heads); r's heads all fall in one group).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from epd.models.config import TextConfig, VisionConfig, VLModelConfig

_COLUMN, _ROW = 0, 1
_VISION_PREFIXES = ("visual.", "vision_tower.", "multi_modal_projector.")


@dataclass(frozen=True)
class Split:
    """A tensor cut into `pieces` equal parts along `dim`; a rank keeps one."""

    dim: int
    pieces: int

    def piece(self, rank: int, world_size: int) -> int:
        return rank * self.pieces // world_size

    def take(self, full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        size = full.shape[self.dim]
        if size % self.pieces:
            raise ValueError(f"cannot cut {size} rows of dim {self.dim} into {self.pieces} equal pieces")
        length = size // self.pieces
        return full.narrow(self.dim, self.piece(rank, world_size) * length, length)


@dataclass(frozen=True)
class HeadSplit:
    """The attention heads one rank of `world_size` holds (all of them on a single device)."""

    total_heads: int
    total_kv_heads: int
    world_size: int = 1

    def __post_init__(self) -> None:
        heads, kv, world = self.total_heads, self.total_kv_heads, self.world_size
        if heads % world:
            raise ValueError(f"{heads} attention heads cannot be split over {world} ranks")
        if (kv % world) if kv >= world else (world % kv):
            raise ValueError(
                f"{kv} kv heads cannot be split over {world} ranks "
                "(the kv heads must divide among the ranks, or the ranks among the kv heads)"
            )

    @property
    def kv_pieces(self) -> int:
        """How many ways K and V are cut: by kv head, but never finer than one head."""
        return min(self.world_size, self.total_kv_heads)

    @property
    def num_heads(self) -> int:
        return self.total_heads // self.world_size

    @property
    def num_kv_heads(self) -> int:
        return self.total_kv_heads // self.kv_pieces

    def kv_piece(self, rank: int) -> int:
        """Which piece of the kv heads `rank` holds (ranks sharing a kv head hold the same one)."""
        return self.kv_split().piece(rank, self.world_size)

    def kv_holders(self) -> list[int]:
        """One rank per kv piece, in head order: the first rank holding each (what a gather of the
        whole KV takes from: the ranks that share a head hold the same values)."""
        return [piece * self.world_size // self.kv_pieces for piece in range(self.kv_pieces)]

    def q_split(self) -> Split:
        return Split(_COLUMN, self.world_size)

    def kv_split(self) -> Split:
        return Split(_COLUMN, self.kv_pieces)


def intermediate_split(text: TextConfig, world_size: int) -> Split:
    if text.intermediate_size % world_size:
        raise ValueError(f"MLP width {text.intermediate_size} cannot be split over {world_size} ranks")
    return Split(_COLUMN, world_size)


def split_of(hf_name: str, text: TextConfig, world_size: int) -> Split | None:
    """How the language-model weight `hf_name` (a checkpoint name) is split; None: replicated."""
    if any(tower in hf_name for tower in _VISION_PREFIXES):
        return None  # the vision towers have MLPs named like the decoder's
    heads = HeadSplit(text.num_attention_heads, text.num_key_value_heads, world_size)
    if ".self_attn.q_proj." in hf_name:
        return heads.q_split()
    if ".self_attn.k_proj." in hf_name or ".self_attn.v_proj." in hf_name:
        return heads.kv_split()
    if ".self_attn.o_proj." in hf_name:
        return Split(_ROW, world_size)
    if ".mlp.gate_proj." in hf_name or ".mlp.up_proj." in hf_name:
        return intermediate_split(text, world_size)
    if ".mlp.down_proj." in hf_name:
        return Split(_ROW, world_size)
    if hf_name.endswith("lm_head.weight") and text.vocab_size % world_size == 0:
        return Split(_COLUMN, world_size)
    return None


def check_splittable(text: TextConfig, world_size: int) -> None:
    """A clear error, before anything is built, when the decoder cannot be split `world_size` ways."""
    HeadSplit(text.num_attention_heads, text.num_key_value_heads, world_size)
    intermediate_split(text, world_size)


def check_vision_splittable(vision: VisionConfig, world_size: int) -> None:
    """A clear error, before anything is built, when the vision tower cannot be split `world_size`
    ways (epd.parallel.vision): by attention heads, and the MLP by columns."""
    if vision.num_heads % world_size:
        raise ValueError(
            f"the vision tower's {vision.num_heads} heads cannot be split over {world_size} ranks"
        )
    if vision.intermediate_size % world_size:
        raise ValueError(
            f"the vision tower's MLP width {vision.intermediate_size} cannot be split over {world_size} ranks"
        )


def rank_config(config: VLModelConfig, world_size: int) -> VLModelConfig:
    """The model config as one rank sees its share: its heads, kv heads and MLP width; the rest
    (hidden size, vocabulary, layers, head size, the vision tower) whole. What the KV cache and
    the memory profile read (`model.config.text`), so they size for this rank's kv heads."""
    text = config.text
    heads = HeadSplit(text.num_attention_heads, text.num_key_value_heads, world_size)
    local = replace(
        text,
        num_attention_heads=heads.num_heads,
        num_key_value_heads=heads.num_kv_heads,
        intermediate_size=text.intermediate_size // world_size,
        explicit_head_dim=text.head_dim,  # hidden / heads would no longer give it
    )
    return replace(config, text=local)
