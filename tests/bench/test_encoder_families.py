"""epd.bench.encoder_families and the pieces it shares with the roofline and memory benchmarks:
the encoder FLOP count of every family against torch's own count, the images as each family's
processor cuts them, and the GPU script's dry run (tiny models on the CPU) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from epd.bench import roofline_setup as rs
from epd.inputs.image_processor import ImageProcessorConfig
from epd.models.layers.linear import CPU_ROW_BLOCK
from epd.models.loader import build_model
from epd.models.qwen2_vl import VISION

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["internvl3_8b", "internvl2_26b_like", "qwen3_vl_8b"]
QWEN2_5 = pytest.param(
    "qwen2_5_vl_7b",
    marks=pytest.mark.skipif(not rs.SHARED_CONFIGS.exists(), reason=f"needs {rs.SHARED_CONFIGS}"),
)


def model_dir(tmp_path: Path, name: str, tiny: bool) -> Path:
    src = rs.SHARED_CONFIGS if name.startswith("qwen2_5") else rs.BENCH_CONFIGS
    return rs.build_model_dir(tmp_path / name, src, f"{name}.json", tiny=tiny)


@pytest.mark.parametrize("name", [*FAMILIES, QWEN2_5])
def test_encoder_flops_match_torchs_count(tmp_path, name):
    """The count from the config equals torch's FLOP counter on the tower's real forward (SDPA
    through its math kernel, which the counter sees as two matmuls), for every family; on the
    CPU the patch projection also multiplies the rows that pad its last block of rows."""
    directory = model_dir(tmp_path, name, tiny=True)
    model = build_model(directory, parts=frozenset({VISION}), load_format="dummy")
    processor = ImageProcessorConfig.from_pretrained(directory)
    for side in (224, 448):
        pixels, grids = rs.image_batch(processor, model.config.vision, side, 2, "cpu")
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            rs.encode(model, pixels, grids)
        padding = -pixels.shape[0] % CPU_ROW_BLOCK * pixels.shape[1] * model.config.vision.hidden_size * 2
        assert rs.encoder_flops(model.config.vision, grids) + padding == counter.get_total_flops()


@pytest.mark.parametrize("name", ["internvl3_8b", "internvl2_26b_like"])
def test_internvl_images_are_the_processors_tiles(tmp_path, name):
    processor = ImageProcessorConfig.from_pretrained(model_dir(tmp_path, name, tiny=False))
    tiles = {side: rs.image_grid(processor, side)[1] for side in (448, 896, 1344)}
    assert tiles == {448: 1, 896: 5, 1344: 10}  # 1x1; 2x2 + thumbnail; 3x3 + thumbnail
    assert rs.image_grid(processor, 896)[0] == (1, 2, 2 * 5 * 256)  # 256 tokens a tile


def test_qwen3_images_are_whole_16px_patches(tmp_path):
    processor = ImageProcessorConfig.from_pretrained(model_dir(tmp_path, "qwen3_vl_8b", tiny=False))
    assert [rs.image_grid(processor, side) for side in (448, 896, 1344)] == [
        ((1, 28, 28), 0),
        ((1, 56, 56), 0),
        ((1, 84, 84), 0),
    ]


def test_gpu_script_dry_run_writes_every_family(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/gpu_families.sh", str(tmp_path), "--dry-run"],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "encoder_families.json").read_text())
    encoder, memory = report["encoder"], report["memory"]
    assert list(encoder) == FAMILIES
    for rows in encoder.values():
        assert set(rows) == {"224px b1", "224px b2", "448px b1", "448px b2"}
        assert all(r["img_s"] > 0 and r["MFU"] > 0 for r in rows.values())
    # The tiny InternVL's 112 px tiles: 2x2 + thumbnail and 3x3 + thumbnail.
    assert [encoder["internvl2_26b_like"][f"{s}px b1"]["tiles"] for s in (224, 448)] == [5, 10]
    assert encoder["qwen3_vl_8b"]["448px b2"]["grid"] == [1, 28, 28]
    assert list(memory) == ["internvl2_26b_like", "internvl3_8b", "qwen3_vl_8b"]
    for rows in memory.values():
        assert set(rows) == {"E 1x112px", "E 2x112px", "EPD 1x112px", "EPD 2x112px"}
        e, epd = rows["E 1x112px"], rows["EPD 1x112px"]
        assert e["kv_gib"] == 0 < epd["kv_gib"] and e["weights_gib"] < epd["weights_gib"]
    log = (tmp_path / "log.txt").read_text()
    assert "| internvl2_26b_like | 448px | 10 |" in log and "| qwen3_vl_8b | EPD 2x112px |" in log
    assert report["ceilings"]["matmul_TFLOPs"] > 0 and torch.__version__ == report["meta"]["torch"]
