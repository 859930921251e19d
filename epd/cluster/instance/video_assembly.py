"""A prefill instance joins the chunks of a video (IRP over its frames) back into the video.

The router may encode a video's temporal groups on several encoder instances, each sending its
chunk (`mm:<video key>#groups=a-b/t`, epd.inputs.video_chunks). The prefill stage keeps the chunks
here until they cover groups [0, t), then joins their rows in group order and goes on as if the
whole video had arrived under its own key: the MM cache, the waiting requests and the router's
view of what P holds know only whole videos.

    chunk arrives --add--> the video's chunks cover [0, t)? --yes--> rows in order: one arrival
                                                           --no--->  kept, None

Chunks of two different splits of one video (asked again after an encoder died, with fewer
encoders left) may overlap: any chain of chunks from 0 to t will do, their rows being the same.
The stage discards a video's chunks when the video arrives, or is lost (its chunks will all be
sent again). Kept chunks hold tensors outside the MM cache until then: one video's worth at most,
per video in flight. (A chunk of a lost video that arrives after the loss, when no request asks for
the video again, stays until the video arrives or is lost again: a rare failure's leftover.)
"""

from __future__ import annotations

import torch

from epd.inputs.video_chunks import VideoChunk

Span = tuple[int, int]  # temporal groups [first, end)


class VideoAssembly:
    def __init__(self) -> None:
        self._chunks: dict[str, dict[Span, torch.Tensor]] = {}  # video key -> span -> rows

    def add(self, chunk: VideoChunk, embeds: torch.Tensor) -> torch.Tensor | None:
        """Keep a chunk's rows; the whole video's rows once its chunks cover every group, else None."""
        chunks = self._chunks.setdefault(chunk.video_key, {})
        chunks.setdefault((chunk.first, chunk.end), embeds)
        chain = covering_chain(chunks, chunk.total)
        if chain is None:
            return None
        del self._chunks[chunk.video_key]
        return torch.cat([chunks[span] for span in chain])

    def discard(self, video_key: str) -> None:
        self._chunks.pop(video_key, None)

    def __contains__(self, video_key: str) -> bool:
        return video_key in self._chunks

    def __len__(self) -> int:
        """Videos with some chunks kept."""
        return len(self._chunks)


def covering_chain(spans: dict[Span, torch.Tensor], total: int) -> list[Span] | None:
    """Spans that follow each other from group 0 to `total`, or None if there is no such chain."""
    ends_from: dict[int, list[int]] = {}
    for first, end in spans:
        ends_from.setdefault(first, []).append(end)
    came_from: dict[int, int] = {0: 0}
    frontier = [0]
    while frontier:
        first = frontier.pop()
        for end in ends_from.get(first, []):
            if end not in came_from:
                came_from[end] = first
                frontier.append(end)
    if total not in came_from or total == 0:
        return None
    chain, end = [], total
    while end != 0:
        chain.append((came_from[end], end))
        end = came_from[end]
    return chain[::-1]
