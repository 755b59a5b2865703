"""glyphs: a short word and a digit printed in a font of this machine on ruled, noisy paper (64 px); the text
claims what the word is and asks to add a number to the digit.

Meant to test thin strokes and reading (OCR-like: receptive field and resolution rather than colour), numbers
written in the text as digits or words, and a regression target that is a sum of an image part and a text part.
`says` (is the claim right?) and `pair` (image-text matching on the true claims) need both modalities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .base import Task, number, pick
from .draw import font_files, font_names, load_font, smooth_field, with_noise

NAME = "glyphs"
SUMMARY = "a printed word and digit on noisy paper (64 px, fonts of this machine); is the claim right, digit + n?"
IMAGE_SIZE = 64
SIZES = {"train": 5600, "validation": 800, "test": 1600}
TEXT_COLUMN = "text"
WORDS = ("cat", "dog", "sun", "map", "key", "box", "cup", "hat", "pen", "fox", "owl", "jar")
DIGITS = tuple(range(10))
TEMPLATES = (
    "add {k} to the number on the {w} sign",
    "the sign says {w}; what is its number plus {k}?",
    "{w} sign, number + {k}",
    "if the word reads {w}, add {k} to the digit",
    "{k} more than the digit next to {w}",
)
ADJECTIVES = ("old", "small", "painted", "faded", "wooden", "")


@dataclass(frozen=True)
class Scene:
    word: str
    digit: int


@dataclass(frozen=True)
class Query:
    claim: str  # the word the text says is printed
    add: int


def provenance() -> dict:
    return {"fonts": font_names()}


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(pick(rng, WORDS), int(rng.integers(10)))


def sample_query(scene: Scene, rng: np.random.Generator) -> Query:
    claim = scene.word if rng.random() < 0.5 else pick(rng, [w for w in WORDS if w != scene.word])
    return Query(claim, int(rng.integers(10)))


def caption(query: Query, rng: np.random.Generator) -> str:
    adjective = pick(rng, ADJECTIVES)
    word = f"{adjective} '{query.claim}'" if adjective else f"'{query.claim}'"
    return pick(rng, TEMPLATES).format(w=word, k=number(query.add, rng))


def _print(image: Image.Image, text: str, font, ink, centre: tuple[int, int], angle: float) -> None:
    """Draw `text` centred at `centre`, rotated by `angle` degrees, in colour `ink`."""
    layer = Image.new("L", image.size, 0)
    ImageDraw.Draw(layer).text(centre, text, fill=255, font=font, anchor="mm")
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, center=centre)
    image.paste(Image.new("RGB", image.size, ink), mask=layer)


def render(scene: Scene, rng: np.random.Generator):
    paper = rng.integers(200, 245) + rng.integers(-12, 13, size=3)
    pixels = paper + 12 * smooth_field(rng, IMAGE_SIZE, 4)
    rows = np.arange(IMAGE_SIZE)[:, None]
    pixels = pixels - 35 * ((rows + rng.integers(8)) % 8 == 0)[..., None]  # faint ruled lines
    image = with_noise(pixels, rng, 7)
    word_top = rng.random() < 0.5
    fonts = max(1, len(font_files()))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    word_font = load_font(int(rng.integers(fonts)), int(rng.integers(13, 18)))
    centre = (int(rng.integers(22, 43)), int(rng.integers(14, 19)) if word_top else int(rng.integers(45, 50)))
    _print(image, scene.word, word_font, ink, centre, float(rng.uniform(-10, 10)))
    digit_font = load_font(int(rng.integers(fonts)), int(rng.integers(12, 17)))
    centre = (int(rng.integers(14, 51)), int(rng.integers(45, 50)) if word_top else int(rng.integers(14, 19)))
    ImageDraw.Draw(image).ellipse((centre[0] - 9, centre[1] - 9, centre[0] + 9, centre[1] + 9), outline=ink)
    _print(image, str(scene.digit), digit_font, ink, centre, float(rng.uniform(-10, 10)))
    return image


TASKS = (
    Task(
        "word",
        "classification",
        lambda scene, query: scene.word,
        image="all",
        text=lambda query: query.claim,
        classes=WORDS,
        missing=0.2,
    ),
    Task("digit", "classification", lambda scene, query: scene.digit, image="all", classes=DIGITS, noise=0.05),
    Task("says", "classification", lambda scene, query: scene.word == query.claim, classes=(False, True)),
    Task(
        "total",
        "regression",
        lambda scene, query: scene.digit + query.add,
        image=lambda scene: scene.digit,
        text=lambda query: query.add,
    ),
    Task("pair", "matching", column="says", key=lambda scene, query: scene.word),
)
