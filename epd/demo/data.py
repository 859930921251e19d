"""Training batches for the demo model, made the way epd serves: chat template, epd's preprocessing.

A sample goes through `InputProcessor.process_chat` (the checkpoint's chat template with
the generation prompt, epd's image preprocessing, image pads expanded), then the target
`answer + <|im_end|>` is appended. Only target positions carry labels, so the loss teaches
the answer and nothing else. M-RoPE positions come from `epd.models.mrope` (checked
against transformers' `get_rope_index` elsewhere) and are passed to the model explicitly.

    ids:     [ prompt ......................... | answer tokens  <|im_end|> ]
    labels:  [ -100 ........................... | answer tokens  <|im_end|> ]
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from epd.demo.shapes import Sample, chat_messages, make_sample
from epd.inputs.processor import InputProcessor
from epd.models.mrope import mrope_positions

IGNORE = -100
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    positions: torch.Tensor  # [3, len(input_ids)]
    pixel_values: torch.Tensor  # all images' patches, in order
    grids: list[tuple[int, int, int]]


def encode_sample(processor: InputProcessor, sample: Sample) -> EncodedSample:
    """Prompt plus target, with labels on the target only."""
    prompt = processor.process_chat(chat_messages(sample))
    target = processor.tokenizer.encode(sample.answer + END_OF_TURN)
    ids = prompt.prompt_token_ids + target
    spans = [(p.offset, p.length) for p in prompt.placeholders]
    grids = [img.grid_thw for img in prompt.images]
    # The target continues the text after the last image, so the prompt's layout covers it too.
    positions, _ = mrope_positions(len(ids), spans, grids, processor.merge_size)
    return EncodedSample(
        input_ids=ids,
        labels=[IGNORE] * len(prompt.prompt_token_ids) + target,
        positions=positions,
        pixel_values=torch.cat([img.pixel_values for img in prompt.images]),
        grids=grids,
    )


def collate(encoded: list[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch in the keyword names of transformers' Qwen2.5-VL `forward`."""
    length = max(len(e.input_ids) for e in encoded)
    batch = len(encoded)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    position_ids = torch.zeros((3, batch, length), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
        position_ids[:, row, :n] = e.positions
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        "pixel_values": torch.cat([e.pixel_values for e in encoded]),
        "image_grid_thw": torch.tensor([g for e in encoded for g in e.grids], dtype=torch.long),
    }


@dataclass(frozen=True)
class Mixture:
    """Which samples a training step sees: single-image only at first, then some multi-image ones."""

    multi_fraction: float = 0.5
    single_only_steps: int = 0

    def num_images(self, step: int, rng: random.Random) -> int | None:
        """1 for a single-image sample, None for a 2-4 image one (drawn by `make_sample`)."""
        if step < self.single_only_steps or rng.random() >= self.multi_fraction:
            return 1
        return None


class TrainBatches(torch.utils.data.Dataset):
    """Batch `step` of a run: a pure function of (seed, step), so workers need no shared state.

    The processor is loaded lazily from the checkpoint directory in each worker process.
    """

    def __init__(self, model_dir: str | Path, seed: int, batch_size: int, steps: int, mixture: Mixture):
        self.model_dir = str(model_dir)
        self.seed, self.batch_size, self.steps, self.mixture = seed, batch_size, steps, mixture
        self._processor: InputProcessor | None = None

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        if self._processor is None:
            self._processor = InputProcessor.from_pretrained(self.model_dir)
        processor = self._processor
        samples = []
        for j in range(self.batch_size):
            key = f"train/{self.seed}/{step}/{j}"  # disjoint from the "eval/..." and "test/..." seeds
            samples.append(make_sample(key, self.mixture.num_images(step, random.Random(key))))
        return collate([encode_sample(processor, s) for s in samples], processor.tokenizer.pad_token_id)
