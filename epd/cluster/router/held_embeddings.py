"""What the router believes each prefill instance holds in its MM cache, or will hold soon.

With it the router sends a new request's images to the encoders at once, instead of waiting for
P to ask (`NeedEmbeddings`), which cost a control round trip before encoding could start. P tells
the router what changes, on the one channel its other messages use:

| P's message         | the view                                     |
|---------------------|----------------------------------------------|
| EmbeddingArrived(h) | h leaves `incoming`, joins `cached`          |
| EmbeddingsEvicted   | those hashes leave `cached`                  |
| (router) dispatches | h joins `incoming` (one count per transfer)  |
| P dies, stops being | everything about P is forgotten              |
| a P without E       |                                              |
| an encoder dies     | what it was sending leaves `incoming`; P is  |
|                     | told (`EmbeddingsLost`) and asks again       |

Keys are whole images' and videos': a video encoded in chunks on several encoders (IRP over its
frames) counts one transfer per chunk under the video's key (dispatched, and arrived as each chunk
comes), since P joins the chunks and caches the video whole. That the first chunk's arrival makes
the video `cached` before the others come is the same benign lag as an eviction's: P waits for
what is announced, or asks.

The view may be behind P (an eviction on its way): that is safe, because P is the authority. A
task whose image the router thought cached but P no longer has makes P ask for it, as before.
"""

from __future__ import annotations

from collections import Counter


class HeldEmbeddings:
    def __init__(self) -> None:
        self.cached: dict[str, set[str]] = {}  # instance -> content hashes
        # instance -> hash -> encoder -> transfers on their way from it
        self.incoming: dict[str, dict[str, Counter[str]]] = {}

    def holds(self, instance: str, content_hash: str) -> bool:
        """Cached there, or a transfer of it is on its way there."""
        on_its_way = content_hash in self.incoming.get(instance, {})
        return on_its_way or content_hash in self.cached.get(instance, ())

    def dispatched(self, instance: str, content_hash: str, encoder: str) -> None:
        self.incoming.setdefault(instance, {}).setdefault(content_hash, Counter())[encoder] += 1

    def arrived(self, instance: str, content_hash: str, encoder: str | None) -> None:
        if encoder is not None:
            self.not_coming(instance, content_hash, encoder)  # it came: no longer on its way
        self.cached.setdefault(instance, set()).add(content_hash)

    def not_coming(self, instance: str, content_hash: str, encoder: str) -> None:
        """One transfer from `encoder` will not come (it could not encode the image)."""
        senders = self.incoming.get(instance, {}).get(content_hash)
        if senders is not None and senders[encoder] > 0:
            senders[encoder] -= 1
            if senders[encoder] == 0:
                del senders[encoder]
            if not senders:
                del self.incoming[instance][content_hash]

    def evicted(self, instance: str, content_hashes: list[str]) -> None:
        self.cached.get(instance, set()).difference_update(content_hashes)

    def encoder_died(self, encoder: str) -> dict[str, list[str]]:
        """Forget what `encoder` was sending; returns instance -> hashes that will not come now."""
        lost: dict[str, list[str]] = {}
        for instance, by_hash in self.incoming.items():
            for content_hash, senders in list(by_hash.items()):
                if senders.pop(encoder, 0):
                    lost.setdefault(instance, []).append(content_hash)
                if not senders:
                    del by_hash[content_hash]
        return lost

    def forget(self, instance: str) -> None:
        self.cached.pop(instance, None)
        self.incoming.pop(instance, None)
