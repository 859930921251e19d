"""Which image URLs a request may use, decided before any byte is read.

| URL                          | allowed when                      | then checked by                   |
|------------------------------|-----------------------------------|-----------------------------------|
| `data:image/...;base64,...`  | always                            | epd.inputs.image (bytes, pixels)  |
| `epd-blob:N` (a large data   | N is one of this request's        | epd.inputs.image, as data: URLs   |
| URL lifted out of the body)  | lifted URLs (epd.server.blobs)    |                                   |
| `file://...` or a plain path | --allowed-local-media-path is set | epd.inputs.image (stays under it, |
|                              |                                   | regular files only: no FIFOs...)  |
| `http://`, `https://`        | --allow-remote-media              | epd.server.fetch (no private IPs) |
| anything else                | never                             |                                   |

The offline API trusts its caller with local files; the server must not, so the gate for
local paths lives here, in front of the input processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epd.inputs.image import DataURL
from epd.server.blobs import blob_index
from epd.server.errors import bad_request
from epd.server.protocol import ChatMessage, ImagePart, VideoPart

_REMOTE = ("http", "https")


@dataclass(frozen=True)
class MediaPolicy:
    allow_local: bool = False
    allow_remote: bool = False

    def check(self, url: str, param: str) -> None:
        """Raise a 400 unless this server may read `url`."""
        scheme = _scheme(url)
        if scheme == "data":
            return
        if scheme in _REMOTE:
            if url[len(scheme) : len(scheme) + 3] != "://":  # else the loader would take it for a path
                raise bad_request(f"malformed {scheme} URL: expected {scheme}://host/...", param)
            if not self.allow_remote:
                raise bad_request(
                    "remote image URLs are not enabled on this server (start it with "
                    "--allow-remote-media); send the image as a data: URL",
                    param,
                )
            return
        if scheme in ("file", ""):
            if not self.allow_local:
                raise bad_request(
                    "local image files are not enabled on this server (start it with "
                    "--allowed-local-media-path DIR); send the image as a data: URL",
                    param,
                )
            return
        raise bad_request(f"unsupported image URL scheme {scheme!r} (use data:, file: or http(s):)", param)


def engine_messages(
    messages: list[ChatMessage], policy: MediaPolicy, blobs: Sequence[DataURL] = ()
) -> list[dict]:
    """Validated messages -> the plain dicts `InputProcessor.process_chat` takes, URLs checked.
    `blobs`: the data URLs lifted out of the body (epd.server.blobs), which `epd-blob:N` names."""
    out = []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if isinstance(msg.content, str):
            content: str | list[dict] = msg.content
        else:
            content = [
                _part(part, f"messages[{i}].content[{j}]", policy, blobs)
                for j, part in enumerate(msg.content)
            ]
        out.append({"role": role, "content": content})
    return out


def _part(part: object, param: str, policy: MediaPolicy, blobs: Sequence[DataURL]) -> dict:
    if not isinstance(part, (ImagePart, VideoPart)):
        return {"type": "text", "text": part.text}
    kind = part.type  # image_url or video_url: the same URL rules
    url = getattr(part, kind).url
    index = blob_index(url)
    if index is None:
        policy.check(url, f"{param}.{kind}.url")
        return {"type": kind, kind: {"url": url}}
    if not 0 <= index < len(blobs):
        raise bad_request(f"{url!r} names no media of this request", f"{param}.{kind}.url")
    return {"type": kind, kind: {"url": blobs[index]}}


def _scheme(url: str) -> str:
    """Lower-case scheme, or "" for a plain path. A Windows drive letter is not a scheme."""
    head, sep, _ = url.partition(":")
    if not sep or len(head) < 2 or not head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return ""
    return head.lower()
