"""The demo task's generator keeps its spec, is deterministic, and scores as specified."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from epd.demo.shapes import (
    BACKGROUND,
    COLOURS,
    KINDS,
    MULTI_QUESTION,
    SINGLE_QUESTION,
    Sample,
    ShapeImage,
    accuracy,
    chat_messages,
    is_correct,
    make_sample,
    multi_image_sample,
    normalize_answer,
    single_image_sample,
)
from epd.inputs.chat import parse_messages

NUM_CHECKED = 1500


def shape_mask(image: ShapeImage, index: int) -> np.ndarray:
    """Pixels that shape `index` paints when drawn alone, with the real drawing code."""
    canvas = Image.new("RGB", (image.width, image.height), BACKGROUND)
    image.shapes[index].draw(ImageDraw.Draw(canvas))
    return (np.asarray(canvas) != BACKGROUND).any(axis=-1)


@pytest.fixture(scope="module")
def images() -> list[ShapeImage]:
    return [single_image_sample(f"spec/{i}").images[0] for i in range(NUM_CHECKED)]


def test_canvas_and_shape_sizes_within_spec(images):
    for img in images:
        assert 112 <= img.width <= 224 and 112 <= img.height <= 224
        assert 1 <= len(img.shapes) <= 3
        short = min(img.width, img.height)
        for s in img.shapes:
            assert 0.20 * short <= s.size <= 0.35 * short
            assert 0 <= s.x and s.x + s.size <= img.width
            assert 0 <= s.y and s.y + s.size <= img.height
            assert s.kind in KINDS and s.colour in COLOURS


def test_shapes_are_ordered_and_separated_horizontally(images):
    for img in images:
        for a, b in zip(img.shapes, img.shapes[1:]):
            assert b.center_x - a.center_x >= max(a.size, b.size)


def test_rendered_shapes_do_not_overlap_and_have_their_colour(images):
    for img in images[:300]:
        pixels = np.asarray(img.render())
        painted = np.zeros(pixels.shape[:2], dtype=int)
        for i, shape in enumerate(img.shapes):
            mask = shape_mask(img, i)
            assert mask.sum() > 0.3 * shape.size**2  # a triangle covers about half its box
            painted += mask
            assert (pixels[mask] == COLOURS[shape.colour]).all()
        assert painted.max() <= 1
        assert (pixels[painted == 0] == BACKGROUND).all()


def test_rendered_image_is_rgb_on_white():
    image = single_image_sample(5).render()[0]
    assert image.mode == "RGB"
    palette = {BACKGROUND, *COLOURS.values()}
    assert {tuple(c) for c in np.asarray(image).reshape(-1, 3)} <= palette


def test_every_kind_colour_and_count_occurs(images):
    labels = {s.label for img in images for s in img.shapes}
    assert labels == {f"{c} {k}" for c in COLOURS for k in KINDS}
    assert {len(img.shapes) for img in images} == {1, 2, 3}
    assert min(img.width for img in images) <= 115 and max(img.width for img in images) >= 221


def test_same_seed_same_sample_other_seed_other_sample():
    a, b = multi_image_sample("det/1"), multi_image_sample("det/1")
    assert a == b
    assert [np.asarray(x).tobytes() for x in a.render()] == [np.asarray(x).tobytes() for x in b.render()]
    assert multi_image_sample("det/2") != a
    assert single_image_sample(7) == make_sample(7, 1)


def test_multi_image_samples_have_two_to_four_images():
    counts = {len(multi_image_sample(i).images) for i in range(200)}
    assert counts == {2, 3, 4}


def test_answers_and_questions():
    sample = single_image_sample(3)
    img = sample.images[0]
    assert sample.question == SINGLE_QUESTION
    assert sample.answer == ", ".join(f"{s.colour} {s.kind}" for s in img.shapes)
    multi = Sample((img, img))
    assert multi.question == MULTI_QUESTION
    assert multi.answer == f"image 1: {img.answer}; image 2: {img.answer}"


def test_chat_messages_are_images_then_question_and_epd_accepts_them():
    sample = multi_image_sample(11)
    [message] = chat_messages(sample)
    assert message["role"] == "user"
    parts = message["content"]
    assert [p["type"] for p in parts] == ["image"] * len(sample.images) + ["text"]
    assert parts[-1]["text"] == MULTI_QUESTION
    _, sources = parse_messages([message])
    assert len(sources) == len(sample.images)


@pytest.mark.parametrize(
    ("prediction", "ok"),
    [
        ("red circle, blue square", True),
        ("  Red Circle, Blue Square.  ", True),
        ("red circle, blue square.\n", True),
        ("red circle, blue square..", False),
        ("red circle,blue square", False),
        ("blue square, red circle", False),
        ("red circle", False),
    ],
)
def test_scoring_normalisation(prediction, ok):
    assert is_correct(prediction, "red circle, blue square") is ok


def test_normalize_and_accuracy():
    assert normalize_answer(" Image 1: Red Circle; image 2: green square. ") == (
        "image 1: red circle; image 2: green square"
    )
    assert accuracy(["a", "b."], ["A", "c"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["a"], [])
