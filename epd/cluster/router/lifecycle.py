"""A request's lifecycle as the router sees it: one `Stage` per request, moved only by `advance`.

The router learns about a request only through messages, so each stage is what it knows, not what
an instance is doing at that moment ("PLACED" may mean P is still queueing the task, or waiting
for embeddings another request asked for, or prefilling).

| stage      | the router knows                                   | the ledger holds for it            |
|------------|----------------------------------------------------|------------------------------------|
| PLACED     | PrefillTask sent to P; no image sent to encode     | prefill on P, decode on D          |
|            | (none, P holds them or gets them for another       |                                    |
|            | request, or P encodes them itself: EP)             |                                    |
| ENCODING   | images sent to encoders (at arrival, or when P     | + patches of each image on its E   |
|            | asked); some EncodeTasks not done                  |                                    |
| PREFILLING | every image sent is encoded; no token yet          | prefill on P, decode on D          |
| DECODING   | the first token is in; D (or P, if it decodes)     | decode on D (+ an image whose      |
|            | produces the rest                                  | EncodeDone is late: P had it first)|
| RESUMING   | a new attempt goes on from its tokens: a live P    | prefill on P, decode on D (+ the   |
|            | prefills prompt + tokens (its images sent to       | patches of each image sent to an E)|
|            | encode if it lacks them) and samples the next one  |                                    |
| FINISHED   | ended by its instance (stop, length, ...)          | nothing (terminal)                 |
| ABORTED    | ended by the caller                                | nothing (terminal)                 |
| FAILED     | an instance reported an error, died holding its    | nothing (terminal)                 |
|            | work, or no encoder was left for its images        |                                    |

| from                         | trigger: what happened                              | to         |
|------------------------------|-----------------------------------------------------|------------|
| (new)                        | add_request                                         | PLACED     |
| PLACED, ENCODING, PREFILLING | NEED_IMAGES: images sent to encode: at arrival, or  | ENCODING   |
|                              | on NeedEmbeddings (P lacks one the router thought   |            |
|                              | it held; it may ask after the others were encoded)  |            |
| ENCODING                     | IMAGE_ENCODED: EncodeDone, other images still out   | ENCODING   |
| ENCODING                     | LAST_IMAGE_ENCODED: EncodeDone, no image out        | PREFILLING |
| DECODING                     | IMAGE_ENCODED, LAST_IMAGE_ENCODED: a late EncodeDone| DECODING   |
|                              | (the embedding reached P before E's report)         |            |
| RESUMING                     | NEED_IMAGES, IMAGE_ENCODED, LAST_IMAGE_ENCODED: the | RESUMING   |
|                              | new P lacks images, as a new request's P may        |            |
| PLACED, ENCODING, PREFILLING | RETRY: an instance holding its prefill or decode    | PLACED     |
|                              | died; a new attempt starts (recovery.py)            |            |
| DECODING, RESUMING           | CONTINUE: an instance holding its decode (or its    | RESUMING   |
|                              | KV on the way) died; a new attempt goes on from its |            |
|                              | tokens (recovery.py)                                |            |
| PLACED, ENCODING, PREFILLING | FIRST_TOKEN: the first RequestUpdate with tokens    | DECODING   |
| DECODING, RESUMING           | TOKENS: a later RequestUpdate, in order             | DECODING   |
| any live stage               | FINISH: a RequestUpdate with a finish_reason        | FINISHED   |
| any live stage               | ABORT: abort()                                      | ABORTED    |
| any live stage               | FAIL: RequestError, a dead instance holding its     | FAILED     |
|                              | work, no live encoder for its images                |            |

Not transitions: a RequestUpdate that overtook the one before it (D's tokens before P's first) is
held on the record and applied, in order, once the gap is filled; messages about a request that
already ended (late EncodeDone, D's last update after an abort) find no record and are ignored.
Anything else (an EncodeDone before any image was asked for, a message moving a terminal stage)
is a bug and raises IllegalTransition.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from epd.cluster.messages import RequestUpdate
from epd.inputs.types import ProcessedPrompt
from epd.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from epd.sampling_params import SamplingParams


class Stage(enum.Enum):
    PLACED = "placed"
    ENCODING = "encoding"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    RESUMING = "resuming"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


class Trigger(enum.Enum):
    NEED_IMAGES = "need_images"
    IMAGE_ENCODED = "image_encoded"
    LAST_IMAGE_ENCODED = "last_image_encoded"
    RETRY = "retry"
    CONTINUE = "continue"
    FIRST_TOKEN = "first_token"
    TOKENS = "tokens"
    FINISH = "finish"
    ABORT = "abort"
    FAIL = "fail"


TERMINAL = frozenset({Stage.FINISHED, Stage.ABORTED, Stage.FAILED})
LIVE = tuple(s for s in Stage if s not in TERMINAL)
BEFORE_FIRST_TOKEN = (Stage.PLACED, Stage.ENCODING, Stage.PREFILLING)

# (stage, trigger) -> next stage: the second table of the module docstring, and nothing else.
TRANSITIONS: dict[tuple[Stage, Trigger], Stage] = {
    (Stage.PLACED, Trigger.NEED_IMAGES): Stage.ENCODING,
    (Stage.ENCODING, Trigger.NEED_IMAGES): Stage.ENCODING,
    (Stage.PREFILLING, Trigger.NEED_IMAGES): Stage.ENCODING,
    (Stage.ENCODING, Trigger.IMAGE_ENCODED): Stage.ENCODING,
    (Stage.DECODING, Trigger.IMAGE_ENCODED): Stage.DECODING,
    (Stage.ENCODING, Trigger.LAST_IMAGE_ENCODED): Stage.PREFILLING,
    (Stage.DECODING, Trigger.LAST_IMAGE_ENCODED): Stage.DECODING,
    **{(s, Trigger.RETRY): Stage.PLACED for s in BEFORE_FIRST_TOKEN},
    # A continuation is a stage of its own: its new P may lack the images and have them encoded
    # (NEED_IMAGES), which after P's first token is a bug.
    (Stage.DECODING, Trigger.CONTINUE): Stage.RESUMING,
    (Stage.RESUMING, Trigger.CONTINUE): Stage.RESUMING,
    (Stage.RESUMING, Trigger.NEED_IMAGES): Stage.RESUMING,
    (Stage.RESUMING, Trigger.IMAGE_ENCODED): Stage.RESUMING,
    (Stage.RESUMING, Trigger.LAST_IMAGE_ENCODED): Stage.RESUMING,
    **{(s, Trigger.FIRST_TOKEN): Stage.DECODING for s in BEFORE_FIRST_TOKEN},
    (Stage.DECODING, Trigger.TOKENS): Stage.DECODING,
    (Stage.RESUMING, Trigger.TOKENS): Stage.DECODING,
    **{(s, Trigger.FINISH): Stage.FINISHED for s in LIVE},
    **{(s, Trigger.ABORT): Stage.ABORTED for s in LIVE},
    **{(s, Trigger.FAIL): Stage.FAILED for s in LIVE},
}


class IllegalTransition(RuntimeError):
    """A message moved a request where its lifecycle does not go: a bug in the router or an instance."""


@dataclass
class RequestRecord:
    """One request the router owns: its stage, where it runs, and the output built so far."""

    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    metrics: RequestMetrics
    prefill: str  # instance names
    decode: str
    stage: Stage = Stage.PLACED
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    invalid_input: bool = False  # the error is the request's own (a corrupt image): a 400
    retry_after: float | None = None  # refused as late (--reject-late): a 429 with Retry-After
    early: list[RequestUpdate] = field(default_factory=list)  # updates that arrived out of order
    attempt: int = 0  # 0 first; each start-over (recovery.py) adds one
    wire_id: str = ""  # the id its instances know it by, this attempt (the request id at first)

    def __post_init__(self) -> None:
        self.wire_id = self.wire_id or self.request_id

    def new_attempt(self, wire_id: str) -> None:
        """The next attempt, known to instances as `wire_id`: from the start (no token yet), or
        going on from its tokens."""
        self.advance(Trigger.CONTINUE if self.has_first_token else Trigger.RETRY)
        self.attempt += 1
        self.wire_id = wire_id
        self.early.clear()

    def advance(self, trigger: Trigger) -> Stage:
        """Move to the stage `trigger` leads to from here; IllegalTransition if it leads nowhere."""
        after = TRANSITIONS.get((self.stage, trigger))
        if after is None:
            stage = self.stage.value
            raise IllegalTransition(f"request {self.request_id!r}: {trigger.value} in stage {stage}")
        self.stage = after
        return after

    @property
    def has_first_token(self) -> bool:
        return self.stage not in BEFORE_FIRST_TOKEN

    def output(self) -> RequestOutput:
        completion = CompletionOutput(
            0,
            self.text,
            list(self.token_ids),
            list(self.logprobs) if self.params.logprobs is not None else None,
            self.finish_reason,
            self.stop_reason,
        )
        return RequestOutput(
            self.request_id,
            self.prompt.prompt,
            self.prompt.prompt_token_ids,
            [completion],
            self.finish_reason is not None,
            self.metrics,
            self.num_cached_tokens,
            self.error,
            self.invalid_input,
            self.retry_after,
        )
