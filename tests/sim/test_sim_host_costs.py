"""The host CPU's work around the model in a simulation: the front end delays a request before the
router sees it, and decoding its image files delays the task that carries them to the encoding
instance; alone on a cluster, a request's TTFT grows by exactly those two."""

from __future__ import annotations

import dataclasses

import pytest

from epd.cli import build_parser, simulated_engine_args
from epd.sim.command import simulate_spec
from epd.sim.images import SizedImageProcessor
from epd.sim.simulation import simulate_rate

FRONT_END_S, PER_REQUEST_IMAGE_S, PATCH_NS_PER_PIXEL = 0.010, 0.002, 100.0


@dataclasses.dataclass(frozen=True)
class SlowHost:
    """A host whose CPU work is known: a fixed cost per request and per image, decoding by pixels."""

    def front_end_seconds(self, image_pixels) -> float:
        return FRONT_END_S + PER_REQUEST_IMAGE_S * len(image_pixels)

    def patches_seconds(self, pixels: int, grid) -> float:
        return PATCH_NS_PER_PIXEL * 1e-9 * pixels


def ttfts(layout: str, host: SlowHost | None, quick: list[str]) -> tuple[list[float], list[int]]:
    flags = ["simulate", "--layout", layout, "--rate", "0.2", "--images-per-request", "2", *quick]
    args = build_parser().parse_args([*flags, "--num-requests", "4", "--image-size", "448x336"])
    spec = simulate_spec(args, simulated_engine_args(args))
    spec = dataclasses.replace(spec, cluster=dataclasses.replace(spec.cluster, host_costs=host))
    run, _ = simulate_rate(spec, 0, SizedImageProcessor.from_pretrained(spec.cluster.engine.model.model))
    return [r["ttft"] for r in run["requests"]], [r["num_images"] for r in run["requests"]]


@pytest.mark.parametrize("layout", ["1E+1P+1D", "1EP+1D", "1EPD"])
def test_a_lone_request_waits_for_its_front_end_and_its_slowest_image(layout, quick):
    free, images = ttfts(layout, None, quick)
    slow, _ = ttfts(layout, SlowHost(), quick)
    # Two images each, decoded in parallel: one image's time, not two.
    slowest_image = PATCH_NS_PER_PIXEL * 1e-9 * 448 * 336
    added = FRONT_END_S + 2 * PER_REQUEST_IMAGE_S + slowest_image
    for before, after, count in zip(free, slow, images, strict=True):
        assert count == 2
        assert after - before == pytest.approx(added, abs=1e-6)
