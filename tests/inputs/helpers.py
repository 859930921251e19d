"""Image and checkpoint helpers for tests/inputs (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from epd.testing.fifo import release_fifo
from epd.testing.tokenizer import build_qwen_tokenizer, special_token_ids

PREPROCESSOR_CONFIG = Path("/work/shared/model-configs/qwen2_5_vl_preprocessor_config.json")
# The same content, for machines without the shared folder.
REAL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def write_checkpoint(out_dir: Path) -> Path:
    """A directory with what input processing reads: tokenizer files, preprocessor and model config."""
    build_qwen_tokenizer(out_dir)
    if PREPROCESSOR_CONFIG.exists():
        shutil.copy(PREPROCESSOR_CONFIG, out_dir / "preprocessor_config.json")
    else:
        (out_dir / "preprocessor_config.json").write_text(json.dumps(REAL_PREPROCESSOR))
    config = {"model_type": "qwen2_5_vl", **special_token_ids(out_dir)}
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise image; modes other than RGB are made from RGBA noise, so RGBA has varied alpha."""
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


def encode(img: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels but carries almost no data (a decompression bomb shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def error_within(call: Callable[[], object], timeout_s: float, fifo: Path) -> BaseException | None:
    """What `call` raised (None if it returned), run in a daemon thread.

    If it is still running after `timeout_s` (blocked on `fifo`), `fifo` is released so that
    the thread ends, and AssertionError is raised: the test fails instead of hanging.
    """
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except Exception as e:  # handed to the test, which checks it
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        release_fifo(fifo)
        thread.join(timeout_s)
        raise AssertionError(f"still blocked opening the FIFO {fifo} after {timeout_s} s")
    return outcome[0]
