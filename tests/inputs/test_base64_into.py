"""Base64 decoded into a given buffer (epd.inputs.base64_into) accepts exactly what strict pybase64
accepts and writes the same bytes; a data URL read with `buffers` lands in the buffer given, and
its header reads the same from there as from bytes."""

from __future__ import annotations

import binascii
import io
import os

import pybase64
import pytest
from PIL import Image

from epd.inputs import base64_into
from epd.inputs.image import DataURL, read_image_bytes, read_image_header
from epd.testing.images import noise_image

pytestmark = pytest.mark.skipif(not base64_into.AVAILABLE, reason="pybase64 without its C library")


def strict(text: bytes) -> bytes | None:
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def into(text: bytes) -> bytes | None:
    out = memoryview(bytearray(base64_into.decoded_size_bound(len(text)) + 8))
    n = base64_into.decode_into(text, out)
    return None if n is None else bytes(out[:n])


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 57, 1000, 3 * 1024 * 1024 + 1])
def test_valid_base64_decodes_to_the_bytes_pybase64_gives(length):
    raw = os.urandom(length)
    text = pybase64.b64encode(raw)
    assert into(text) == raw == strict(text)


@pytest.mark.parametrize(
    "text",
    [
        b"QQ",
        b"QQ=",
        b"Q===",
        b"QQ==QQ==",
        b"QUJD\n",
        b"QU JD",
        b'QUJ"',
        b"QUJD\\/8=",
        b"====",
        b"QUJD=",
        b"Q\x00JD",
    ],
)
def test_what_strict_pybase64_refuses_is_refused(text):
    assert strict(text) is None
    assert into(text) is None


def test_a_buffer_too_small_is_refused_not_overrun():
    text = pybase64.b64encode(b"x" * 30)
    guard = bytearray(b"\xee" * 64)
    out = memoryview(guard)[:10]
    assert base64_into.decode_into(text, out) is None
    assert guard == bytearray(b"\xee" * 64)


def image_bytes(fmt: str, exif_orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    image = noise_image(40, 30, seed=3)
    if exif_orientation is None:
        image.save(out, format=fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(out, format=fmt, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize(
    "fmt, orientation",
    [
        ("PNG", None),
        ("PNG", 6),
        ("JPEG", None),
        ("JPEG", 8),
        ("WEBP", 6),
        ("GIF", None),
        ("BMP", None),
        ("TIFF", None),
    ],
)
def test_a_data_url_lands_in_the_buffer_given_and_reads_as_bytes_do(fmt, orientation):
    data = image_bytes(fmt, orientation)
    given = []

    def buffers(n: int) -> memoryview:
        given.append(memoryview(bytearray(n)))
        return given[-1]

    url = DataURL("image/x", memoryview(pybase64.b64encode(data)))
    got = read_image_bytes(url, buffers=buffers, max_image_bytes=len(data))
    assert isinstance(got, memoryview) and got.obj is given[0].obj and bytes(got) == data
    assert read_image_header(got) == read_image_header(data)
    if orientation in (6, 8):
        assert (read_image_header(got).width, read_image_header(got).height) == (30, 40)


def test_without_room_or_with_line_breaks_a_data_url_decodes_into_new_bytes():
    data = image_bytes("PNG")
    text = pybase64.b64encode(data)
    assert read_image_bytes(DataURL("image/png", memoryview(text)), buffers=lambda n: None) == data
    wrapped = b"\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    calls = []
    got = read_image_bytes(
        DataURL("image/png", memoryview(wrapped)),
        buffers=lambda n: calls.append(n) or memoryview(bytearray(n)),
    )
    assert got == data and isinstance(got, bytes) and len(calls) == 1  # tried strict, fell back
