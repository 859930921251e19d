"""Cheap limits on a request body's JSON shape, checked before pydantic builds anything.

pydantic validates a body in one call that holds the GIL, and its `max_length` checks come
after every item is built: on 2 cores 300k one-word messages take 2 s, a `messages` array of
4M integers 30 s (an error object each), while the event loop (/health, every stream) stands
still. msgspec walks the same bytes without building them (`Raw` slices, hundreds of MB/s),
so these limits are found in milliseconds and the body is refused before pydantic sees it:

| what                                             | limit                                  |
|--------------------------------------------------|----------------------------------------|
| messages                                         | 2048 (OpenAI's own limit)              |
| content parts, all messages together             | 4096                                   |
| the keys of every object of the schema           | its model's fields: another key is a   |
|                                                  | 400 "unknown field", as pydantic says  |
| a completion's prompt token ids                  | max_model_len - 1 (more never fit)     |
| any other array or object (stop lists, a value   | 64 KiB of JSON in all                  |
| of the wrong type...)                            |                                        |

Within them a body has at most a few thousand objects, which pydantic validates in tens of
milliseconds. Types and values stay pydantic's to judge: the walk only measures.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import msgspec
from pydantic import BaseModel

from epd.server.errors import bad_request
from epd.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ImagePart,
    ImageURL,
    ResponseFormat,
    StreamOptions,
    TextPart,
    VideoPart,
    VideoURL,
)

MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 4096
MAX_OTHER_JSON_BYTES = 64 << 10
_FIRST_TRY_ITEMS = 16  # most arrays are short: a small first decode, a capped one only if needed

_ABSENT = msgspec.Raw(b"")
_UNKNOWN_FIELD = re.compile(r"unknown field `(.*)`")
_KINDS = {ord("{"): "object", ord("["): "array", ord('"'): "string"}


@dataclass(frozen=True)
class ObjectShape:
    """An object with these keys; `objects` are walked into, `arrays` are counted (_Walk.ARRAYS)."""

    keys: frozenset[str]
    objects: dict[str, ObjectShape] = field(default_factory=dict)
    arrays: frozenset[str] = frozenset()


def _keys(*models: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for model in models for name in model.model_fields)


PART = ObjectShape(
    _keys(TextPart, ImagePart, VideoPart),
    objects={"image_url": ObjectShape(_keys(ImageURL)), "video_url": ObjectShape(_keys(VideoURL))},
)
MESSAGE = ObjectShape(_keys(ChatMessage), arrays=frozenset({"content"}))
_STREAM_OPTIONS = ObjectShape(_keys(StreamOptions))
CHAT = ObjectShape(
    _keys(ChatCompletionRequest),
    objects={"stream_options": _STREAM_OPTIONS, "response_format": ObjectShape(_keys(ResponseFormat))},
    arrays=frozenset({"messages"}),
)
COMPLETION = ObjectShape(
    _keys(CompletionRequest), objects={"stream_options": _STREAM_OPTIONS}, arrays=frozenset({"prompt"})
)


def check_shape(body: bytes | bytearray, shape: ObjectShape, max_model_len: int) -> None:
    """Raise a 400 when `body` is not JSON or exceeds a limit of the module docstring."""
    try:
        _Walk(max_model_len).value(_trimmed(body), shape, "")
    except (msgspec.DecodeError, UnicodeError) as e:  # msgspec reads keys as UTF-8 strings
        raise bad_request(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("request body is not valid JSON: nested too deeply") from None


class _Walk:
    """One body's walk, with what it has counted against the per-request limits."""

    def __init__(self, max_model_len: int) -> None:
        self.max_prompt_ids = max_model_len - 1
        self.parts = 0
        self.other_bytes = 0

    def value(self, raw: msgspec.Raw, shape: ObjectShape | None, param: str) -> None:
        """Walk into `raw` if it is the object `shape` describes; count any other array or object."""
        kind = _kind(raw)
        if kind == "object" and shape is not None:
            self._object(raw, shape, param)
        elif kind in ("object", "array"):
            self._other(raw, kind, param)

    def _object(self, raw: msgspec.Raw, shape: ObjectShape, param: str) -> None:
        try:
            fields = msgspec.json.decode(raw, type=_fields_struct(shape.keys))
        except msgspec.ValidationError as e:  # every field is Raw: only an unknown key fails
            match = _UNKNOWN_FIELD.search(str(e))
            where = _join(param, match.group(1) if match else "?")
            raise bad_request(f"{where}: unknown field", where) from None
        for name in shape.keys:
            value = getattr(fields, name)
            if value is _ABSENT:
                continue
            if name in shape.arrays and _kind(value) == "array":
                self._array(name, value, _join(param, name))
            else:
                self.value(value, shape.objects.get(name), _join(param, name))

    def _array(self, name: str, raw: msgspec.Raw, param: str) -> None:
        if name == "messages":
            self._messages(raw, param)
        elif name == "content":
            self._content(raw, param)
        else:
            self._prompt(raw, param)

    def _other(self, raw: msgspec.Raw, kind: str, param: str) -> None:
        # Not a container this walk knows: pydantic will parse it whole to judge it.
        self.other_bytes += len(raw)
        if self.other_bytes > MAX_OTHER_JSON_BYTES:
            where = param or "request body"
            raise bad_request(
                f"{where}: unexpected JSON {kind} of {len(raw)} bytes (a request may hold at most "
                f"{MAX_OTHER_JSON_BYTES} bytes of arrays and objects outside messages and prompt)",
                param or None,
            )

    def _messages(self, raw: msgspec.Raw, param: str) -> None:
        messages = _first_items(raw, MAX_MESSAGES)  # one decode: usually the only array this big
        if len(messages) > MAX_MESSAGES:
            raise bad_request(f"{param}: at most {MAX_MESSAGES} messages per request", param)
        for i, message in enumerate(messages):
            self.value(message, MESSAGE, f"{param}[{i}]")

    def _content(self, raw: msgspec.Raw, param: str) -> None:
        left = MAX_CONTENT_PARTS - self.parts
        parts = _items(raw, left)
        if len(parts) > left:
            raise bad_request(
                f"{param}: at most {MAX_CONTENT_PARTS} content parts per request (all messages together)",
                param,
            )
        self.parts += len(parts)
        for j, part in enumerate(parts):
            self.value(part, PART, f"{param}[{j}]")

    def _prompt(self, raw: msgspec.Raw, param: str) -> None:
        """Token ids, or a batch of one prompt (text or token ids)."""
        head = _items(raw, 1)
        if not head or _kind(head[0]) not in ("array", "string"):
            self._prompt_ids(raw, param)
        elif len(head) > 1:
            raise bad_request(f"{param}: one prompt per request (a list of one prompt is accepted)", param)
        elif _kind(head[0]) == "array":
            self._prompt_ids(head[0], f"{param}[0]")

    def _prompt_ids(self, raw: msgspec.Raw, param: str) -> None:
        # Token ids hold no commas, so they number the commas plus one (a list that also holds
        # strings may count more: pydantic refuses those anyway).
        count = bytes(raw).count(b",") + 1
        if count > self.max_prompt_ids:
            raise bad_request(
                f"{param}: {count} token ids cannot fit this model's maximum context length of "
                f"{self.max_prompt_ids + 1} tokens",
                param,
            )


