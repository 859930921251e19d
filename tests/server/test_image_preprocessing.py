"""Image preprocessing under hostile load: the default pixel limit follows the model, and the
preprocessing of requests whose clients left stops, holding admission until it has."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from PIL import Image, ImageDraw

from .helpers import (
    ServerProcess,
    data_url,
    encode_image,
    gauge,
    png_header_only,
    wait_for_metrics,
    wait_until_idle,
)

NAME = "tiny-images"
IMAGES_PER_REQUEST = 64
SIDE = 2000  # 4 Mpx: just under the default limit for this model (4 Mi pixels, the floor)
ABANDONED = 3


@pytest.fixture(scope="module")
def images_server(model: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """No --max-image-pixels: the default derived from the model applies."""
    log = tmp_path_factory.mktemp("logs") / "images_server.log"
    args = ["--model", model, "--served-model-name", NAME, "--layout", "1EPD"]
    args += ["--max-images-per-request", str(IMAGES_PER_REQUEST)]
    srv = ServerProcess(args, log).start()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def large_png(seed: int) -> bytes:
    """A big image that compresses well: decoding it costs what its pixels cost, not its bytes."""
    img = Image.new("RGB", (SIDE, SIDE), (200, 220, 240))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        box = [i * 150, i * 120 + seed, i * 150 + 600, i * 120 + seed + 500]
        draw.rectangle(box, fill=((i * 37 + seed) % 256, (i * 91) % 256, 90))
    return encode_image(img, "PNG")


def chat(images: list[str], text: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    return {"model": NAME, "messages": messages, "max_tokens": 2}


def test_default_pixel_limit_comes_from_the_model(images_server: ServerProcess):
    bomb = data_url(png_header_only(2100, 2100))  # 4.4 Mpx: under the old fixed 32 Mpx default
    resp = httpx.post(images_server.url + "/v1/chat/completions", json=chat([bomb], "hi"), timeout=60)
    assert resp.status_code == 400
    assert "limit 4194304" in resp.json()["error"]["message"]


def preprocessing(m: dict) -> float:
    return gauge(m, "epd_requests_preprocessing")


def test_abandoned_requests_stop_preprocessing_and_hold_admission_until_then(images_server: ServerProcess):
    url = images_server.url
    before = wait_until_idle(url)
    cancelled_before = gauge(before, "epd_preprocessing_cancelled_total")
    bodies = [chat([data_url(large_png(seed))] * IMAGES_PER_REQUEST, f"r{seed}") for seed in range(ABANDONED)]

    async def abandon() -> list[asyncio.Task]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            posts = [asyncio.ensure_future(http.post("/v1/chat/completions", json=b)) for b in bodies]
            # Hang up once every request is decoding its images, seconds of work from done.
            await asyncio.to_thread(
                wait_for_metrics, url, lambda m: preprocessing(m) == ABANDONED, 60, "all preprocessing"
            )
            for post in posts:
                post.cancel()
            await asyncio.gather(*posts, return_exceptions=True)
            return posts

    posts = asyncio.run(abandon())
    assert all(post.cancelled() for post in posts), "a request finished before its client left"

    # Admission reaches 0 only once every thread has stopped: never with preprocessing running.
    after = wait_for_metrics(url, lambda m: gauge(m, "epd_requests_admitted") == 0, what="admission empty")
    assert preprocessing(after) == 0
    assert gauge(after, "epd_preprocessing_cancelled_total") - cancelled_before == ABANDONED
    text_only = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", json=text_only, timeout=60).status_code == 200
    key = (("endpoint", "/v1/chat/completions"), ("status", "499"))
    assert wait_until_idle(url)["epd_http_requests_total"][key] >= ABANDONED
