"""Large base64 image URLs are lifted out of a body before parsing (epd.server.blobs), and only
where that cannot change what the request means."""

from __future__ import annotations

import base64
import json
import os

from epd.inputs.image import read_image_bytes
from epd.server.blobs import MIN_LIFTED_CHARS, QuoteIndex, blob_index, lift_data_urls


def b64(n: int, seed: int = 0) -> str:
    return base64.b64encode(os.urandom(n) if seed == 0 else bytes([seed % 256]) * n).decode()


def chat(*parts: dict) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def restored(body: bytes, blobs) -> dict:
    """The body as the client sent it: each reference replaced by its data URL again."""

    def put_back(value):
        if isinstance(value, dict):
            return {k: put_back(v) for k, v in value.items()}
        if isinstance(value, list):
            return [put_back(v) for v in value]
        index = blob_index(value) if isinstance(value, str) else None
        if index is not None:
            blob = blobs[index]
            return f"data:{blob.media_type};base64,{bytes(blob.payload).decode()}"
        return value

    return put_back(json.loads(body))


def test_image_urls_are_lifted_and_nothing_else_changes() -> None:
    big = [b64(3 * MIN_LIFTED_CHARS, seed=0) for _ in range(3)]
    sent = chat(
        image(f"data:image/png;base64,{big[0]}"),
        {"type": "text", "text": "compare"},
        image(f"data:image/jpeg;base64,{big[1]}"),
        image(f"data:IMAGE/WEBP;base64,{big[2]}"),
    )
    body = json.dumps(sent).encode()
    rest, blobs = lift_data_urls(bytearray(body))
    assert len(rest) < 1000 and len(blobs) == 3
    assert [b.media_type for b in blobs] == ["image/png", "image/jpeg", "image/webp"]
    assert restored(rest, blobs) == {**sent, "messages": [{"role": "user", "content": [
        image(f"data:image/png;base64,{big[0]}"),
        {"type": "text", "text": "compare"},
        image(f"data:image/jpeg;base64,{big[1]}"),
        image(f"data:image/webp;base64,{big[2]}"),  # media types are case-insensitive
    ]}]}  # fmt: skip


def test_what_could_change_the_meaning_stays_in_the_body() -> None:
    big = b64(3 * MIN_LIFTED_CHARS)
    keep = [
        chat({"type": "text", "text": f"data:image/png;base64,{big}"}),  # text that reads as a URL
        chat({"type": "text", "text": f'"url": "data:image/png;base64,{big}"'}),  # escaped quotes
        chat(image(f"data:image/png,{big}")),  # not base64: percent-encoded bytes
        chat(image("data:image/png;base64,iVBORw0KGgo=")),  # small: nothing to gain
        chat(image(f"data:image/png;base64,{big}\\")),  # a backslash before the closing quote
    ]
    for sent in keep:
        body = json.dumps(sent).encode()
        rest, blobs = lift_data_urls(bytearray(body))
        assert blobs == [] and bytes(rest) == body


def test_escapes_inside_a_lifted_url_decode_as_the_parsed_url_does() -> None:
    """JSON writers that escape "/" as "\\/" (PHP's json_encode), base64 broken into lines
    (a "\\n" escape), any escape at all: the image's bytes are those of the URL parsed whole."""
    image_bytes = os.urandom(3 * MIN_LIFTED_CHARS)
    text = base64.b64encode(image_bytes).decode()
    assert "/" in text
    lines = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    plain = json.dumps(chat(image(f"data:image/png;base64,{text}")))
    bodies = [
        plain.replace(text, text.replace("/", "\\/")),  # slashes escaped
        json.dumps(chat(image(f"data:image/png;base64,{lines}"))),  # line breaks, escaped
        plain.replace(text, text[:99] + "\\u0041" + text[100:]),  # a character escaped: another byte
    ]
    for body in bodies:
        rest, blobs = lift_data_urls(bytearray(body.encode()))
        assert len(blobs) == 1 and blobs[0].json_escapes and b"\\" in bytes(blobs[0].payload)
        parsed = json.loads(body)["messages"][0]["content"][0]["image_url"]["url"]
        assert read_image_bytes(blobs[0]) == read_image_bytes(parsed)
        # An image at the byte limit passes both ways: its escapes do not count against it.
        limit = len(read_image_bytes(parsed))
        at_limit = read_image_bytes(parsed, max_image_bytes=limit)
        assert read_image_bytes(blobs[0], max_image_bytes=limit) == at_limit
    assert [read_image_bytes(lift_data_urls(bytearray(b.encode()))[1][0]) == image_bytes for b in bodies] == [
        True,
        True,
        text[99] == "A",
    ]


def test_formatting_of_the_json_does_not_matter() -> None:
    big = b64(2 * MIN_LIFTED_CHARS)
    head = '{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{ "url" :\n\t'
    body = (head + f'"data:image/png;base64,{big}"' + '}}]}],"model":"m"}').encode()
    rest, blobs = lift_data_urls(body)
    assert len(blobs) == 1 and bytes(blobs[0].payload).decode() == big
    assert json.loads(rest)["messages"][0]["content"][0]["image_url"]["url"] == "epd-blob:0"


def test_blob_references() -> None:
    assert blob_index("epd-blob:0") == 0 and blob_index("epd-blob:12") == 12
    assert blob_index("epd-blob:x") == -1 and blob_index("epd-blob:") == -1
    assert blob_index("data:image/png;base64,xx") is None


def chunks_of(body: bytes, cut: list[int], as_slices: bool) -> list[bytes | memoryview]:
    """`body` cut at these offsets: slices of one buffer (as the socket fills it) or new bytes."""
    buffer = bytearray(body)
    edges = [0, *cut, len(body)]
    pieces = [memoryview(buffer)[a:b] for a, b in zip(edges, edges[1:])]
    return pieces if as_slices else [bytes(p) for p in pieces]


def test_quotes_noted_chunk_by_chunk_lift_what_a_scan_of_the_whole_body_lifts() -> None:
    big = [b64(3 * MIN_LIFTED_CHARS) for _ in range(2)]
    bodies = [
        json.dumps(chat(image(f"data:image/png;base64,{big[0]}"), image(f"data:image/jpeg;base64,{big[1]}"))),
        json.dumps(chat({"type": "text", "text": f'"url": "data:image/png;base64,{big[0]}"'})),  # kept
        json.dumps(chat(image(f"data:image/png;base64,{big[0]}\\"))),  # a backslash before the quote
        json.dumps(chat(image(f"data:image/png;base64,{big[0]}")))[:-40],  # cut short: no closing quote
    ]
    for text in bodies:
        body = text.encode()
        expected_rest, expected = lift_data_urls(bytearray(body))
        # Cuts everywhere: inside payloads, on quotes, at the very start and end.
        for cut in ([], [1], [body.index(b'"data:') + 1], [len(body) // 3, len(body) // 2, len(body) - 1]):
            for as_slices in (True, False):
                index = QuoteIndex()
                for piece in chunks_of(body, cut, as_slices):
                    index.add(piece)
                assert index.positions == [i for i, c in enumerate(body) if c == ord('"')]
                rest, blobs = lift_data_urls(bytearray(body), index.positions)
                assert bytes(rest) == bytes(expected_rest)
                assert [(b.media_type, bytes(b.payload)) for b in blobs] == [
                    (b.media_type, bytes(b.payload)) for b in expected
                ]
