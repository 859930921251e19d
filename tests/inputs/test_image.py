"""load_image / image_content_hash: sources, RGB conversion like transformers, limits and bad input."""

from __future__ import annotations

import io
import os
import socket

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.image_utils import load_image as hf_load_image

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import image_content_hash, load_image

from .helpers import data_url, encode, error_within, png_header_only, random_image

# Generous: a refusal takes milliseconds; only a call blocked on a FIFO comes near it.
BLOCKED_AFTER_S = 30.0


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


# --- sources -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("WEBP", "image/webp"), ("BMP", "image/bmp")])
def test_lossless_data_url_gives_original_pixels(fmt: str, mime: str) -> None:
    img = random_image(73, 41, seed=1)
    save = {"lossless": True} if fmt == "WEBP" else {}
    out = load_image(data_url(encode(img, fmt, **save), mime))
    assert out.mode == "RGB" and out.size == (73, 41)
    np.testing.assert_array_equal(pixels(out), pixels(img))


def test_jpeg_data_url_decodes_like_pil() -> None:
    data = encode(random_image(64, 48, seed=2), "JPEG", quality=90)
    out = load_image(data_url(data, "image/jpeg"))
    assert out.size == (64, 48)
    np.testing.assert_array_equal(pixels(out), pixels(hf_load_image(data_url(data, "image/jpeg"))))


def test_gif_first_frame() -> None:
    first = Image.new("RGB", (20, 10), (255, 0, 0))
    second = Image.new("RGB", (20, 10), (0, 0, 255))
    data = encode(first, "GIF", save_all=True, append_images=[second])
    out = load_image(data_url(data, "image/gif"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 0, 0)


def test_raw_bytes_plain_path_file_url_and_pathlike_agree(tmp_path) -> None:
    img = random_image(30, 50, seed=3)
    data = encode(img, "PNG")
    path = tmp_path / "a b.png"  # a space, to exercise file:// percent-decoding
    path.write_bytes(data)
    sources = [data, bytearray(data), str(path), path, "file://" + str(path).replace(" ", "%20")]
    for src in sources:
        np.testing.assert_array_equal(pixels(load_image(src)), pixels(img))


def test_pil_input_is_converted_not_mutated() -> None:
    img = random_image(16, 16, "RGBA", seed=4)
    out = load_image(img)
    assert out.mode == "RGB" and img.mode == "RGBA"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK", "I;16"])
def test_modes_converted_like_transformers(mode: str) -> None:
    img = random_image(23, 17, mode, seed=5)
    expected = hf_convert_to_rgb(img, return_numpy=True)  # alpha composited onto white
    np.testing.assert_array_equal(pixels(load_image(img)), expected)


def test_palette_png_with_transparency_composited_on_white() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 1)
    data = encode(img, "PNG", transparency=0)
    out = load_image(data)
    assert out.getpixel((1, 1)) == (255, 255, 255)  # transparent index -> white
    assert out.getpixel((0, 0)) == (200, 100, 50)
    np.testing.assert_array_equal(
        pixels(out), hf_convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    )


def test_exif_orientation_applied_like_transformers(tmp_path) -> None:
    img = random_image(40, 20, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, "JPEG", exif=exif.tobytes())
    out = load_image(str(path))
    assert out.size == (20, 40)
    np.testing.assert_array_equal(pixels(out), pixels(hf_load_image(str(path))))


# --- local paths ---------------------------------------------------------------------------


def test_allowed_dir_accepts_inside_relative_and_symlink_within(tmp_path) -> None:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    img = random_image(8, 8, seed=7)
    (root / "sub" / "x.png").write_bytes(encode(img, "PNG"))
    os.symlink(root / "sub" / "x.png", root / "link.png")
    for src in [
        str(root / "sub" / "x.png"),
        "sub/x.png",
        "link.png",
        "sub/../sub/x.png",
        f"file://{root}/link.png",
    ]:
        np.testing.assert_array_equal(
            pixels(load_image(src, allowed_local_media_path=str(root))), pixels(img)
        )


def test_allowed_dir_refuses_outside(tmp_path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(encode(random_image(8, 8), "PNG"))
    os.symlink(outside, root / "escape.png")
    (tmp_path / "media2").mkdir()  # a sibling sharing the prefix "media"
    (tmp_path / "media2" / "y.png").write_bytes(encode(random_image(8, 8), "PNG"))
    bad = [
        str(outside),
        "../secret.png",
        "escape.png",
        f"file://{outside}",
        str(tmp_path / "media2" / "y.png"),
    ]
    for src in bad:
        with pytest.raises(InvalidInputError, match="outside the allowed media directory"):
            load_image(src, allowed_local_media_path=str(root))


def test_bad_local_paths(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(InvalidInputError, match="directory"):
        load_image(str(tmp_path))
    with pytest.raises(InvalidInputError, match="not a regular file"):
        load_image("/dev/zero")
    with pytest.raises(InvalidInputError, match="local file"):
        load_image("file://otherhost/x.png")


def test_fifo_refused_at_once_without_waiting_for_a_writer(tmp_path) -> None:
    # No process ever writes to this FIFO: opening it for reading the ordinary way waits forever.
    root = tmp_path / "media"
    root.mkdir()
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    os.symlink(fifo, root / "to_pipe.png")
    sources = [
        ("pipe.png", str(root)),
        ("to_pipe.png", str(root)),  # a symlink inside the root leading to the FIFO
        (f"file://{fifo}", str(root)),
        (str(fifo), None),  # offline: local files anywhere, still only regular ones
    ]
    for src, allowed in sources:
        error = error_within(
            lambda src=src, allowed=allowed: load_image(src, allowed_local_media_path=allowed),
            BLOCKED_AFTER_S,
            fifo,
        )
        assert isinstance(error, InvalidInputError), (src, error)
        assert "is a FIFO (named pipe), not a regular file" in str(error), (src, error)


def test_special_files_refused_naming_their_kind(tmp_path) -> None:
    root = tmp_path / "m"
    (root / "dir.png").mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "s.png"))
        for src, kind in [("dir.png", "a directory"), ("s.png", "a socket")]:
            with pytest.raises(InvalidInputError, match=f"is {kind}, not a regular file"):
                load_image(src, allowed_local_media_path=str(root))
    with pytest.raises(InvalidInputError, match="is a character device, not a regular file"):
        load_image("/dev/null")


