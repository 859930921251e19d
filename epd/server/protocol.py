"""Request bodies of the OpenAI-compatible API, validated strictly.

Decisions (the fuzz tests hold us to them):
- Unknown top-level or nested fields are a 400 (`extra="forbid"`), as OpenAI itself answers
  "Unrecognized request argument". A typo (`max_token`) then fails loudly instead of being
  silently ignored, which is what vLLM does.
- Types are strict: `"0.5"` is not a number, `1` is not a boolean, NaN/Infinity are refused.
- OpenAI fields epd does not implement are accepted only at their neutral value (`n=1`,
  `frequency_penalty=0`, `logit_bias={}`, ...), so standard clients work; anything else is a
  400 that names the field.
- Integers that travel to instance processes are bounded here (msgpack carries 64 bits).
- vLLM extensions: `top_k`, `min_p`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`,
  `include_stop_str_in_output`, `return_token_ids`, `priority` (lower: sooner, with
  --scheduling-policy priority); epd's own: `epd_timings`, `slo_ttft` (seconds to the first token,
  with --scheduling-policy slo; default --slo-ttft) and `slo_tpot` (seconds per output token after
  the first: a decoding instance keeps its steps within it; default --slo-tpot).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_STRINGS = 16  # the stop check runs per token and per string: bound the work
MAX_STOP_TOKEN_IDS = 1024
MAX_TOP_LOGPROBS = 20
INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

# field -> values that mean "feature off"; other values are refused as unsupported.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "echo": (None, False),
    "suffix": (None, ""),
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImageURL(StrictModel):
    url: Annotated[str, Field(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored: one resolution policy


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(StrictModel):
    url: Annotated[str, Field(min_length=1)]


class VideoPart(StrictModel):
    """A video file as a data URL (`data:video/mp4;base64,...`) or an allowed local file, as vLLM
    takes it; decoded on the encoding side (epd.inputs.video_file)."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(StrictModel):
    """`developer` is OpenAI's newer name for `system`. Assistant messages need content:
    tool calls are not supported."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    name: str | None = None
    tool_call_id: str | None = None


class StreamOptions(StrictModel):
    include_usage: bool = False


class ResponseFormat(StrictModel):
    type: Literal["text"]


class SamplingRequest(StrictModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None  # None: the served model
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: float | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: float | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: (
        Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]], Field(max_length=MAX_STOP_TOKEN_IDS)]
        | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    epd_timings: bool = False
    slo_ttft: Annotated[float, Field(gt=0)] | None = None
    slo_tpot: Annotated[float, Field(gt=0)] | None = None
    priority: Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)] = 0
    user: str | None = None  # accepted, ignored
    # OpenAI fields accepted only at their neutral value (see _NEUTRAL).
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check_supported(self) -> SamplingRequest:
        for name in self.model_fields_set & _NEUTRAL.keys():
            value = getattr(self, name)
            if value not in _NEUTRAL[name]:
                raise ValueError(f"{name}={value!r} is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for max_completion_tokens: the newer one wins.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: alternatives per position, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = list[Annotated[int, Field(ge=0, le=INT32_MAX)]]


class CompletionRequest(SamplingRequest):
    """One prompt per request (text or token ids); a batch of one is unwrapped."""

    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @property
    def requested_max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default here

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt[0]
        return prompt
