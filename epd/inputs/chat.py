"""OpenAI-style chat messages -> prompt text (via the model's chat template) + image sources.

The template is the checkpoint's own Jinja template, rendered the way transformers'
`apply_chat_template(..., tokenize=False)` renders it: an immutable sandboxed environment
with `trim_blocks` and `lstrip_blocks`, the same globals (`raise_exception`, `strftime_now`,
`namespace`, `dict`), the same `tojson`, the tokenizer's named special tokens as variables,
and message data rebuilt from plain JSON types (rich objects such as PIL images become an
inert "<TypeName>" string: templates only test that an image key is present).

The render also says where the messages' own text (content strings and text parts, of
every role) lies in the prompt, so the tokenizer can keep `<|im_end|>` typed by a client
from being read as a control token: the template is rendered a second time with each text
replaced by a marker no text contains, and the texts are put back where the markers came
out. If that does not rebuild the prompt (the template rewrote a text, e.g. stripped it),
the places are unknown and `RenderedChat.message_spans` is None.

Accepted message shape (anything else raises `InvalidInputError`):

    {"role": "system" | "user" | "assistant" | "tool",
     "content": str | [part, ...]}
    part = {"type": "text", "text": str}
         | {"type": "image_url", "image_url": {"url": str} | str}   # data:/file: URL or local path
         | {"type": "image", "image": PIL image | str | bytes}
         | {"type": "video_url", "video_url": {"url": str} | str}   # a video file: data: URL or path
         | {"type": "video", "video": [PIL frames] | str | bytes}  # offline: frames or a file

Image and video parts reach the template as {"type": "image"} / {"type": "video"} parts (as vLLM
hands them over), and their sources come back in order, images and videos apart.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import DataURL, ImageSource

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RenderedChat:
    """The prompt text, the image sources its image placeholders stand for (in order), and
    where the messages' own text lies in it."""

    text: str
    images: list[ImageSource]
    # Sorted [start, end) character ranges of `text` holding message text, or None when the
    # template rewrote message text so that its place in `text` is unknown.
    message_spans: tuple[tuple[int, int], ...] | None = ()
    message_texts: tuple[str, ...] = ()  # the non-empty message texts, in message order
    videos: list = field(default_factory=list)  # video sources, in order (epd.inputs.video)


class ChatTemplate:
    """A compiled chat template plus the special-token variables it renders with."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, special_tokens: dict[str, str] | None = None
    ) -> ChatTemplate:
        return cls(load_chat_template(model_dir), special_tokens)

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> RenderedChat:
        """Validate `messages`, render them, and return the text with the image sources in order.

        `template_kwargs` (e.g. `add_vision_id=True`) reach the template as variables.
        Raises `InvalidInputError` for malformed messages or when the template rejects them.
        """
        template_messages, images, videos = parse_messages_media(messages)
        variables = {**self.special_tokens, **_plain(template_kwargs)}
        text = self._render(template_messages, add_generation_prompt, variables)
        marker = _TextMarker()
        marked_messages, texts = marker.mark(template_messages)
        marked = self._render(marked_messages, add_generation_prompt, variables)
        return RenderedChat(text, images, marker.spans(marked, texts, text), tuple(texts), videos)

    def _render(self, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise InvalidInputError(f"chat template rejected the messages: {e}") from None


def load_chat_template(model_dir: str | os.PathLike) -> str:
    """The checkpoint's template, with the precedence AutoTokenizer uses.

    chat_template.jinja, then tokenizer_config.json's `chat_template` (a string, or a list of
    named templates of which "default" is taken), then the processor's chat_template.json.
    """
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                template = _pick_default(json.load(f).get("chat_template"))
            if template is not None:
                return template
    raise FileNotFoundError(f"no chat template in {model_dir}")


def parse_messages(messages: Any) -> tuple[list[dict], list[ImageSource]]:
    """Validate messages; return their plain-data copy for the template and the image sources in order."""
    plain, images, _ = parse_messages_media(messages)
    return plain, images


def parse_messages_media(messages: Any) -> tuple[list[dict], list[ImageSource], list]:
    """`parse_messages`, with the video sources in order too."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list")
    media = _Media([], [])
    return [_parse_message(msg, i, media) for i, msg in enumerate(messages)], media.images, media.videos


@dataclass
class _Media:
    images: list[ImageSource]
    videos: list


_TEMPLATE_TYPES = {"image_url": "image", "video_url": "video"}