def test_symlink_loop_is_an_input_error(tmp_path) -> None:
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(InvalidInputError, match="cannot be resolved"):
        load_image("a.png", allowed_local_media_path=str(tmp_path))
    with pytest.raises(InvalidInputError, match="symbolic link that cannot be followed"):
        load_image(str(tmp_path / "a.png"))


# --- URL schemes ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "HTTPS://example.com/cat.png"])
def test_remote_urls_refused(url: str) -> None:
    with pytest.raises(InvalidInputError, match="remote media is not enabled"):
        load_image(url)


def test_unknown_scheme_refused() -> None:
    with pytest.raises(InvalidInputError, match="unsupported image URL scheme 'ftp'"):
        load_image("ftp://example.com/cat.png")


def test_bad_data_urls() -> None:
    with pytest.raises(InvalidInputError, match="not an image"):
        load_image(data_url(b"hello", "text/plain"))
    with pytest.raises(InvalidInputError, match="no ','"):
        load_image("data:image/png;base64")
    with pytest.raises(InvalidInputError, match="base64"):
        load_image("data:image/png;base64,abc")


# --- corrupt data and limits ---------------------------------------------------------------


def test_random_bytes_not_an_image() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidInputError, match="not an image"):
        load_image(noise)
    with pytest.raises(InvalidInputError, match="not an image"):
        load_image(data_url(noise, "image/png"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt: str) -> None:
    data = encode(random_image(64, 64, seed=8), fmt)
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_unsupported_format_refused() -> None:
    data = encode(random_image(8, 8), "PPM")  # Pillow reads it, but it is not on our list
    with pytest.raises(InvalidInputError, match="supported format"):
        load_image(data)


def test_pixel_limit_checked_from_header_before_decoding() -> None:
    bomb = png_header_only(5000, 5000)  # 25 Mpx claimed, ~100 bytes of data
    with pytest.raises(InvalidInputError, match="too many pixels: 5000x5000"):
        load_image(bomb, max_image_pixels=1_000_000)
    with pytest.raises(InvalidInputError, match="too many pixels"):
        load_image(random_image(100, 100), max_image_pixels=9_999)
    assert load_image(random_image(100, 100), max_image_pixels=10_000).size == (100, 100)


def test_pillow_bomb_guard_reported_as_input_error() -> None:
    with pytest.raises(InvalidInputError, match="too many pixels"):
        load_image(png_header_only(100_000, 100_000))


def test_byte_limit(tmp_path) -> None:
    data = encode(random_image(64, 64, seed=9), "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for src in [data, data_url(data, "image/png"), str(path)]:
        with pytest.raises(InvalidInputError, match="too large"):
            load_image(src, max_image_bytes=len(data) - 1)
        assert load_image(src, max_image_bytes=len(data)).size == (64, 64)


def test_wrong_source_type() -> None:
    with pytest.raises(InvalidInputError, match="unsupported image source type"):
        load_image(12345)  # type: ignore[arg-type]


# --- content hash --------------------------------------------------------------------------


def test_hash_same_pixels_any_source(tmp_path) -> None:
    img = random_image(57, 31, seed=10)
    png = encode(img, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(png)
    sources = [
        img,
        png,
        data_url(png, "image/png"),
        str(path),
        data_url(encode(img, "WEBP", lossless=True), "image/webp"),
    ]
    hashes = {image_content_hash(load_image(s)) for s in sources}
    assert hashes == {image_content_hash(img)}
    assert len(image_content_hash(img)) == 64


def test_hash_differs_for_different_pixels() -> None:
    img = random_image(20, 20, seed=11)
    other = img.copy()
    other.putpixel((3, 4), tuple((v + 1) % 256 for v in img.getpixel((3, 4))))
    assert image_content_hash(img) != image_content_hash(other)
    # Same bytes, different shape or mode must not collide either.
    flat = Image.frombytes("RGB", (40, 10), img.tobytes())
    assert image_content_hash(img) != image_content_hash(flat)
    gray = Image.new("L", (20, 20), 0)
    assert image_content_hash(gray) != image_content_hash(Image.new("P", (20, 20), 0))
