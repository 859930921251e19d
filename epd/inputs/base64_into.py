"""Strict base64 decoded into a buffer the caller gives (shared memory the encoders read), not into
new bytes that would then be copied there.

pybase64 decodes into new `bytes` only. Its extension module carries the C library it is built
on (libbase64, SIMD) and exports that library's
`int base64_decode(const char *src, size_t srclen, char *out, size_t *outlen, int flags)`; this
calls it through ctypes, which releases the GIL as pybase64 does. The library is pybase64's, not
ours: if the symbol is missing or a decode at import disagrees with pybase64's own on a known text,
`decode_into` is unavailable (`AVAILABLE` False) and callers decode as before.

What it accepts is what `pybase64.b64decode(text, validate=True)` accepts (padded base64, no line
breaks or other characters): on anything else it returns None and the caller takes the lenient
path, as for strict pybase64's error.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pybase64


def _load() -> ctypes._CFuncPtr | None:
    try:
        import pybase64._pybase64 as extension

        decode = ctypes.CDLL(extension.__file__).base64_decode
    except (ImportError, OSError, AttributeError):
        return None
    decode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_int,
    ]
    decode.restype = ctypes.c_int
    return decode


_decode = _load()


def decoded_size_bound(chars: int) -> int:
    """At most this many bytes come out of `chars` characters of base64."""
    return chars // 4 * 3


def decode_into(text: bytes | bytearray | memoryview, out: memoryview) -> int | None:
    """Decode `text` into `out` (at least `decoded_size_bound(len(text))` bytes); the number of
    bytes written, or None if `text` is not strict base64 (nothing meaningful is in `out` then)."""
    if _decode is None:
        return None
    if len(text) % 4 or len(out) < decoded_size_bound(len(text)):
        return None
    if not len(text):
        return 0
    written = ctypes.c_size_t(0)
    src = np.frombuffer(text, np.uint8).ctypes.data
    dst = np.frombuffer(out, np.uint8).ctypes.data
    ok = _decode(src, len(text), dst, ctypes.byref(written), 0)
    return written.value if ok == 1 else None


def _agrees_with_pybase64() -> bool:
    raw = os.urandom(3 * 1000 + 2)  # a length that pads
    text = pybase64.b64encode(raw)
    out = bytearray(decoded_size_bound(len(text)))
    n = decode_into(text, memoryview(out))
    return n == len(raw) and bytes(out[:n]) == raw and decode_into(b"QQ=\n", memoryview(out)) is None


AVAILABLE = _decode is not None and _agrees_with_pybase64()
if not AVAILABLE:
    _decode = None
