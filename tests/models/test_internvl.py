"""InternVL's parts against transformers on the same inputs: dynamic tiling and the prompt's image
tokens (InternVLProcessor), the chat template, the vision tower and projector, the plain 1-D RoPE
positions, and the full-size benchmark configs' shapes."""

from __future__ import annotations

import base64
import io
import json
import random

import pytest
import torch
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from epd.bench.roofline_setup import BENCH_CONFIGS, build_model_dir
from epd.inputs.image_processor import ImageProcessorConfig, image_grid_thw
from epd.inputs.internvl_tiles import TilingConfig, tile_count
from epd.inputs.patches import patches_from_file
from epd.inputs.processor import InputProcessor
from epd.models.config import VLModelConfig
from epd.models.loader import build_model
from epd.models.mrope import mrope_positions
from epd.models.qwen2_vl import LANGUAGE, VISION
from epd.testing.checkpoints import build_tiny_internvl_checkpoint, hf_internvl_processor
from epd.testing.images import noise_image
from epd.testing.reference import load_hf_model

# 64 px tiles, at most 6: square, wide, tall, very wide, very tall, tie-breaking shapes.
SIZES = [(64, 64), (300, 100), (97, 311), (500, 400), (33, 900), (1000, 20), (130, 64), (128, 64)]
TOKENS_PER_TILE = 16  # (64 px / 8 px patches / pixel shuffle 2) ** 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_internvl_checkpoint(tmp_path_factory.mktemp("internvl") / "tiny")


@pytest.fixture(scope="module")
def hf_processor(checkpoint):
    return hf_internvl_processor(checkpoint)


def user_prompt(text: str, num_images: int) -> str:
    return f"<|im_start|>user\n{'<IMG_CONTEXT>' * num_images}\n{text}<|im_end|>\n<|im_start|>assistant\n"


def to_hf_pixels(pixel_values: torch.Tensor, tile: int = 64, patch: int = 8) -> torch.Tensor:
    """Our patch rows (tile, row, column; columns c, y, x) -> transformers' [tiles, C, S, S]."""
    side = tile // patch
    tiles = pixel_values.shape[0] // side**2
    x = pixel_values.view(tiles, side, side, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(tiles, 3, tile, tile)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_prompt_tokens_and_tiles_are_bit_identical_to_transformers(checkpoint, hf_processor):
    """Several images of different aspect ratios in one prompt: the same ids (<img>, 16 context
    tokens a tile, </img>) and the same pixels, tile for tile, thumbnail last."""
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    prompt = user_prompt("Compare these images.", len(images))
    expected = hf_processor(text=[prompt], images=images, return_tensors="pt")
    got = InputProcessor.from_pretrained(checkpoint).process_prompt(
        {"prompt": prompt, "multi_modal_data": {"image": images}}
    )
    assert got.prompt_token_ids == expected["input_ids"][0].tolist()
    pixels = torch.cat([img.pixel_values for img in got.images])
    assert torch.equal(to_hf_pixels(pixels), expected["pixel_values"])
    assert [p.length for p in got.placeholders] == [img.num_tokens(2) for img in got.images]


def test_token_count_comes_from_the_header_and_the_encoder_decodes_the_same_tiles(checkpoint):
    """The front end sizes an image from its file's header; the encoding side decodes the file
    into exactly the patches of the in-memory path."""
    processor = InputProcessor.from_pretrained(checkpoint)
    cfg = processor.image_config
    for i, (w, h) in enumerate(SIZES[:5]):
        image = noise_image(w, h, seed=20 + i)
        [from_file] = processor.load_images([png(image)])
        [in_memory] = processor.load_images([image])
        assert from_file.pixel_values is None and from_file.grid_thw == in_memory.grid_thw
        assert from_file.num_tokens(2) == tile_count(h, w, cfg.tiling) * TOKENS_PER_TILE
        raw = patches_from_file(from_file.encoded, cfg, from_file.grid_thw)
        assert torch.equal(raw, in_memory.raw_patches)


@pytest.mark.parametrize("tile, max_tiles", [(64, 6), (448, 12), (448, 1)])
def test_tile_counts_match_transformers_for_many_sizes(tile, max_tiles):
    """The tile grid (aspect ratios, the tie-break on area) for hundreds of sizes, pixel-free."""
    reference = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, max_patches=max_tiles)
    cfg = TilingConfig(tile, 1, max_tiles)
    rng = random.Random(tile + max_tiles)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(300)]
    sizes += [(tile * c, tile * r) for c in range(1, 7) for r in range(1, 7)] + [(1, 1), (10000, 3)]
    for h, w in sizes:
        want = reference.get_number_of_image_patches(h, w, {"crop_to_patches": True})
        assert tile_count(h, w, cfg) == want, (h, w)


def test_chat_with_an_image_url_gives_transformers_prompt(checkpoint, hf_processor):
    """An OpenAI image_url part reaches InternVL's template (which tests `type == 'image'`)."""
    image = noise_image(200, 90, seed=5)
    url = "data:image/png;base64," + base64.b64encode(png(image)).decode()
    question = {"type": "text", "text": "What is this?"}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, question]}]
    got = InputProcessor.from_pretrained(checkpoint).process_chat(messages)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    text = hf_processor.tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    expected = hf_processor(text=[text], images=[image], return_tensors="pt")
    assert got.prompt_token_ids == expected["input_ids"][0].tolist()


