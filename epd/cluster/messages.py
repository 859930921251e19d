"""Typed control messages between the router (front process) and instances.

Grouped by the process that receives them. Encoded as msgpack by msgspec (tagged
unions, so one socket carries every message type). Bulk tensors (image embeddings,
KV) never travel here: they go through a connector; image files do, once, from the
router to the encoder that will decode and encode them. Updates carry diffs (new tokens since the
last update), not whole requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from epd.cluster.shared_files import SharedFileReader, SharedFiles
from epd.engine.queue_policy import Urgency
from epd.lifetime import LifetimeEvent
from epd.outputs import PositionLogprobs
from epd.sampling_params import SamplingParams

# ---- received by instances -------------------------------------------------------------------


class EncodeItem(msgspec.Struct):
    """One image to encode: its file as the client sent it (the encoding side decodes it), or,
    where it was processed already (a PIL image given offline), its uint8 patches.

    Or a chunk of a video (IRP over its frames, epd.inputs.video_chunks): `content_hash` is the
    chunk's key, `grid` the chunk's, and `pixels` its rows only; a file comes whole, with
    `groups` naming the temporal groups to take from it. Or a temporal group of a Qwen3-VL video
    file (`qwen3`: its sampling, and frames of the size `grid` says: epd.inputs.video_file).

    Items of one message that carry the same file (a Qwen3-VL video's groups) carry it once on
    the wire: the others name the item that does (`file_from`, set by `encode`, undone on
    decoding), so an encoder gets a file's bytes once per task, and decodes it once per task."""

    index: int  # image index within its request
    content_hash: str
    grid: tuple[int, int, int]
    pixels: bytes  # uint8 patches before normalisation, [t*h*w, raw_dim]; b"" when `file` is set
    raw_dim: int
    file: bytes = b""  # the image file (PNG, JPEG...): decoded by the encoding instance
    groups: tuple[int, int] | None = None  # a video chunk's temporal groups [first, end) in `file`
    qwen3: bool = False  # `groups` of a Qwen3-VL video file: its sampling, frames sized to `grid`
    file_from: int = -1  # on the wire: `file` is that of the message's item at this position
    # On the wire as frames (`encode_frames`): the frames holding `file` and `pixels` (0: inline).
    file_frame: int = 0
    pixels_frame: int = 0
    # Or the file lies in the API process's shared memory (epd.cluster.shared_files): (offset, length).
    file_at: tuple[int, int] | None = None


class EncodeTask(msgspec.Struct, tag=True):
    """Encode these images of one request and send the embeddings to `dest` (a P instance)."""

    request_id: str
    items: list[EncodeItem]
    dest: str  # the consumer's connector address
    urgency: Urgency | None = None  # the request's deadline and priority (None: FCFS by arrival here)


class PrefillTask(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    placeholders: list[tuple[int, int]]  # (offset, length) per image
    image_hashes: list[str]
    grids: list[tuple[int, int, int]]
    params: SamplingParams
    arrival_time: float
    decode_dest: str | None  # connector address of the D instance; None: decode here
    prompt: str | None = None
    pixels: list[EncodeItem] | None = None  # only for a P instance that encodes in-process (EP)
    # Images the router had encoded for this task when it placed it (indices): their embeddings
    # are on their way, so P waits for them without asking (`NeedEmbeddings`) again.
    encoding: list[int] = []
    # The tokens the request produced already (a continuation: its decode instance died). They are
    # prefilled after the prompt, and the token sampled after them is the next one it outputs.
    output_token_ids: list[int] = []
    # Each item's M-RoPE time step per temporal patch (a Qwen2.5-VL video's); empty: all 1.
    time_intervals: list[float] = []


class ReleaseEmbedding(msgspec.Struct, tag=True):
    """The consumer (data address `dest`) has the embedding: the encoder may unpin one reference."""

    content_hash: str
    dest: str


class DestinationGone(msgspec.Struct, tag=True):
    """The instance at data address `dest` died: an encoder sends it nothing more and unpins what it
    sent there and saw no receipt for (that receipt will never come: the pins leaked before)."""

    dest: str


class AbortRequest(msgspec.Struct, tag=True):
    request_id: str


class Shutdown(msgspec.Struct, tag=True):
    pass


class SetRoles(msgspec.Struct, tag=True):
    """Hold exactly these roles from now on ("PD", "D"...); the instance answers with `SetRolesReply`.

    Only the mechanism: a role is added or removed when the stages it affects are idle and the
    instance loaded the weights it needs; otherwise the instance refuses and keeps its roles.
    """

    roles: str  # role letters, any order


class MigrateRequest(msgspec.Struct, tag=True):
    """Move this running decode to the decode instance at `dest` (a role switch drains by it): its
    KV goes there through the connector, as a prefill's hand-off, and it continues there."""

    request_id: str
    dest: str  # the new decode instance's connector address


class EmbeddingsLost(msgspec.Struct, tag=True):
    """Images on their way to this prefill instance that will not come: their encoder died. Requests
    waiting for them ask again (`NeedEmbeddings`)."""

    content_hashes: list[str]


class Heartbeat(msgspec.Struct, tag=True):
    """The router is alive. An instance that hears nothing from it for a while exits (its launcher
    may not be its parent, so the parent's pid says nothing)."""


ToInstance = (
    EncodeTask
    | PrefillTask
    | ReleaseEmbedding
    | DestinationGone
    | EmbeddingsLost
    | AbortRequest
    | Shutdown
    | SetRoles
    | MigrateRequest
    | Heartbeat
)

# ---- received by the router ------------------------------------------------------------------


class InstanceReady(msgspec.Struct, tag=True):
    instance: str
    control_address: str
    data_address: str
    pid: int
    vision_parameters: int
    language_parameters: int
    max_model_len: int  # 0 for an instance without the language model
    switchable: bool = False  # both parts in host memory: it may add or drop E (instance.roles)
    reads_shared_files: bool = False  # it maps the API process's image files (cluster.shared_files)


class InstanceFailed(msgspec.Struct, tag=True):
    instance: str
    error: str


class NeedEmbeddings(msgspec.Struct, tag=True):
    """A prefill instance lacks these images of a request (not cached, not on their way)."""

    instance: str
    request_id: str
    items: list[int]


class EmbeddingsEvicted(msgspec.Struct, tag=True):
    """A prefill instance's MM cache dropped these images (content hashes) to make room: the router
    stops counting on them there. (Inserts need no message: `EmbeddingArrived` says them.)"""

    instance: str
    content_hashes: list[str]


class EncodeDone(msgspec.Struct, tag=True):
    instance: str
    request_id: str
    items: list[int]
    cache_hits: list[int]  # items served from the encoder's cache or an in-flight encode
    events: list[LifetimeEvent]
    # Each item's `content_hash` as its EncodeItem named it (a video chunk's key tells the chunk
    # apart from the other chunks of its image index); empty: the items' own hashes.
    keys: list[str] = []


class EncodeFailed(msgspec.Struct, tag=True):
    """These images of a request cannot be encoded: their files are bad (found when decoded)."""

    instance: str
    request_id: str
    items: list[int]
    error: str
    keys: list[str] = []  # as EncodeDone's


class EmbeddingArrived(msgspec.Struct, tag=True):
    instance: str
    content_hash: str
    source: str  # the encoder's connector address
    events: list[tuple[str, LifetimeEvent]]  # (request_id, MM_TRANSFER_END) per waiting request


class EmbeddingNotSent(msgspec.Struct, tag=True):
    """An encoder's send of an image's embeddings to the prefill instance at data address `dest`
    failed for good (its connector's retries used up): they will not come. The encoder unpinned
    that copy; the router tells P (`EmbeddingsLost`), whose waiting requests ask again."""

    instance: str
    content_hash: str
    dest: str
    error: str


class RequestUpdate(msgspec.Struct, tag=True):
    instance: str
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None
    events: list[LifetimeEvent]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None  # the full output text, sent when the request finishes here
    num_cached_tokens: int = 0
    handed_off: bool = False
    # Output position of new_token_ids[0]. The first token comes from P and the rest from D
    # over different sockets, so the router may see D's update first and must wait for P's.
    first_index: int = 0


class InstanceStats(msgspec.Struct, tag=True):
    instance: str
    stats: dict[str, float]  # see epd.cluster.stats.STAT_HELP


class RequestError(msgspec.Struct, tag=True):
    instance: str
    request_id: str
    error: str
    invalid_input: bool = False  # the request's own input is at fault (a corrupt image): a 400
    retry_after: float | None = None  # refused: it cannot meet its TTFT deadline (--reject-late), a 429


class SetRolesReply(msgspec.Struct, tag=True):
    """The answer to `SetRoles`: the roles the instance holds now; `error` says why it refused."""

    instance: str
    roles: str  # canonical letters ("PD"): the new roles, or the unchanged ones when refused
    error: str | None = None
    timings: dict[str, float] = {}  # seconds the instance spent: "weights", "memory"


class MigrationRefused(msgspec.Struct, tag=True):
    """A `MigrateRequest` this instance could not follow (the request has no KV here to send: it
    waits to be recomputed); it keeps decoding the request."""

    instance: str
    request_id: str
    error: str


ToRouter = (
    InstanceReady
    | InstanceFailed
    | NeedEmbeddings
    | EmbeddingsEvicted
    | EncodeDone
    | EncodeFailed
    | EmbeddingArrived
    | EmbeddingNotSent
    | RequestUpdate
    | RequestError
    | InstanceStats
    | SetRolesReply
    | MigrationRefused
)

_encoder = msgspec.msgpack.Encoder()
_instance_decoder = msgspec.msgpack.Decoder(ToInstance)
_router_decoder = msgspec.msgpack.Decoder(ToRouter)


def encode(message: msgspec.Struct) -> bytes:
    """`message` as one msgpack buffer, files and patches inside it (the router sends tasks with
    `encode_frames`; this serves the other senders and tests)."""
    items = _bulk_items(message)
    if items is not None:
        message = _with_items(message, _files_once(items))
    return _encoder.encode(message)


def encode_frames(message: msgspec.Struct, shared: SharedFiles | None = None) -> list[bytes | bytearray]:
    """`message` as the frames of one multipart ZMQ message: its msgpack with every item's file
    and patches left out, then each of those, a frame of its own. The router sends them without
    copying them (pyzmq keeps a frame alive until libzmq has sent it): into one msgpack buffer the
    files of a request of three 3.7 MB PNGs took ~1.2 ms of the API process's CPU to copy.
    `shared`: the API process's shared files, which the receiver maps: an image's file that lies
    there goes as its place (`file_at`), not as a frame. `decode_for_instance` takes them back."""
    items = _bulk_items(message)
    if items is None:
        return [_encoder.encode(message)]
    wire, bulk = [], []
    for item in _files_once(items):
        if not item.file and not item.pixels:
            wire.append(item)
            continue
        fields: dict = {"file": b"", "pixels": b""}
        place = _shared_place(item, shared)
        if place is not None:
            fields["file_at"] = place
        for field in ("file", "pixels") if place is None else ("pixels",):
            data = getattr(item, field)
            if data:
                bulk.append(data)
                fields[f"{field}_frame"] = len(bulk)
        wire.append(msgspec.structs.replace(item, **fields))
    return [_encoder.encode(_with_items(message, wire)), *bulk]


def _shared_place(item: EncodeItem, shared: SharedFiles | None) -> tuple[int, int] | None:
    """Where an image's file lies in `shared`, if it does. Only whole images: a video chunk's or a
    Qwen3-VL group's key is not its file's hash, which the reader checks."""
    if shared is None or not item.file or item.groups is not None or item.qwen3:
        return None
    return shared.locate(item.file)


def _bulk_items(message: msgspec.Struct) -> list[EncodeItem] | None:
    """The items of a message that may carry files or patches (megabytes), if it has any."""
    if isinstance(message, EncodeTask):
        return message.items
    if isinstance(message, PrefillTask) and message.pixels:
        return message.pixels
    return None


def _with_items(message: msgspec.Struct, items: list[EncodeItem]) -> msgspec.Struct:
    field = "items" if isinstance(message, EncodeTask) else "pixels"
    return msgspec.structs.replace(message, **{field: items})


def _frames_in_line(items: list[EncodeItem], frames: Sequence[bytes]) -> None:
    """Undo `encode_frames` on received items: each takes its file and patches from their frames."""
    for item in items:
        for field in ("file", "pixels"):
            k = getattr(item, f"{field}_frame")
            if k == 0:
                continue
            if not 0 < k < len(frames):
                raise ValueError(f"item {item.index} names frame {k} of a message of {len(frames)}")
            setattr(item, field, frames[k])
            setattr(item, f"{field}_frame", 0)


def decode_for_instance(data: bytes | Sequence[bytes], shared: SharedFileReader | None = None) -> ToInstance:
    """A message for an instance from `encode`'s bytes or `encode_frames`' frames; a file in the
    API process's shared memory becomes a `SharedFile` (read, and checked, where it is decoded)."""
    frames = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    message = _instance_decoder.decode(frames[0])
    items = _bulk_items(message)
    if items is not None:
        _frames_in_line(items, frames)
        _shared_in_line(items, shared)
        _share_files(items)
    return message


def _shared_in_line(items: list[EncodeItem], shared: SharedFileReader | None) -> None:
    for item in items:
        if item.file_at is None:
            continue
        if shared is None:
            raise ValueError(f"item {item.index} lies in shared memory this instance does not map")
        item.file = shared.file(*item.file_at, item.content_hash)
        item.file_at = None


def _files_once(items: list[EncodeItem]) -> list[EncodeItem]:
    """The items as they go on the wire: a file that several carry (the same bytes object), kept by
    the first of them only; the others point at it. The items themselves are left as they are."""
    first: dict[int, int] = {}  # id(file) -> position of the first item carrying it
    wire = []
    for position, item in enumerate(items):
        owner = first.setdefault(id(item.file), position) if item.file else position
        if owner == position:
            wire.append(item)
        else:
            wire.append(msgspec.structs.replace(item, file=b"", file_from=owner))
    return wire


def _share_files(items: list[EncodeItem]) -> None:
    """Undo `_files_once` on received items: each gets the one copy of its file."""
    for position, item in enumerate(items):
        if item.file_from < 0:
            continue
        if item.file_from >= position:  # `_files_once` points only back, at a file's first carrier
            raise ValueError(f"item {item.index} takes its file from item {item.file_from}, not before it")
        item.file, item.file_from = items[item.file_from].file, -1


def decode_for_router(data: bytes) -> ToRouter:
    return _router_decoder.decode(data)
