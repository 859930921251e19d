"""Where h11 stands in a request body of known length, and how to end it: the two places
epd.server.connections reaches past h11's public API, here so that they are easy to check.

h11 (pinned in requirements/lock.txt) reads a Content-Length body with a `ContentLengthReader`
that counts the bytes still due in `_remaining`; once it is 0, `next_event()` returns
`EndOfMessage` and the connection moves on. Both functions check that shape first and answer
None / False otherwise, so another h11 falls back to the ordinary path (every byte through
h11) instead of breaking; tests/server/test_h11_body.py fails if the shape changes.
"""

from __future__ import annotations

import h11


def content_length_left(conn: h11.Connection) -> int | None:
    """Bytes of the client's Content-Length body still to come, when h11 has parsed the
    request's headers, holds no unread byte and reads such a body now; else None."""
    if conn.their_state is not h11.SEND_BODY:
        return None
    reader = _content_length_reader(conn)
    if reader is None or conn.trailing_data[0]:
        return None
    return reader._remaining


def end_content_length(conn: h11.Connection) -> bool:
    """Tell h11 that the body's remaining bytes were taken past it: its next event is
    `EndOfMessage`. False (nothing done) if it reads no Content-Length body now."""
    reader = _content_length_reader(conn) if conn.their_state is h11.SEND_BODY else None
    if reader is None:
        return False
    reader._remaining = 0
    return True


def _content_length_reader(conn: h11.Connection) -> object | None:
    reader = getattr(conn, "_reader", None)
    if type(reader).__name__ != "ContentLengthReader" or type(getattr(reader, "_remaining", None)) is not int:
        return None
    return reader
