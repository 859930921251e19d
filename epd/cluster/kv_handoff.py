"""Moving a request's KV from the prefill instance (P) to its decode instance (D).

What P sends for one request, over one connector pair (FIFO, so D sees it in this order):

| kv_streaming | during the prefill forward       | after the first token was sampled                     |
|--------------|----------------------------------|-------------------------------------------------------|
| request      | -                                | kv:<rid> {kv}, request meta                           |
| layer        | kvl:<rid>:<i> {kv: layer i KV},  | D continues the request:                              |
|              |   i = 0 .. L-1, as each layer    |   kv:<rid> {generator_state?}, request meta plus      |
|              |   finishes                       |   streamed_layers = L                                 |
|              |                                  | it ended at its first token (EOS, stop, length):      |
|              |                                  |   kv:<rid> {}, meta {request_id, discard: True,       |
|              |                                  |   streamed_layers}                                    |

A tensor-parallel P (epd.parallel) does not gather its ranks' heads: each rank that first holds a
piece of the kv heads sends that piece itself, from its own device, as a part (`kvl:`, meta `part`
and the piece's `heads`), and the `kv:` message lists the pieces (`head_parts`: their head
ranges, in order); D assembles the whole KV from them. Parts then number pieces, and layers times
pieces when streaming:

| P sends                  | parts (`kvl:<rid>:<part>`)                         | the `kv:` message meta     |
|--------------------------|----------------------------------------------------|----------------------------|
| whole, one rank          | -                                                  | (the KV itself)            |
| layers, one rank         | part = layer (meta `layer`)                        | streamed_layers = L        |
| whole, H pieces          | part = piece, [L, 2, T, its heads, d]              | head_parts (H ranges)      |
| layers, H pieces         | part = layer * H + piece, [2, T, its heads, d]     | streamed_layers, head_parts|

Parts other than rank 0's come from other producers (the workers' connectors), so they may
arrive before or after the `kv:` message, whatever the FIFO of one pair.

D holds the parts until the `kv:` message says what to do with them, so every part is
either assembled into a request's KV or dropped: P sends the `kv:` message after its parts
(both within one engine step), and an abort on D drops what has arrived so far. A part whose send
failed is sent again (epd.transfer.retry) and may then arrive after the `kv:` message: D holds
that message until its last part is in (`KVParts.missing`). If the part never comes, P reports
the failure and the router aborts the request on D, which drops the held message with its parts.

An abort travels router -> D on the control socket, the KV P -> D through the connector: nothing
orders the two, so an abort can reach D before the KV P had already sent (the client hung up at the
first token). D remembers such requests (`DroppedKV`) and drops what arrives for them later,
instead of decoding for nobody. The same memory drops the parts still due behind a `kv:` message
that did not need them (the request was aborted while its message waited for them, or P discarded
it): a retried part can arrive after that, and nothing would claim it.

No generator state travels: a seeded request's draws depend only on its seed and how many tokens
it has (epd.engine.sampler.draw_seed), which the meta carries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec
import torch

from epd.engine.request import Request
from epd.parallel.kv import HEAD_DIM, HeadShares, RankSends
from epd.transfer.base import Connector, Received

KV_KEY, LAYER_KEY = "kv:", "kvl:"
# Requests whose late KV D remembers at most (an id and a few layer numbers each); see DroppedKV.
MAX_DROPPED_REMEMBERED = 4096


class KVSender:
    """P side: sends each request's KV to the decode instance the router chose for it.

    `handoff` is the engine's hand-off callback; `send_layer` and `discard` make this a
    `epd.engine.layer_stream.LayerSink` for layer-wise streaming. The KV comes whole (a tensor)
    or, from a tensor-parallel P, as `HeadShares`: this sends rank 0's piece and has the workers
    send theirs.
    """

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.dest: dict[str, str] = {}  # request id -> its decode instance's data address
        self.layers_sent: dict[str, int] = {}  # request id -> layers streamed so far
        self.head_parts: dict[str, list[list[int]]] = {}  # request id -> its streamed pieces' heads

    def route(self, request_id: str, dest: str) -> None:
        self.dest[request_id] = dest

    def forget(self, request_id: str) -> None:
        """The request ends on this instance without a hand-off (finished or aborted)."""
        self.dest.pop(request_id, None)
        self.layers_sent.pop(request_id, None)
        self.head_parts.pop(request_id, None)

    def handoff(self, request: Request, kv: torch.Tensor | HeadShares | None) -> None:
        """The final message: the whole KV, or (kv None) the count of the layers streamed before."""
        rid = request.request_id
        dest, meta, tensors = self.dest.pop(rid), handoff_meta(request), {}
        if kv is None:
            meta.update(self._streamed(rid))
        elif isinstance(kv, HeadShares):
            meta["head_parts"] = self._send_pieces(dest, rid, kv, first_part=0)
        else:
            tensors = {"kv": kv}
        self.connector.send(dest, f"{KV_KEY}{rid}", tensors, meta)

    def send_layer(self, request: Request, layer: int, kv: torch.Tensor | HeadShares) -> None:
        rid = request.request_id
        if isinstance(kv, HeadShares):
            pieces = len(kv.head_ranges)
            self.head_parts[rid] = self._send_pieces(self.dest[rid], rid, kv, first_part=layer * pieces)
        else:
            meta = {"request_id": rid, "layer": layer}
            self.connector.send(self.dest[rid], f"{LAYER_KEY}{rid}:{layer}", {"kv": kv}, meta)
        self.layers_sent[rid] = self.layers_sent.get(rid, 0) + 1

    def discard(self, request: Request) -> None:
        rid = request.request_id
        # The counts let D drop the parts still due (a retried one may come after this notice).
        meta = {"request_id": rid, "discard": True, **self._streamed(rid)}
        self.connector.send(self.dest.pop(rid), f"{KV_KEY}{rid}", {}, meta)

    def _streamed(self, rid: str) -> dict[str, Any]:
        """What a `kv:` message after streaming says of the parts that went before it."""
        streamed: dict[str, Any] = {"streamed_layers": self.layers_sent.pop(rid, 0)}
        if rid in self.head_parts:
            streamed["head_parts"] = self.head_parts.pop(rid)
        return streamed

    def _send_pieces(self, dest: str, rid: str, kv: HeadShares, first_part: int) -> list[list[int]]:
        """Rank 0's piece from here, the others by their ranks; the pieces' head ranges."""
        ranges = [list(heads) for heads in kv.head_ranges]
        sends: RankSends = {}
        for i, (rank, heads) in enumerate(zip(kv.senders, ranges)):
            part = first_part + i
            key, meta = f"{LAYER_KEY}{rid}:{part}", {"request_id": rid, "part": part, "heads": heads}
            if rank == 0:
                self.connector.send(dest, key, {"kv": kv.mine}, meta)
            else:
                sends[rank] = (key, meta)
        if sends:
            kv.send_rest(dest, sends)
        return ranges


def handoff_meta(request: Request) -> dict[str, Any]:
    """Everything D needs to continue the request, besides its KV and generator state."""
    # The token P sampled is the last output; any before it came from an earlier attempt.
    first_logprobs = request.output_logprobs[-1] if request.output_logprobs else None
    return {
        "request_id": request.request_id,
        "prompt": request.prompt.prompt,
        "prompt_token_ids": request.prompt_token_ids,
        "placeholders": [(p.offset, p.length) for p in request.prompt.placeholders],
        "image_hashes": [img.content_hash for img in request.prompt.images],
        "grids": [img.grid_thw for img in request.prompt.images],
        "time_intervals": [img.time_interval for img in request.prompt.images],
        "params": msgspec.to_builtins(request.params),
        "first_token": request.output_token_ids[-1],
        "earlier_token_ids": request.output_token_ids[:-1],
        "first_logprobs": msgspec.to_builtins(first_logprobs),
        "arrival_time": request.arrival_time,
    }


def request_of_key(key: str) -> str | None:
    """The request a KV transfer key belongs to ("kv:<rid>", "kvl:<rid>:<layer>"); None for others."""
    if key.startswith(KV_KEY):
        return key[len(KV_KEY) :]
    if key.startswith(LAYER_KEY):
        return key[len(LAYER_KEY) :].rpartition(":")[0]
    return None


def part_of(meta: dict[str, Any]) -> int:
    """Which part of its request's KV a `kvl:` message is (module docstring's table)."""
    return meta["part"] if "part" in meta else meta["layer"]


def parts_due(meta: dict[str, Any]) -> int:
    """How many parts a `kv:` message stands for (0: it carries the KV itself, or nothing)."""
    layers, pieces = meta.get("streamed_layers"), len(meta.get("head_parts") or ())
    if layers is None:
        return pieces
    return layers * max(pieces, 1)


class KVParts:
    """D side: parts of requests' KV (streamed layers, ranks' head pieces), held per request until
    its `kv:` message completes or drops them."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[int, torch.Tensor]] = {}  # request id -> part -> its KV
        self.received_total = 0

    def add(self, received: Received) -> None:
        """A `kvl:` message: one part of one request's KV."""
        meta = received.meta
        self.parts.setdefault(meta["request_id"], {})[part_of(meta)] = received.tensors["kv"]
        self.received_total += 1

    def missing(self, received: Received) -> list[int]:
        """The parts a `kv:` message stands for that have not arrived (yet)."""
        meta = received.meta
        if meta.get("discard"):
            return []
        parts = self.parts.get(meta["request_id"], {})
        return [i for i in range(parts_due(meta)) if i not in parts]

    def complete(self, received: Received) -> torch.Tensor:
        """The full KV [layers, 2, tokens, kv_heads, head_dim] a `kv:` hand-off (not a discard notice)
        stands for: sent whole, or assembled from its parts. ValueError if parts are missing.
        Either way the request's parts are freed."""
        meta = received.meta
        parts = self.parts.pop(meta["request_id"], {})
        due = parts_due(meta)
        if due == 0:
            return received.tensors["kv"]
        missing = [i for i in range(due) if i not in parts]
        if missing or len(parts) != due:
            raise ValueError(f"{len(parts)} of {due} KV parts arrived (missing {missing[:8]})")
        ranges = meta.get("head_parts")
        if not ranges:
            return torch.stack([parts[i] for i in range(due)])
        return _assemble_heads(parts, meta.get("streamed_layers"), ranges)

    def drop(self, request_id: str) -> set[int]:
        """Free the request's parts; the parts that had arrived."""
        return set(self.parts.pop(request_id, {}))

    def stats(self) -> dict[str, float]:
        return {
            "kv_parts_buffered": sum(len(p) for p in self.parts.values()),
            "kv_parts_received_total": self.received_total,
        }


