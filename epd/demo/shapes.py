"""The demo task: name the coloured shapes in an image, from left to right.

Every sample is a pure function of its seed, so training streams, held-out sets and test
inputs are reproducible anywhere. The spec:

| what            | rule                                                                  |
|-----------------|-----------------------------------------------------------------------|
| canvas          | RGB, white, width and height each an integer in [112, 224]            |
| shapes          | 1 to 3, `circle` / `square` (axis-aligned) / `triangle` (pointing up) |
| colours         | red (255,0,0), green (0,160,0), blue (0,0,255), yellow (230,200,0)    |
| size            | diameter or side, 20% to 35% of the shorter image side                |
| placement       | centres >= max(size_a, size_b) apart horizontally; any height         |
| one image       | "What shapes are in this image?" -> "red circle, blue square"         |
| 2 to 4 images   | "What shapes are in these images?" -> "image 1: ...; image 2: ..."    |
| scoring         | exact match after lower-casing, stripping, dropping one trailing "."  |

Horizontal separation by at least the larger size keeps the bounding boxes apart, so shapes
never overlap and the left-to-right order is never ambiguous.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (230, 200, 0),
}
KINDS = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
MIN_SIDE, MAX_SIDE = 112, 224
MIN_SHAPES, MAX_SHAPES = 1, 3
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.20, 0.35
MIN_IMAGES, MAX_IMAGES = 2, 4  # per multi-image request
SINGLE_QUESTION = "What shapes are in this image?"
MULTI_QUESTION = "What shapes are in these images?"

Seed = int | str


@dataclass(frozen=True)
class Shape:
    """One filled shape inside the square box [x, x + size) x [y, y + size)."""

    kind: str
    colour: str
    x: int
    y: int
    size: int

    @property
    def center_x(self) -> float:
        return self.x + self.size / 2

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"

    def draw(self, draw: ImageDraw.ImageDraw) -> None:
        """Paint the shape, unantialiased, so every pixel is the background or one palette colour."""
        x0, y0, x1, y1 = self.x, self.y, self.x + self.size - 1, self.y + self.size - 1
        fill = COLOURS[self.colour]
        if self.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif self.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif self.kind == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {self.kind!r}")


@dataclass(frozen=True)
class ShapeImage:
    """A canvas and its shapes, ordered left to right."""

    width: int
    height: int
    shapes: tuple[Shape, ...]

    @property
    def answer(self) -> str:
        return ", ".join(s.label for s in self.shapes)

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.width, self.height), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            shape.draw(draw)
        return image


@dataclass(frozen=True)
class Sample:
    """One request of the task: 1 to 4 images, the question, the expected answer."""

    images: tuple[ShapeImage, ...]

    @property
    def question(self) -> str:
        return SINGLE_QUESTION if len(self.images) == 1 else MULTI_QUESTION

    @property
    def answer(self) -> str:
        if len(self.images) == 1:
            return self.images[0].answer
        return "; ".join(f"image {i}: {img.answer}" for i, img in enumerate(self.images, start=1))

    def render(self) -> list[Image.Image]:
        return [img.render() for img in self.images]


def random_shape_image(rng: random.Random) -> ShapeImage:
    """Draw a canvas size, 1-3 shapes and a valid placement from `rng`."""
    width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    lo = math.ceil(MIN_SIZE_FRACTION * min(width, height))
    hi = math.floor(MAX_SIZE_FRACTION * min(width, height))
    count = rng.randint(MIN_SHAPES, MAX_SHAPES)
    while True:  # three large shapes may not fit side by side: redraw the sizes (rare)
        sizes = [rng.randint(lo, hi) for _ in range(count)]
        xs = _place_left_to_right(sizes, width, rng)
        if xs is not None:
            break
    shapes = tuple(
        Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), x, rng.randint(0, height - size), size)
        for x, size in zip(xs, sizes)
    )
    return ShapeImage(width, height, shapes)


def _place_left_to_right(sizes: list[int], width: int, rng: random.Random) -> list[int] | None:
    """Left edges for boxes of `sizes`, in order, with centres >= max(size) apart; None if they can't fit.

    First the tightest packing from x = 0; then the leftover room is spread by non-decreasing
    shifts, which keep every gap at least as wide as in the tight packing.
    """
    tight = [0]
    for prev, size in zip(sizes, sizes[1:]):
        # Doubled centres stay integers: 2*x_next + size >= 2*x_prev + prev + 2*max(prev, size).
        need = 2 * tight[-1] + prev + 2 * max(prev, size) - size
        tight.append(-(-need // 2))
    room = width - (tight[-1] + sizes[-1])
    if room < 0:
        return None
    shifts = sorted(rng.randint(0, room) for _ in sizes)
    return [x + s for x, s in zip(tight, shifts)]


def make_sample(seed: Seed, num_images: int | None = None) -> Sample:
    """The sample of this seed. `num_images=None` draws 2-4 images; give 1 for a single-image sample."""
    rng = random.Random(f"shapes/{seed}")
    if num_images is None:
        num_images = rng.randint(MIN_IMAGES, MAX_IMAGES)
    return Sample(tuple(random_shape_image(rng) for _ in range(num_images)))


def single_image_sample(seed: Seed) -> Sample:
    """A one-image sample (question `SINGLE_QUESTION`)."""
    return make_sample(seed, 1)


def multi_image_sample(seed: Seed) -> Sample:
    """A sample of 2 to 4 images (question `MULTI_QUESTION`)."""
    return make_sample(seed, None)


def chat_messages(sample: Sample, images: list[Any] | None = None) -> list[dict]:
    """The OpenAI-style user message epd's `LLM.chat` takes: the images first, then the question.

    `images` replaces the rendered PIL images (e.g. with file paths or data URLs of the same pictures).
    """
    if images is None:
        images = sample.render()
    content: list[dict] = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": sample.question})
    return [{"role": "user", "content": content}]


def normalize_answer(text: str) -> str:
    """Lower-case, strip whitespace and one trailing period (then whitespace again)."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def is_correct(prediction: str, answer: str) -> bool:
    """The task's score for one request: exact match after `normalize_answer` on both sides."""
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of exact (normalised) matches."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return sum(map(is_correct, predictions, answers)) / max(len(answers), 1)


# The shipped example pictures (epd/demo/samples): one, three and two shapes.
SAMPLE_SEEDS = ("sample/1", "sample/7", "sample/3")


def write_sample_files(out_dir: str, seeds: tuple[Seed, ...] = SAMPLE_SEEDS) -> dict:
    """Save `shapes_<i>.png` per seed and `answers.json` (per image, and all of them in one request)."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    samples = [single_image_sample(seed) for seed in seeds]
    files = [f"shapes_{i}.png" for i in range(1, len(samples) + 1)]
    for name, sample in zip(files, samples):
        sample.images[0].render().save(os.path.join(out_dir, name), optimize=True)
    together = Sample(tuple(s.images[0] for s in samples))
    answers = {
        "images": [
            {"file": name, "seed": seed, "question": s.question, "answer": s.answer}
            for name, seed, s in zip(files, seeds, samples)
        ],
        "all_images": {"files": files, "question": together.question, "answer": together.answer},
    }
    with open(os.path.join(out_dir, "answers.json"), "w", encoding="utf-8") as f:
        json.dump(answers, f, indent=2)
        f.write("\n")
    return answers
