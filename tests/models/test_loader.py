"""Weight loading from real HF directories: single file, sharded, nested names, dummy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epd.models.loader import build_model
from epd.models.qwen2_vl import LANGUAGE, VISION
from epd.testing.checkpoints import build_tiny_checkpoint


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_checkpoint_loads_the_same_weights(tmp_path: Path, checkpoint: Path, family: str):
    sharded = build_tiny_checkpoint(tmp_path / "sharded", family, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a, b = _state(build_model(checkpoint)), _state(build_model(sharded))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nested_transformers5_names_load(tmp_path: Path, checkpoint: Path):
    """Checkpoints saved with `model.language_model.` / `model.visual.` prefixes."""
    nested = tmp_path / "nested"
    shutil.copytree(checkpoint, nested)
    tensors = load_file(nested / "model.safetensors")
    renamed = {
        (
            "model.language_model." + k[len("model.") :]
            if k.startswith("model.")
            else "model." + k
            if k.startswith("visual.")
            else k
        ): v
        for k, v in tensors.items()
    }
    assert any(k.startswith("model.visual.") for k in renamed)
    save_file(renamed, nested / "model.safetensors", metadata={"format": "pt"})
    a, b = _state(build_model(checkpoint)), _state(build_model(nested))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_projections_hold_the_checkpoint_tensors(checkpoint: Path):
    model = build_model(checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    layer = model.model.layers[1]
    q, k, v = (tensors[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    gate, up = (tensors[f"model.layers.1.mlp.{n}_proj.weight"] for n in ("gate", "up"))
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate, up]))


def test_untied_and_tied_lm_head(tmp_path: Path):
    tied = build_model(build_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = build_model(build_tiny_checkpoint(tmp_path / "untied", tie_word_embeddings=False))
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_parts_load_only_their_weights(checkpoint: Path):
    full = sum(p.numel() for p in build_model(checkpoint).parameters())
    vision = build_model(checkpoint, parts=frozenset({VISION}))
    language = build_model(checkpoint, parts=frozenset({LANGUAGE}))
    assert all(n.startswith("visual.") for n, _ in vision.named_parameters())
    assert not any(n.startswith("visual.") for n, _ in language.named_parameters())
    n_vision = sum(p.numel() for p in vision.parameters())
    n_language = sum(p.numel() for p in language.parameters())
    assert n_vision + n_language == full


def test_dummy_weights_have_real_shapes(checkpoint: Path):
    real, dummy = build_model(checkpoint), build_model(checkpoint, load_format="dummy", seed=3)
    again = build_model(checkpoint, load_format="dummy", seed=3)
    for (name, a), (_, b), (_, c) in zip(
        real.named_parameters(), dummy.named_parameters(), again.named_parameters()
    ):
        assert a.shape == b.shape, name
        assert torch.isfinite(b).all() and torch.equal(b, c)


def test_unsupported_architecture_lists_supported(tmp_path: Path, checkpoint: Path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Qwen2_5_VLForConditionalGeneration") as err:
        build_model(bad)
    assert "Qwen2VLForConditionalGeneration" in str(err.value) and "Llava" in str(err.value)


def test_missing_weight_is_reported(tmp_path: Path, checkpoint: Path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="qkv_proj.weight"):
        build_model(broken)
