"""Placement: which instance takes each part of a request. Policies choose; the router acts.

| decides                   | policy (default) | reads                  | rule                               |
|---------------------------|------------------|------------------------|------------------------------------|
| a request's prefill       | LeastLoaded(P)   | ledger                 | fewest outstanding prompt tokens   |
| (--scheduling-policy with | MostSlack        | ledger, the router's   | the shortest predicted TTFT: the   |
| prefill=slo)              |                  | prefill cost model     | predicted prefills of the prompts  |
|                           |                  | (RequestToPlace)       | it holds, then this one's; so the  |
|                           |                  |                        | largest slack (placement_for)      |
| a request's decode        | KeepOnPrefill    | prefill chosen, ledger | a P that also decodes keeps it;    |
|                           |                  |                        | else the D with the fewest running |
|                           |                  |                        | requests                           |
| the encoder of each image | SpreadImages     | EncodeAffinity, ledger | where the image is in flight or    |
| of a request (IRP: intra- |                  |                        | was encoded, if alive (cache       |
| request parallelism)      |                  |                        | affinity); the rest largest first  |
|                           |                  |                        | onto the encoder with the fewest   |
|                           |                  |                        | queued patches                     |
| how many chunks a video   | SplitVideos      | encoders               | one per encoder, at most one per   |
| is encoded in (IRP over   |                  |                        | temporal group: each chunk is then |
| its frames)               |                  |                        | placed as an image (SpreadImages)  |

Why MostSlack prices prompts rather than counting tokens: a prompt's prefill is not linear in its
tokens (attention is quadratic in them, a step has a fixed cost), so an instance holding one long
prompt can be further from done than one holding more tokens in short prompts; the router's cost
model (`RouterCore.prefill_seconds`: the --slo-profile's, else the default price per token, under
which both rules agree) says how far. The request's deadline is the same wherever it goes, so the
largest slack (deadline - now - predicted TTFT) is the shortest predicted TTFT.

Policies see instances as `InstanceSpec`s (name and roles; no sockets) and read the load ledger;
they return their choices and change nothing, so the router reserves what was chosen and a policy
can be tested, or swapped, without a process. Candidates come in layout order: ties go to the first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from epd.cluster.layout import InstanceSpec, Role
from epd.cluster.router.ledger import LoadLedger


def no_candidate(role: Role) -> RuntimeError:
    return RuntimeError(f"no live instance can take role {role.value}")


def least_loaded(role: Role, candidates: Sequence[InstanceSpec], ledger: LoadLedger) -> InstanceSpec:
    """The candidate with `role` that holds the least work; RuntimeError if none has the role."""
    able = [c for c in candidates if c.has(role)]
    if not able:
        raise no_candidate(role)
    return min(able, key=lambda c: ledger.load(c.name))


# ---- prefill and decode: one instance per stage -----------------------------------------------


class RequestToPlace(NamedTuple):
    """What a stage policy may know of the request it places."""

    prompt_tokens: int
    prefill_seconds: Callable[[int], float]  # a prompt's predicted prefill (RouterCore.prefill_seconds)


class StagePolicy(ABC):
    """Chooses the instance for one stage (`role`) of a new request.

    `candidates` are the live instances, whatever their roles; `chosen` holds what was picked for
    this request's earlier stages (prefill is chosen before decode); `request`: the request, where
    the router says (None: a policy must choose without it). Returns a candidate that has `role`,
    or raises RuntimeError("no live instance can take role X") when none has it.
    """

    role: Role

    @abstractmethod
    def choose(
        self,
        candidates: Sequence[InstanceSpec],
        ledger: LoadLedger,
        chosen: Mapping[Role, InstanceSpec],
        request: RequestToPlace | None = None,
    ) -> InstanceSpec: ...


class LeastLoaded(StagePolicy):
    def __init__(self, role: Role) -> None:
        self.role = role

    def choose(
        self,
        candidates: Sequence[InstanceSpec],
        ledger: LoadLedger,
        chosen: Mapping[Role, InstanceSpec],
        request: RequestToPlace | None = None,
    ) -> InstanceSpec:
        return least_loaded(self.role, candidates, ledger)


class MostSlack(StagePolicy):
    """The P where the new request's predicted TTFT is shortest, so its slack largest: the prompts
    the P holds (reserved, not yet at their first token), each priced by the router's cost model,
    then this one's. Without the request: as LeastLoaded."""

    role = Role.PREFILL

    def choose(
        self,
        candidates: Sequence[InstanceSpec],
        ledger: LoadLedger,
        chosen: Mapping[Role, InstanceSpec],
        request: RequestToPlace | None = None,
    ) -> InstanceSpec:
        if request is None:
            return least_loaded(Role.PREFILL, candidates, ledger)
        able = [c for c in candidates if c.has(Role.PREFILL)]
        if not able:
            raise no_candidate(Role.PREFILL)
        waits = predicted_prefill_waits(ledger, request.prefill_seconds)
        own = request.prefill_seconds(request.prompt_tokens)  # the same everywhere, for now: one cost model
        return min(able, key=lambda c: waits.get(c.name, 0.0) + own)  # the predicted TTFT; ties: the first


def predicted_prefill_waits(ledger: LoadLedger, prefill_seconds: Callable[[int], float]) -> dict[str, float]:
    """Per instance, the predicted seconds of the prefills it holds (one pass over the ledger)."""
    waits: dict[str, float] = {}
    for work, (instance, tokens) in ledger.outstanding().items():
        if work.stage is Role.PREFILL:
            waits[instance] = waits.get(instance, 0.0) + prefill_seconds(tokens)
    return waits


