"""Hugging Face transformers as the reference implementation, for tests and accuracy checks."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf_model(model_dir: str | Path) -> torch.nn.Module:
    """The checkpoint in transformers, fp32 on the CPU, SDPA attention, eval mode."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


@torch.no_grad()
def hf_greedy(
    model: torch.nn.Module, input_ids: list[int], max_new_tokens: int, **mm: torch.Tensor
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation of one prompt; returns new token ids and the log-softmax at each step."""
    ids = torch.tensor([input_ids])
    kwargs = dict(mm)
    if "image_grid_thw" in kwargs or "video_grid_thw" in kwargs:
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
        if "video_grid_thw" in kwargs:  # transformers: text 0, image 1, video 2
            kwargs["mm_token_type_ids"] += 2 * (ids == model.config.video_token_id).int()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    new = out.sequences[0, len(input_ids) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
    return new, logprobs


def assert_logprobs_match(got: list, expected: list[int], reference: list[torch.Tensor]) -> None:
    """Each position's logprobs (epd's) against transformers' log-softmax at that step: the chosen
    token's within 1e-4, and the top-k it returned are transformers' top-k (the chosen token is
    added when it is not among them, as vLLM returns it)."""
    for position, token, ref in zip(got, expected, reference, strict=True):
        assert abs(position[token].logprob - ref[token].item()) < 1e-4
        top = torch.topk(ref, len(position) - (token not in torch.topk(ref, 3).indices)).indices
        assert set(top.tolist()) <= set(position)
