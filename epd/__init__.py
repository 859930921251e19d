"""epd: Encode-Prefill-Decode disaggregated serving for vision-language models."""

from __future__ import annotations

from typing import Any

from epd.outputs import CompletionOutput, Logprob, RequestOutput
from epd.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # The engine pulls in torch and the model code: load it only when LLM is asked for.
    if name == "LLM":
        from epd.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'epd' has no attribute {name!r}")
