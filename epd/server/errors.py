"""OpenAI-style errors: one exception type, one body shape, handlers that never leak a 500 for bad input.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages[0].role", "code": null}}

| status | type                   | when                                                   |
|--------|------------------------|--------------------------------------------------------|
| 400    | invalid_request_error  | malformed JSON, wrong types, bad images, over context  |
| 401    | invalid_request_error  | missing or wrong API key (code invalid_api_key)        |
| 404    | invalid_request_error  | unknown model (code model_not_found) or route          |
| 408    | invalid_request_error  | headers or body not received in time (request_timeout) |
| 413    | invalid_request_error  | body over --max-request-bytes                          |
| 429    | rate_limit_error       | admission full, or a request that cannot meet its TTFT |
|        |                        | deadline with --reject-late (both with Retry-After)    |
| 503    | service_unavailable    | an instance is down, the engine stopped, the server is |
|        |                        | shutting down, or too many bodies are being received   |
|        |                        | at once (with Retry-After)                             |
| 500    | server_error           | our bug: logged with its traceback                     |

A 503 that ends a stream at shutdown arrives as an SSE error event, then `data: [DONE]`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from epd.inputs.errors import InvalidInputError

logger = logging.getLogger(__name__)

_TYPES = {401: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Location parts pydantic adds for union branches and validators, which name no field of ours.
_BRANCH_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before"}
# Discriminator values of chat content parts (epd.server.protocol).
_PART_TAGS = {"text", "image_url", "video_url"}


class APIError(Exception):
    """An error answer. `message` is shown to the client, so it must never hold secrets."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer (counted as 499, never sent)."""


class ShuttingDown(APIError):
    """The shutdown grace period is over: what still runs ends with this."""

    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down", code="service_unavailable")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def too_late(reason: str, retry_after: float) -> APIError:
    """A 429 for a request refused because it cannot meet its TTFT deadline (--reject-late)."""
    seconds = str(max(1, math.ceil(retry_after)))
    return APIError(
        429, f"request refused: {reason}", code="deadline_unmeetable", headers={"Retry-After": seconds}
    )


def from_validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """The most specific problem as a 400; other, unrelated problems are counted, not listed.

    Most specific: the deepest location, and at equal depth not a bare type mismatch (for a
    union such as `stop: str | list[str]`, "at most 16 items" says more than "not a string").
    """
    errors: Sequence[dict] = err.errors()
    if not errors:
        return bad_request("invalid request")
    first = max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")))
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return bad_request(f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}")
    param = format_loc(first.get("loc", ()))
    message = _message(first)
    if param:
        message = f"{param}: {message}"
    # Errors at a prefix of `param` are the other branches of the same union: not news.
    others = sum(1 for e in errors if e is not first and not param.startswith(format_loc(e.get("loc", ()))))
    if others:
        message += f" (and {others} more problem{'s' if others > 1 else ''})"
    return bad_request(message, param or None)


def format_loc(loc: Sequence[Any]) -> str:
    """('messages', 0, 'content', 1, 'image_url', 'image_url', 'url') -> messages[0].content[1].image_url.url

    Drops what pydantic adds for unions: branch names ('str', 'list[...]') and the tag of a
    content part ('text' / 'image_url' right after the part's index).
    """
    out = ""
    previous: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            isinstance(part, str)
            and _IDENTIFIER.fullmatch(part)
            and part not in _BRANCH_NAMES
            and part != "body"
            and not (isinstance(previous, int) and part in _PART_TAGS)
        ):
            out += f".{part}" if out else part
        previous = part
    return out


def _message(error: dict) -> str:
    if error.get("type") == "extra_forbidden":
        return "unknown field"
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def install_handlers(app: FastAPI) -> None:
    """Every exception becomes an OpenAI error body; the caller's mistakes are 4xx."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, err: ClientGone) -> Response:
        return Response(status_code=499)  # never delivered: there is nobody to read it

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        return from_validation_error(err).response()

    @app.exception_handler(InvalidInputError)
    async def _invalid_input(request: Request, err: InvalidInputError) -> JSONResponse:
        return bad_request(str(err)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        error = APIError(err.status_code, str(err.detail), code=code, headers=dict(err.headers or {}))
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(err).__name__})").response()
