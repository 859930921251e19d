"""Base64 images lifted out of a request body before it is parsed: the parsers see kilobytes.

A chat request with three 1280x960 PNGs is ~15 MB of JSON, nearly all base64. Walking those
bytes for the shape check and then with pydantic cost 17 ms of CPU per image on one core, more
than everything else the front end does with an image. So each large data URL that is the
value of a `"url"` key is cut out of the body first (`bytes.find`: memchr speed) and replaced
by a short reference; the parsers validate the rest, and the image keeps its base64 text as a
slice of the body, decoded later in a preprocessing thread (epd.inputs.image.DataURL).

    ..."image_url": {"url": "data:image/png;base64,iVBORw0KG...(5 MB)..."}...
    ..."image_url": {"url": "epd-blob:0"}...          blobs[0] = DataURL("image/png", <slice>)

Only what cannot change the request's meaning is lifted: a JSON string that starts a raw
(unescaped) quote, is the value of a `"url"` key, reads `data:<type>;base64,` and ends at the
first quote after that with no backslash before it (so it is the string's own end). Escapes
inside it (`\\/` for `/`, as some JSON writers do) are replaced when the image is decoded, and
only if its text is not plain base64: no scan of every payload for them (`DataURL.json_escapes`).
Anything else stays in the body and takes the ordinary path, errors included. A client that
writes `epd-blob:N` itself can only name its own request's images.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from epd.inputs.image import DataURL

BLOB_SCHEME = "epd-blob:"
MIN_LIFTED_CHARS = 4096  # smaller payloads cost the parsers nothing worth a second path
_HEADER_MAX = 256  # "data:<media type>;<params>;base64," is short
_WHITESPACE = b" \t\r\n"


def lift_data_urls(
    body: bytes | bytearray, quotes: Sequence[int] | None = None
) -> tuple[bytes | bytearray, list[DataURL]]:
    """(the body with each liftable data URL replaced by `"epd-blob:<i>"`, the lifted URLs).
    `quotes`: where every `"` of the body is, ascending, if the reader noted them as the body came
    (`QuoteIndex`); the payloads are then not scanned again for their closing quote."""
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    blobs: list[DataURL] = []
    start = kept = 0
    while (quote := body.find(b'"data:', start)) >= 0:
        start = quote + 1
        lifted = _liftable(body, quote, quotes)
        if lifted is None:
            continue
        end, media_type, payload_start = lifted
        pieces += [view[kept : quote + 1], f"{BLOB_SCHEME}{len(blobs)}".encode()]
        blobs.append(DataURL(media_type, view[payload_start:end], json_escapes=True))
        kept = start = end
    if not blobs:
        return body, []
    pieces.append(view[kept:])
    return b"".join(pieces), blobs


def _liftable(
    body: bytes | bytearray, quote: int, quotes: Sequence[int] | None
) -> tuple[int, str, int] | None:
    """(index of the closing quote, media type, payload start) of the data URL string opening
    at `quote`, if it may be lifted (module docstring)."""
    if _escaped(body, quote) or not _is_url_value(body, quote):
        return None
    comma = body.find(b",", quote, quote + _HEADER_MAX)
    if comma < 0:
        return None
    header = bytes(body[quote + 6 : comma]).decode("ascii", "replace")  # after '"data:'
    media_type, *params = header.split(";")
    if "base64" not in (p.strip().lower() for p in params) or '"' in header or "\\" in header:
        return None
    end = _next_quote(body, comma, quotes)
    # A backslash before it: an escaped quote (or an escaped backslash): the parser's to read.
    if end < 0 or end - comma < MIN_LIFTED_CHARS or body[end - 1] == 0x5C:
        return None
    return end, media_type.strip().lower(), comma + 1


def _next_quote(body: bytes | bytearray, start: int, quotes: Sequence[int] | None) -> int:
    """The first `"` at or after `start` (-1: none)."""
    if quotes is None:
        return body.find(b'"', start)
    i = bisect.bisect_left(quotes, start)
    return quotes[i] if i < len(quotes) else -1


class QuoteIndex:
    """Where the `"` of a body are, noted chunk by chunk as it arrives. A chunk the socket just
    wrote is still in the core's cache: scanning it there cost a third of scanning the whole 15 MB
    body once it was complete (0.2 against 0.65 ms, 256 KB chunks, 2-core box), and the lift
    then finds each 5 MB payload's end without reading it again."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.size = 0

    def add(self, chunk: bytes | memoryview) -> None:
        """Note the quotes of the body's next chunk."""
        base, end = self.size, self.size + len(chunk)
        if isinstance(chunk, memoryview) and isinstance(chunk.obj, bytearray) and chunk.contiguous and chunk:
            # A slice of the buffer the socket fills (epd.server.direct_body): search it in place.
            whole, offset = chunk.obj, _offset_in(chunk)
        else:
            whole, offset = chunk, 0
        i = whole.find(b'"', offset, offset + len(chunk))
        while i >= 0:
            self.positions.append(base + i - offset)
            i = whole.find(b'"', i + 1, offset + len(chunk))
        self.size = end


def _offset_in(chunk: memoryview) -> int:
    """Where a contiguous slice starts in the bytearray it was taken from."""
    return np.frombuffer(chunk, np.uint8).ctypes.data - np.frombuffer(chunk.obj, np.uint8).ctypes.data


def _escaped(body: bytes | bytearray, index: int) -> bool:
    """Whether the character at `index` is escaped: an odd run of backslashes before it."""
    run = 0
    while index - run - 1 >= 0 and body[index - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def _is_url_value(body: bytes | bytearray, quote: int) -> bool:
    """Whether the string opening at `quote` is the value of a `"url"` key."""
    i = _skip_back_whitespace(body, quote - 1)
    if i < 0 or body[i] != ord(":"):
        return False
    i = _skip_back_whitespace(body, i - 1)
    return i >= 4 and body[i - 4 : i + 1] == b'"url"' and not _escaped(body, i - 4)


def _skip_back_whitespace(body: bytes | bytearray, i: int) -> int:
    while i >= 0 and body[i] in _WHITESPACE:
        i -= 1
    return i


def blob_index(url: str) -> int | None:
    """N of an `epd-blob:N` reference, else None."""
    if not url.startswith(BLOB_SCHEME):
        return None
    digits = url[len(BLOB_SCHEME) :]
    return int(digits) if digits.isdigit() and len(digits) < 9 else -1