def _trimmed(body: bytes | bytearray) -> msgspec.Raw:
    """The body without outer whitespace; copied only when it has some (rare)."""
    if body[:1].isspace() or body[-1:].isspace():
        return msgspec.Raw(bytes(body).strip())
    return msgspec.Raw(body)


def _kind(raw: msgspec.Raw) -> str | None:
    """'object', 'array' or 'string' from the first byte (a decoded Raw starts at its value)."""
    return _KINDS.get(memoryview(raw)[0]) if len(raw) else None


def _items(raw: msgspec.Raw, limit: int) -> list[msgspec.Raw]:
    """The array's first items, `limit + 1` at most: one more than `limit` means "too many"."""
    items = _first_items(raw, min(limit, _FIRST_TRY_ITEMS))
    if len(items) > _FIRST_TRY_ITEMS and limit > _FIRST_TRY_ITEMS:
        items = _first_items(raw, limit)
    return items


def _first_items(raw: msgspec.Raw, limit: int) -> list[msgspec.Raw]:
    # msgspec fills the slots of an array-like struct and skips what follows without building
    # it, so a million-item array costs one pass over its bytes, not a million objects.
    capped = msgspec.json.decode(raw, type=_capped_array(_slots(limit)))
    items = []
    for name in capped.__struct_fields__[: limit + 1]:
        value = getattr(capped, name)
        if value is _ABSENT:
            break
        items.append(value)
    return items


def _slots(limit: int) -> int:
    """A power of two above `limit`: few struct types, each with a slot per item (and one more)."""
    return 1 << limit.bit_length()


@functools.cache
def _capped_array(slots: int) -> type[msgspec.Struct]:
    fields = [(f"i{k}", msgspec.Raw, _ABSENT) for k in range(slots)]
    return msgspec.defstruct(f"CappedArray{slots}", fields, array_like=True)


@functools.cache
def _fields_struct(keys: frozenset[str]) -> type[msgspec.Struct]:
    fields = [(name, msgspec.Raw, _ABSENT) for name in sorted(keys)]
    return msgspec.defstruct("Fields", fields, forbid_unknown_fields=True)


def _join(param: str, name: str) -> str:
    return f"{param}.{name}" if param else name
