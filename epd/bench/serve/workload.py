"""A workload is a list of chat requests built before the clock starts.

Everything expensive (drawing and encoding images, tokenising prompts, serialising JSON)
happens here, so the client's own work does not show up in the latencies it measures.
Every workload is a pure function of (spec, seed, namespace): runs of a rate sweep use
different namespaces, so that a later run does not find the earlier run's images and
prompts in the server's caches, while two servers given the same seed get the same requests.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from epd.bench.serve.spec import SLO, WorkloadSpec


@dataclass(frozen=True)
class BenchRequest:
    """The parts of one /v1/chat/completions body that the workload decides."""

    messages: list[dict]
    max_tokens: int | None
    num_images: int
    extra: dict = field(default_factory=dict)  # temperature, ignore_eos, a dataset's own fields
    expected: str | None = None  # reference answer: scored with the demo task's exact match
    prompt_text_tokens: int | None = None  # text tokens of the prompt, when a tokenizer was at hand
    request_class: str | None = None  # its class in a mixed workload (--classes)
    slo: SLO | None = None  # its class's SLO, which judges it instead of the command's


def build_requests(
    spec: WorkloadSpec,
    n: int,
    seed: int,
    namespace: str,
    tokenizer_dir: str | None,
    image_url: Callable[[int, int, int], str] | None = None,
) -> list[BenchRequest]:
    """`n` requests of the workload `spec.kind`. `image_url` (synthetic only) names each image from
    its (width, height, seed) instead of drawing it: the simulator's requests without pixels."""
    if spec.kind == "synthetic":
        from epd.bench.serve.synthetic import synthetic_requests

        return synthetic_requests(spec, n, seed, namespace, tokenizer_dir, image_url)
    if spec.kind == "shapes":
        from epd.bench.serve.shapes_task import shapes_requests

        return shapes_requests(spec, n, seed, namespace)
    if spec.kind == "jsonl":
        from epd.bench.serve.jsonl import jsonl_requests

        if spec.dataset_path is None:
            raise ValueError("--workload jsonl needs --dataset-path FILE")
        return jsonl_requests(spec.dataset_path, n, spec.output_tokens)
    raise ValueError(f"unknown workload {spec.kind!r}")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: stable across processes (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def user_message(image_urls: list[str], text: str) -> list[dict]:
    """One user turn: the images first, then the text (the order the demo task was trained on)."""
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]