def _parse_message(msg: Any, index: int, media: _Media) -> dict:
    where = f"messages[{index}]"
    if not isinstance(msg, dict):
        raise InvalidInputError(f"{where} must be an object")
    # Like transformers: a key set to None (OpenAI clients send content=None...) counts as absent.
    msg = {k: v for k, v in msg.items() if v is not None}
    role = msg.get("role")
    if role is None:
        raise InvalidInputError(f"{where} has no 'role'")
    if role not in ROLES:
        raise InvalidInputError(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if "content" not in msg:
        raise InvalidInputError(f"{where} has no 'content'")
    content = msg["content"]
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(part, f"{where}.content[{j}]", media)
    elif not isinstance(content, str):
        raise InvalidInputError(f"{where}.content must be a string or a list of parts")
    plain = _plain(msg)
    if isinstance(content, list):  # as vLLM: templates testing `type == 'image'` (InternVL's) see URLs
        parts = plain["content"]
        plain["content"] = [{**p, "type": _TEMPLATE_TYPES.get(p["type"], p["type"])} for p in parts]
    return plain


def _check_part(part: Any, where: str, media: _Media) -> None:
    if not isinstance(part, dict):
        raise InvalidInputError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidInputError(f"{where} of type 'text' needs a string 'text'")
    elif kind == "image_url":
        media.images.append(_image_url(part.get("image_url"), where))
    elif kind == "video_url":
        media.videos.append(_image_url(part.get("video_url"), where, kind))
    elif kind in ("image", "video"):
        if part.get(kind) is None:
            raise InvalidInputError(f"{where} of type {kind!r} needs an {kind!r}")
        (media.images if kind == "image" else media.videos).append(part[kind])
    elif kind is None:
        raise InvalidInputError(f"{where} has no 'type'")
    else:
        raise InvalidInputError(
            f"{where} has unknown type {kind!r} "
            "(expected 'text', 'image_url', 'image', 'video_url' or 'video')"
        )


def _image_url(value: Any, where: str, kind: str = "image_url") -> str | DataURL:
    # OpenAI sends {"url": ..., "detail": ...}; some clients send the URL string itself. The
    # server hands over base64 data URLs already split (DataURL: lifted out of the body).
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, DataURL):
        return url
    if not isinstance(url, str) or not url:
        raise InvalidInputError(f"{where} of type {kind!r} needs {kind!r}: {{'url': <string>}}")
    return url


# Any marker's shape; only those with this render's nonce are its own. (One pattern for all
# renders: compiling one per render, with its nonce in it, cost ~70 us a request.)
_MARKER = re.compile("\ue000([0-9a-f]{32}):(\\d+)\ue001")


class _TextMarker:
    """Stands in for message texts during a render, to find where the template puts them.

    A marker holds a random nonce drawn for this render between two private-use characters:
    no message text or template output can be mistaken for one.
    """

    def __init__(self) -> None:
        self._nonce = secrets.token_hex(16)
        self._format = "\ue000" + self._nonce + ":{}\ue001"

    def mark(self, messages: list[dict]) -> tuple[list[dict], list[str]]:
        """Copies of `messages` with each non-empty text replaced by a marker, and the texts in order.

        Empty texts stay: templates may test a text for emptiness, and an empty text holds nothing.
        """
        texts: list[str] = []

        def marked(text: str) -> str:
            if not text:
                return text
            texts.append(text)
            return self._format.format(len(texts) - 1)

        out = []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, str):
                content = marked(content)
            else:
                content = [
                    {**part, "text": marked(part["text"])} if part.get("type") == "text" else part
                    for part in content
                ]
            out.append({**msg, "content": content})
        return out, texts

    def spans(self, marked: str, texts: list[str], text: str) -> tuple[tuple[int, int], ...] | None:
        """Where `texts` lie in `text`, read from the render with markers; None if they do not rebuild it."""
        rebuilt: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = copied = 0  # in the rebuilt text; in `marked`, up to where it is copied
        for marker in _MARKER.finditer(marked):
            if marker.group(1) != self._nonce:
                continue  # another render's marker, typed in a message: plain text here
            rebuilt.append(marked[copied : marker.start()])
            piece = texts[int(marker.group(2))]
            pos += marker.start() - copied
            spans.append((pos, pos + len(piece)))
            rebuilt.append(piece)
            pos += len(piece)
            copied = marker.end()
        rebuilt.append(marked[copied:])
        return tuple(spans) if "".join(rebuilt) == text else None


def _pick_default(template: Any) -> str | None:
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return by_name.get("default")
    return template if isinstance(template, str) else None


def _plain(value: Any) -> Any:
    """Rebuild `value` from JSON types; anything else becomes "<TypeName>" (as transformers does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base in (bool, str, int, float):  # subclasses (enums...) carry methods the sandbox doesn't vet
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, so templates can't reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env.from_string(source)