def _assemble_heads(
    parts: dict[int, torch.Tensor], layers: int | None, ranges: list[list[int]]
) -> torch.Tensor:
    """The whole KV from the ranks' head pieces (each written once into its head range): the
    pieces of the whole KV (`layers` None), or of each streamed layer."""
    first, heads = parts[0], ranges[-1][1]
    shape = list(first.shape) if layers is None else [layers, *first.shape]
    shape[HEAD_DIM] = heads
    whole = torch.empty(shape, dtype=first.dtype, device=first.device)
    for part, kv in parts.items():
        layer, piece = divmod(part, len(ranges))
        start, end = ranges[piece]
        target = whole if layers is None else whole[layer]
        target[..., start:end, :] = kv
    return whole


class DroppedKV:
    """D side: requests whose KV is dropped as it arrives, and what of it is still due.

    | remembered when                                  | still due                    |
    |--------------------------------------------------|------------------------------|
    | aborted before its `kv:` message came            | that message, and the parts  |
    |                                                  | it counts that had not come  |
    | aborted while its `kv:` waited for retried parts | those parts                  |
    | P discarded it with parts not yet arrived        | those parts                  |

    Everything due is dropped on arrival and the id forgotten once the last of it came. Some never
    comes (P died or gave up on a part), so memory is bounded too: past `capacity` ids the oldest is
    forgotten. Late KV trails its abort by one P step plus a transfer (and its retries), so only the
    latest few matter; 4096 is far more than arrive in that time. A second `kv:` message for an id
    is someone else's (P sends one per attempt id): it is not dropped.
    """

    def __init__(self, capacity: int = MAX_DROPPED_REMEMBERED) -> None:
        self.capacity = capacity
        # request id -> (parts dropped so far, parts due in all: None until its `kv:` came)
        self.due: OrderedDict[str, tuple[set[int], int | None]] = OrderedDict()
        self.handoffs_dropped_total = 0
        self.parts_dropped_total = 0

    def remember(
        self, request_id: str, arrived: set[int] | None = None, handoff: Received | None = None
    ) -> None:
        """Drop the request's KV from now on. `arrived`: the parts already in (and freed);
        `handoff`: its `kv:` message, if it came (then only the parts it counts are due)."""
        due = None if handoff is None else parts_due(handoff.meta)
        self.due[request_id] = (set(arrived or ()), due)
        self.due.move_to_end(request_id)
        self._forget_if_complete(request_id)
        while len(self.due) > self.capacity:
            self.due.popitem(last=False)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.due

    def drop_part(self, request_id: str, part: int) -> bool:
        """A `kvl:` part arrived: True (and counted) if it is dropped."""
        if request_id not in self.due:
            return False
        self.due[request_id][0].add(part)
        self.parts_dropped_total += 1
        self._forget_if_complete(request_id)
        return True

    def drop_handoff(self, handoff: Received) -> bool:
        """A `kv:` message arrived: True if its request was aborted before (the message is dropped)."""
        request_id = handoff.meta["request_id"]
        if request_id not in self.due or self.due[request_id][1] is not None:
            return False
        self.due[request_id] = (self.due[request_id][0], parts_due(handoff.meta))
        self.handoffs_dropped_total += 1
        self._forget_if_complete(request_id)
        return True

    def _forget_if_complete(self, request_id: str) -> None:
        arrived, due = self.due[request_id]
        if due is not None and len(arrived) >= due:
            del self.due[request_id]

    def stats(self) -> dict[str, float]:
        return {
            "kv_late_requests_remembered": len(self.due),
            "kv_late_handoffs_dropped_total": self.handoffs_dropped_total,
            "kv_late_parts_dropped_total": self.parts_dropped_total,
        }