class KeepOnPrefill(StagePolicy):
    """Decode where the prefill ran if that instance decodes too: its KV never has to move."""

    role = Role.DECODE

    def choose(
        self,
        candidates: Sequence[InstanceSpec],
        ledger: LoadLedger,
        chosen: Mapping[Role, InstanceSpec],
        request: RequestToPlace | None = None,
    ) -> InstanceSpec:
        prefill = chosen.get(Role.PREFILL)
        if prefill is not None and prefill.has(Role.DECODE):
            return prefill
        return least_loaded(Role.DECODE, candidates, ledger)


# ---- encoders: the images of one request ------------------------------------------------------


class ImageToEncode(NamedTuple):
    index: int  # names it in the request: the image's place, or a video chunk's (encode_units.py)
    content_hash: str
    num_patches: int


@dataclass
class EncodeAffinity:
    """Where images are, by content hash: being encoded now, or encoded last (its cache may hold it).

    The router records what happens (started / finished / an encoder died); policies only read it.
    """

    inflight: dict[str, str] = field(default_factory=dict)  # content hash -> encoder encoding it now
    encoded_at: dict[str, str] = field(default_factory=dict)  # content hash -> encoder that last did

    def started(self, content_hash: str, encoder: str) -> None:
        self.inflight[content_hash] = encoder

    def finished(self, content_hash: str, encoder: str) -> None:
        self.inflight.pop(content_hash, None)
        self.encoded_at[content_hash] = encoder

    def failed(self, content_hash: str) -> None:
        """The encode could not be done (a bad file): nothing of it is anywhere."""
        self.inflight.pop(content_hash, None)

    def encoder_died(self, encoder: str) -> None:
        # Its encodes will never finish; what it encoded before is skipped as long as it is dead.
        for content_hash in [h for h, e in self.inflight.items() if e == encoder]:
            del self.inflight[content_hash]

    def known(self, content_hash: str) -> list[str]:
        """Encoders that have this image, best first: the one encoding it, then the last one."""
        places = (self.inflight.get(content_hash), self.encoded_at.get(content_hash))
        return [p for p in places if p is not None]


class EncoderPolicy(ABC):
    """Chooses an encoder for every image of a request that its prefill instance lacks.

    `encoders` are the live instances that take encode tasks from others, non-empty (RuntimeError
    otherwise). Returns image index -> encoder name for every image, in the order to queue them.
    """

    @abstractmethod
    def assign(
        self,
        images: Sequence[ImageToEncode],
        encoders: Sequence[InstanceSpec],
        ledger: LoadLedger,
        affinity: EncodeAffinity,
    ) -> dict[int, str]: ...


class SpreadImages(EncoderPolicy):
    """IRP: a request's images spread over the encoders, so they encode in parallel.

    Largest first (it decides the request's encode time), each onto the encoder with the fewest
    queued patches, counting those just assigned from this request; an image some encoder already
    has goes there instead (one encoding, cache hit), as do repeats of an image within the request.
    """

    def assign(
        self,
        images: Sequence[ImageToEncode],
        encoders: Sequence[InstanceSpec],
        ledger: LoadLedger,
        affinity: EncodeAffinity,
    ) -> dict[int, str]:
        if not encoders:
            raise no_candidate(Role.ENCODE)
        queued = {e.name: ledger.load(e.name) for e in encoders}  # in layout order: ties go first
        placed_now: dict[str, str] = {}  # content hash -> encoder, within this request
        assignment: dict[int, str] = {}
        for image in sorted(images, key=lambda im: -im.num_patches):  # stable: ties keep their order
            encoder = self._known_place(image, placed_now, affinity, queued) or min(queued, key=queued.get)
            queued[encoder] += image.num_patches
            placed_now[image.content_hash] = encoder
            assignment[image.index] = encoder
        return assignment

    @staticmethod
    def _known_place(
        image: ImageToEncode, placed_now: dict[str, str], affinity: EncodeAffinity, live: Mapping[str, int]
    ) -> str | None:
        for place in (placed_now.get(image.content_hash), *affinity.known(image.content_hash)):
            if place is not None and place in live:
                return place
        return None


@dataclass(frozen=True)
class SplitVideos:
    """IRP over a video's frames: a video whose grid has t >= 2 temporal groups is encoded in
    min(t, parts) chunks of whole groups, one per encoder the request may use (each encodes a
    chunk as an image: the Qwen towers never mix temporal groups, epd.inputs.video_chunks).
    `enabled=False`: every video is encoded whole, on one encoder."""

    enabled: bool = True

    def parts(self, encoders: Sequence[InstanceSpec]) -> int:
        """How many chunks a video may be cut into, given the live encoders."""
        return max(1, len(encoders)) if self.enabled else 1


@dataclass(frozen=True)
class Placement:
    """The policies a router places requests with."""

    prefill: StagePolicy = field(default_factory=lambda: LeastLoaded(Role.PREFILL))
    decode: StagePolicy = field(default_factory=KeepOnPrefill)
    encode: EncoderPolicy = field(default_factory=SpreadImages)
    video: SplitVideos = field(default_factory=SplitVideos)


def placement_for(prefill_policy: str) -> Placement:
    """The placement that goes with the prefill stage's queue policy (--scheduling-policy): slo
    places prefills by slack (MostSlack), the others by outstanding tokens (LeastLoaded)."""
    if prefill_policy == "slo":
        return Placement(prefill=MostSlack())
    return Placement()
