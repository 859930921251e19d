"""Accuracy of a demo checkpoint through transformers: batched greedy decoding on held-out seeds.

Prompts are built by epd's `InputProcessor` (the chat template, epd's preprocessing),
left-padded, and decoded by transformers' `generate`; positions come from transformers'
own `get_rope_index` (it skips the padding through the attention mask).

    python -m epd.demo.evaluate epd/demo/model --single 200 --multi 100
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from epd.demo.shapes import Sample, chat_messages, is_correct, make_sample
from epd.inputs.processor import InputProcessor

# The longest answer (4 images x 3 shapes) is 52 tokens with <|im_end|>.
MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Report:
    """Exact-match accuracy per request kind, with a few failures to look at."""

    single: float
    multi: float
    num_single: int
    num_multi: int
    failures: list[tuple[str, str]]  # (expected, got)

    def lines(self) -> list[str]:
        out = [
            f"single-image accuracy: {self.single:.3f} ({self.num_single} requests)",
            f"multi-image accuracy:  {self.multi:.3f} ({self.num_multi} requests)",
        ]
        out += [f"  expected {want!r}\n       got {got!r}" for want, got in self.failures[:8]]
        return out


def held_out_samples(prefix: str, num_single: int, num_multi: int) -> list[Sample]:
    """Single-image then multi-image samples of seeds `prefix/single/i`, `prefix/multi/i`."""
    singles = [make_sample(f"{prefix}/single/{i}", 1) for i in range(num_single)]
    multis = [make_sample(f"{prefix}/multi/{i}", None) for i in range(num_multi)]
    return singles + multis


@torch.no_grad()
def hf_answers(
    model: torch.nn.Module,
    processor: InputProcessor,
    samples: list[Sample],
    batch_size: int = 50,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy answers of a transformers Qwen2.5-VL model, `batch_size` requests per `generate`."""
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        batch = _left_padded(processor, samples[start : start + batch_size], model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        answers += [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    return answers


def _left_padded(processor: InputProcessor, samples: list[Sample], device: torch.device) -> dict:
    prompts = [processor.process_chat(chat_messages(s)) for s in samples]
    ids = [p.prompt_token_ids for p in prompts]
    length = max(map(len, ids))
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(x)) + x for x in ids])
    attention_mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in ids])
    images = [img for p in prompts for img in p.images]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat([img.pixel_values for img in images]),
        "image_grid_thw": torch.tensor([img.grid_thw for img in images]),
        "mm_token_type_ids": (input_ids == processor.token_ids.image_token_id).int(),
        "pad_token_id": pad,
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate_dir(
    model_dir: str | Path, num_single: int, num_multi: int, device: str = "cpu", prefix: str = "eval"
) -> Report:
    """Load `model_dir` in transformers (fp32) and score it on held-out samples."""
    from epd.testing.reference import load_hf_model

    model = load_hf_model(model_dir).to(device)
    processor = InputProcessor.from_pretrained(model_dir)
    samples = held_out_samples(prefix, num_single, num_multi)
    got = hf_answers(model, processor, samples)
    correct = [is_correct(g, s.answer) for g, s in zip(got, samples)]
    failures = [(s.answer, g) for g, s, ok in zip(got, samples, correct) if not ok]
    return Report(
        single=sum(correct[:num_single]) / max(num_single, 1),
        multi=sum(correct[num_single:]) / max(num_multi, 1),
        num_single=num_single,
        num_multi=num_multi,
        failures=failures,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--single", type=int, default=200, help="single-image requests")
    parser.add_argument("--multi", type=int, default=100, help="requests of 2 to 4 images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prefix", default="eval", help="seed namespace of the held-out samples")
    args = parser.parse_args()
    report = evaluate_dir(args.model_dir, args.single, args.multi, args.device, args.prefix)
    print("\n".join(report.lines()))


if __name__ == "__main__":
    main()
