"""Turn a user-supplied image source into an RGB PIL image, safely.

Sources, and what is checked before any pixel is decoded:

| source                         | check                                                   |
|--------------------------------|---------------------------------------------------------|
| `PIL.Image.Image`              | pixel count                                             |
| `bytes` / `bytearray`          | byte count, pixel count (from the header)               |
| `data:[image/*][;base64],...`  | byte count (estimated before base64 decoding), pixels   |
| `file://...` or a plain path   | allowed directory (after symlinks and `..`), regular    |
|                                | file (FIFOs, devices refused unopened), bytes, pixels   |
| `http://`, `https://`          | refused, unless a `fetch_remote` is given: it fetches   |
|                                | (and owns the network checks), then bytes, pixels       |
| other schemes                  | refused                                                 |

Decoding then mirrors what transformers does with the same image: EXIF orientation is
applied (`transformers.image_utils.load_image`), transparency is composited onto white
(`transformers.image_transforms.convert_to_rgb`), and the result is mode "RGB".
Every failure the caller caused raises `InvalidInputError`.
"""

from __future__ import annotations

import binascii
import errno
import hashlib
import io
import json
import os
import stat
import struct
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from epd.inputs import base64_into
from epd.inputs.errors import InvalidInputError


@dataclass(frozen=True)
class DataURL:
    """A base64 data URL already split (the server lifts them out of request bodies before
    parsing: epd.server.blobs): its media type and its base64 text, still encoded.
    `json_escapes`: the text is a JSON string's as sent, so it may hold escapes (`\\/`, `\\n`)
    that reading the JSON would have replaced; they are, if the text is not plain base64."""

    media_type: str
    payload: memoryview | bytes
    json_escapes: bool = False

    def __len__(self) -> int:
        return len(self.payload)


ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike | DataURL
# (url, max_image_bytes) -> the bytes behind an http(s) URL; raises InvalidInputError. The
# server's epd.server.fetch.RemoteMediaFetcher is one (it refuses private addresses).
RemoteFetcher = Callable[[str, int | None], bytes]
# nbytes -> a writable buffer of that size where a data URL's file is decoded (memory the encoders
# read: epd.cluster.shared_files), or None (no room: new bytes, as without it).
FileBuffers = Callable[[int], memoryview | None]

# Formats we let Pillow decode from untrusted bytes. Pillow can also open formats that run
# external programs (EPS calls Ghostscript) or are rarely fuzzed, so we allow only these.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_URL_MEDIA_TYPES = ("", "application/octet-stream")


def load_image(
    source: ImageSource,
    *,
    allowed_local_media_path: str | None = None,
    max_image_pixels: int | None = None,
    max_image_bytes: int | None = None,
    fetch_remote: RemoteFetcher | None = None,
) -> Image.Image:
    """Load `source` and return a fully decoded RGB image.

    `allowed_local_media_path=None` allows local files anywhere (offline use); otherwise a local
    path must lie under that directory once symlinks and `..` are resolved, and a relative path
    is taken relative to it. `max_image_pixels` / `max_image_bytes` (None = no limit of ours;
    Pillow's own decompression-bomb guard still applies) are checked before full decoding.
    http(s) URLs are refused unless `fetch_remote` is given. Raises `InvalidInputError` for
    anything wrong with the source.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_image_pixels)
        return _finish(source)
    data = read_image_bytes(
        source,
        allowed_local_media_path=allowed_local_media_path,
        max_image_bytes=max_image_bytes,
        fetch_remote=fetch_remote,
    )
    return decode_image_bytes(data, max_image_pixels=max_image_pixels)


def read_image_bytes(
    source: bytes | bytearray | memoryview | str | os.PathLike | DataURL,
    *,
    allowed_local_media_path: str | None = None,
    max_image_bytes: int | None = None,
    fetch_remote: RemoteFetcher | None = None,
    buffers: FileBuffers | None = None,
) -> bytes | memoryview:
    """The encoded bytes behind a non-PIL source, with the URL scheme, path and byte checks applied.
    A data URL's given as a `DataURL` is decoded into a buffer from `buffers` where it gives one
    (then a memoryview of it comes back)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_bytes(len(data), max_image_bytes)
        return data
    if isinstance(source, DataURL):
        _check_media_type(source.media_type)
        return _decode_base64(source.payload, max_image_bytes, source.json_escapes, buffers)
    if isinstance(source, os.PathLike):
        return _read_local_file(os.fspath(source), allowed_local_media_path, max_image_bytes)
    if not isinstance(source, str):
        raise InvalidInputError(f"unsupported image source type {type(source).__name__}")
    if source[:5].lower() == "data:":
        return _decode_data_url(source, max_image_bytes)
    if "://" in source:
        return _read_url(source, allowed_local_media_path, max_image_bytes, fetch_remote)
    return _read_local_file(source, allowed_local_media_path, max_image_bytes)