@pytest.mark.parametrize("heavy", [False, True], ids=["internvit_300m", "internvit_6b"])
@torch.no_grad()
def test_vision_tower_and_projector_match_transformers(tmp_path, heavy):
    """Tiles of several images in one batch; `heavy`: InternViT-6B's RMSNorm, q/k norm, no q/k/v
    bias and final norm."""
    checkpoint = build_tiny_internvl_checkpoint(tmp_path / "tiny", heavy_vision=heavy)
    ours, hf = build_model(checkpoint, parts=frozenset({VISION})), load_hf_model(checkpoint)
    tiles = torch.randn(5, 3, 64, 64)
    patches = tiles.view(5, 3, 8, 8, 8, 8).permute(0, 2, 4, 1, 3, 5).reshape(5 * 64, 3 * 8 * 8)
    grids = [(1, 2, 2 * 16), (1, 2, 2 * 64)]  # one image of 1 tile, one of 4
    expected = hf.model.get_image_features(pixel_values=tiles).pooler_output.flatten(0, 1)
    got = ours.encode_images(patches, grids)
    assert [g.shape[0] for g in got] == [16, 64]
    torch.testing.assert_close(torch.cat(got), expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="whole tiles"):
        ours.encode_images(patches[:100], [(1, 2, 50)])


def test_positions_are_transformers_1d_rope(checkpoint, hf_processor):
    """The engine's M-RoPE rows for a prompt with images: the width row is each token's index
    (decode delta 0), and the LLM's rotary reads only it: transformers' Qwen2 RoPE."""
    images = [noise_image(300, 100, seed=1), noise_image(64, 64, seed=2)]
    prompt = InputProcessor.from_pretrained(checkpoint).process_prompt(
        {"prompt": user_prompt("Two pictures.", 2), "multi_modal_data": {"image": images}}
    )
    n = len(prompt.prompt_token_ids)
    spans = [(p.offset, p.length) for p in prompt.placeholders]
    positions, delta = mrope_positions(n, spans, [img.grid_thw for img in prompt.images], 2)
    assert delta == 0 and torch.equal(positions[2], torch.arange(n))
    ours = build_model(checkpoint, parts=frozenset({LANGUAGE}))
    hf = load_hf_model(checkpoint)
    cos, sin = ours.model.rotary_emb(positions, torch.float32)
    x = torch.zeros(1, n, ours.config.text.hidden_size)
    want_cos, want_sin = hf.model.language_model.rotary_emb(x, torch.arange(n)[None])
    assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])


@pytest.mark.parametrize("name", ["internvl3_8b", "internvl2_26b_like"])
def test_full_size_configs_have_transformers_shapes(name):
    """The benchmark configs build transformers' parameters (meta device), every checkpoint name
    maps onto ours, and their preprocessor gives 448 px tiles of 256 tokens, up to 12 + 1."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from epd.models.internvl import InternVLForConditionalGeneration as Ours

    raw = json.loads((BENCH_CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        theirs = InternVLForConditionalGeneration(InternVLConfig(**raw))
        ours = Ours(VLModelConfig.from_dict(raw))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    names = dict(ours.named_parameters())
    assert all(ours.map_weight_name(n)[0] in names for n, _ in theirs.named_parameters())
    preprocessor = json.loads((BENCH_CONFIGS / f"{name}_preprocessor_config.json").read_text())
    cfg = ImageProcessorConfig.from_tiling_dict(preprocessor, raw)
    assert image_grid_thw(448, 448, cfg) == (1, 2, 2 * 256)
    assert image_grid_thw(4000, 3000, cfg) == (1, 2, 2 * 256 * 13)  # 4 x 3 tiles + thumbnail


def test_unsupported_feature_choices_are_refused():
    raw = json.loads((BENCH_CONFIGS / "internvl3_8b.json").read_text())
    preprocessor = json.loads((BENCH_CONFIGS / "internvl3_8b_preprocessor_config.json").read_text())
    with pytest.raises(ValueError, match="224 px tiles for a tower trained on 448 px"):
        ImageProcessorConfig.from_tiling_dict({**preprocessor, "size": {"height": 224, "width": 224}}, raw)
    with pytest.raises(ValueError, match="vision_feature_layer -1"):
        VLModelConfig.from_dict({**raw, "vision_feature_layer": -2})
    with pytest.raises(ValueError, match="rope_type"):
        VLModelConfig.from_dict(
            {**raw, "text_config": {**raw["text_config"], "rope_parameters": {"rope_type": "yarn"}}}
        )


def test_benchmark_model_dir_serves_the_full_size_shapes(tmp_path):
    """`python -m epd.bench.model_dir --config-dir epd/bench/configs --config internvl3_8b.json`:
    a directory whose config, tokenizer and tiles make full-size prompts (no weights)."""
    model_dir = build_model_dir(tmp_path / "internvl3_8b", BENCH_CONFIGS, "internvl3_8b.json")
    config = VLModelConfig.from_pretrained(model_dir)
    processor = InputProcessor.from_pretrained(model_dir)
    assert config.image_token_id == processor.token_ids.image_token_id
    assert config.eos_token_ids == (processor.tokenizer.eos_token_id,)
    prompt = processor.process_prompt(
        {
            "prompt": user_prompt("Describe.", 1),
            "multi_modal_data": {"image": [png(noise_image(896, 448, seed=0))]},
        }
    )
    assert [p.length for p in prompt.placeholders] == [3 * 256]  # 2 x 1 tiles + thumbnail
