"""Session fixtures for tests/inputs: a tiny Qwen2-VL checkpoint and its reference tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import write_checkpoint


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("qwen_ckpt"))


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir: Path):
    """transformers' tokenizer for the same directory: the independent reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