def decode_image_bytes(data: bytes, *, max_image_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes (first frame of animations) into an RGB image."""
    img = _open(data)
    # The header gives the size: refuse decompression bombs before decoding any pixel.
    _check_pixels(img.size, max_image_pixels)
    return _finish(img)


def _open(data: bytes | memoryview) -> Image.Image:
    """The image behind `data`, header parsed, no pixel decoded; input errors for anything else."""
    # BytesIO shares a bytes object but copies any other buffer: a memoryview (a file in shared
    # memory) is read in place instead, as far as the header goes.
    fp = io.BytesIO(data) if isinstance(data, bytes) else _ViewFile(data)
    try:
        return Image.open(fp, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"image has too many pixels: {e}") from None
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"data is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidInputError(f"cannot read image header: {e}") from None


class _ViewFile(io.RawIOBase):
    """A read-only file over a buffer, without copying it (for the header only)."""

    def __init__(self, view: bytes | bytearray | memoryview) -> None:
        self._view, self._pos = memoryview(view).cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB exactly like transformers' `convert_to_rgb`: transparency goes onto white."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if img.mode == "RGB" and not has_alpha:
        return img
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding a pixel."""

    format: str
    width: int  # after EXIF orientation: the size the decoded image will have
    height: int


def read_image_header(data: bytes, *, max_image_pixels: int | None = None) -> ImageHeader:
    """The format and oriented size of encoded image bytes, with the format and pixel checks of
    `decode_image_bytes`, in ~20 us instead of the ~16 ms a 1280x960 PNG takes to decode.

    The orientation comes from EXIF where the format keeps it before the pixel data (JPEG, WebP,
    TIFF, PNG's eXIf before IDAT); an encoder that decodes to another size refuses the image
    (epd.inputs.patches), so a header that misleads costs an error, never wrong tokens.
    """
    img = _open(data)
    _check_pixels(img.size, max_image_pixels)
    width, height = img.size
    if _orientation(img) in _SWAPS_SIDES:
        width, height = height, width
    return ImageHeader(img.format or "", width, height)


_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 or 270 degrees
_EXIF_ORIENTATION = 0x0112


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 = as stored), read from what `Image.open` parsed. A PNG's is read from
    the chunks before its pixel data: its `getexif()` would decode the whole image to look for
    a late eXIf chunk."""
    if img.format == "TIFF":
        return 1  # Pillow applies a TIFF's orientation itself: its size is the oriented one
    if img.format != "PNG":
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        return 1  # as exif_transpose: an unreadable EXIF block orients nothing
    return int(exif.get(_EXIF_ORIENTATION, 1) or 1)


def image_key(data: bytes) -> str:
    """The cache key of an image given as file bytes: BLAKE3 of the bytes as received.

    Every cache uses it (the router's view, the encoder and prefill MM caches, the KV prefix
    cache's extra keys), so one image is encoded once wherever it recurs. It names the file, not
    the pixels: the same picture re-encoded (another PNG compression, a JPEG) is another key and
    is encoded again; never the reverse. A cryptographic hash (BLAKE3, ~6 GB/s, 0.6 ms for a
    3.7 MB PNG on one core), because a key collision would hand one client's image embeddings
    to another's request.
    """
    return "b3:" + blake3.blake3(data).hexdigest()


def image_content_hash(img: Image.Image) -> str:
    """sha256 hex of the decoded pixels (mode, size, raw bytes): same pixels -> same hash, any source."""
    h = hashlib.sha256()
    h.update(f"{img.mode}|{img.width}x{img.height}|".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _finish(img: Image.Image) -> Image.Image:
    """Decode all pixels, apply EXIF orientation, convert to RGB; decoding errors become input errors."""
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"image has too many pixels: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidInputError(f"image data is truncated or corrupt: {e}") from None


def _check_pixels(size: tuple[int, int], max_image_pixels: int | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InvalidInputError(f"image has an empty size {w}x{h}")
    if max_image_pixels is not None and w * h > max_image_pixels:
        raise InvalidInputError(f"image has too many pixels: {w}x{h} = {w * h} > limit {max_image_pixels}")


def _check_bytes(n: int, max_image_bytes: int | None) -> None:
    if max_image_bytes is not None and n > max_image_bytes:
        raise InvalidInputError(f"image is too large: {n} bytes > limit {max_image_bytes}")


def _decode_data_url(url: str, max_image_bytes: int | None) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidInputError("malformed data URL: no ',' before the data")
    media_type, *params = header.split(";")
    _check_media_type(media_type.strip().lower())
    if "base64" not in (p.strip().lower() for p in params):
        data = urllib.parse.unquote_to_bytes(payload)
        _check_bytes(len(data), max_image_bytes)
        return data
    return _decode_base64(payload, max_image_bytes)


def _check_media_type(media_type: str) -> None:
    if not (media_type.startswith("image/") or media_type in _DATA_URL_MEDIA_TYPES):
        raise InvalidInputError(f"data URL media type {media_type!r} is not an image")


def _decode_base64(
    payload: str | bytes | memoryview,
    max_image_bytes: int | None,
    json_escapes: bool = False,
    buffers: FileBuffers | None = None,
) -> bytes | memoryview:
    _check_base64_length(len(payload), max_image_bytes)
    if buffers is not None and not isinstance(payload, str):
        data = _decoded_into_buffer(payload, buffers)
        if data is not None:
            _check_bytes(len(data), max_image_bytes)
            return data
    try:
        data = _b64decode(payload, json_escapes)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"data URL has invalid base64: {e}") from None
    _check_bytes(len(data), max_image_bytes)
    return data


def _check_base64_length(chars: int, max_image_bytes: int | None) -> None:
    """Refuse a payload far too long before decoding it. 4 base64 characters carry 3 bytes, but
    line breaks and JSON escapes ("\\/" for "/") add characters that carry none: only a text
    that would hold twice the limit is refused here; the decoded bytes are checked after."""
    if max_image_bytes is not None and chars // 4 * 3 > 2 * max_image_bytes:
        raise InvalidInputError(
            f"image is too large: {chars} characters of base64 hold over {2 * max_image_bytes} bytes "
            f"> limit {max_image_bytes}"
        )


def _decoded_into_buffer(payload: bytes | memoryview, buffers: FileBuffers) -> memoryview | None:
    """The file decoded into a buffer from `buffers`; None where it gives none or the text is not
    strict base64 (the buffer is dropped: freed)."""
    if not base64_into.AVAILABLE:
        return None
    out = buffers(base64_into.decoded_size_bound(len(payload)))
    if out is None:
        return None
    written = base64_into.decode_into(payload, out)
    return None if written is None else out[:written]


def _b64decode(payload: str | bytes | memoryview, json_escapes: bool = False) -> bytes:
    """SIMD base64 (pybase64): ~0.2-1.5 ms for a 5 MB payload where the standard library takes
    ~10 ms, the front end's largest per-image cost after JSON. Strict first (its fast path); then,
    as the standard library's default, skipping characters outside the alphabet (line breaks),
    after replacing JSON escapes if the text may hold them."""
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        if json_escapes:
            payload = _json_unescaped(payload)
        return pybase64.b64decode(payload)


def _json_unescaped(text: str | bytes | memoryview) -> str | bytes | memoryview:
    """The text of a JSON string with its escapes replaced; ValueError for an invalid escape."""
    raw = bytes(text) if not isinstance(text, str) else text.encode()
    if b"\\" not in raw:
        return text
    return json.loads(b'"' + raw + b'"')


def _read_url(
    url: str, allowed_root: str | None, max_image_bytes: int | None, fetch_remote: RemoteFetcher | None
) -> bytes:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if fetch_remote is not None:
            data = fetch_remote(url, max_image_bytes)
            _check_bytes(len(data), max_image_bytes)  # whatever the fetcher promised
            return data
        raise InvalidInputError(
            f"remote media is not enabled: cannot fetch {scheme}:// image URLs; send the image as a data: URL"
        )
    if scheme != "file":
        raise InvalidInputError(f"unsupported image URL scheme {scheme!r} (use data: URLs or local files)")
    if parts.netloc not in ("", "localhost"):
        raise InvalidInputError(f"file:// URL must name a local file, got host {parts.netloc!r}")
    return _read_local_file(urllib.parse.unquote(parts.path), allowed_root, max_image_bytes)


def _resolve_local_path(path: str, allowed_root: str | None) -> Path:
    if not path:
        raise InvalidInputError("empty image path")
    if "\x00" in path:  # os calls raise ValueError on it: a 500 before (found by the schema fuzz)
        raise InvalidInputError("local image path contains a NUL character")
    if allowed_root is None:
        return Path(path)
    root = Path(allowed_root).resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces `root` here
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError for a symlink loop
        raise InvalidInputError(f"local image path {path!r} cannot be resolved (a symlink loop?)") from None
    if not resolved.is_relative_to(root):
        raise InvalidInputError(f"local image path {path!r} is outside the allowed media directory")
    return resolved


def _read_local_file(path: str, allowed_root: str | None, max_image_bytes: int | None) -> bytes:
    """The bytes of a regular file; anything else (FIFO, device, socket, directory) is refused unread.

    Opening a FIFO for reading waits for a writer, forever if none comes, and opening a device
    may act on it. So the type is checked before opening, the open never waits (O_NONBLOCK),
    and type and size are checked again on the open descriptor, which is what gets read: the
    path may have been swapped in between.
    """
    fd = _open_regular_file(_resolve_local_path(path, allowed_root), path, allowed_root)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _check_regular_file(st.st_mode, path)
        _check_bytes(st.st_size, max_image_bytes)
        os.set_blocking(fd, True)  # a regular file after all: read it the ordinary way
        limit = -1 if max_image_bytes is None else max_image_bytes + 1
        try:
            data = f.read(limit)
        except OSError as e:
            raise InvalidInputError(f"cannot read local image file {path!r}: {e.strerror}") from None
    _check_bytes(len(data), max_image_bytes)  # the file may have grown since fstat
    return data


def _open_regular_file(resolved: Path, path: str, allowed_root: str | None) -> int:
    """A descriptor for `resolved`, opened without waiting, once its metadata says it is a regular file."""
    try:
        _check_regular_file(os.stat(resolved).st_mode, path)
        return os.open(resolved, _open_flags(allowed_root))
    except FileNotFoundError:
        raise InvalidInputError(f"local image file {path!r} does not exist") from None
    except PermissionError:
        raise InvalidInputError(f"local image file {path!r} is not readable") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink loop, or (O_NOFOLLOW) a symlink swapped in after the check
            raise InvalidInputError(
                f"local image path {path!r} is a symbolic link that cannot be followed"
            ) from None
        raise InvalidInputError(f"cannot open local image file {path!r}: {e.strerror}") from None


def _open_flags(allowed_root: str | None) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if allowed_root is not None:
        # The path was resolved and checked with every symlink followed, so its last component
        # is not a symlink now; O_NOFOLLOW refuses one swapped in before the open. (Offline,
        # without a root, symlinks are followed as any program would.)
        flags |= os.O_NOFOLLOW
    return flags


# What a local image path may name instead of a regular file, for the error message.
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular_file(mode: int, path: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "a special file")
    raise InvalidInputError(f"local image path {path!r} is {kind}, not a regular file")
