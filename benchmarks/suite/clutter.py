"""clutter: 2-6 small coloured shapes scattered among grey scribbles on a mottled 96 px canvas; the question names
one object by its colour and asks for its shape.

Meant to test small objects in clutter (max against mean pooling, a receptive field that separates an object
from scribbles) and attribute binding: the text selects one of several objects, so the fusion must let the text
pick an image region. Shapes are imbalanced and 5 % of the shape labels are wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from .base import Task, pick
from .draw import PALETTE, draw_shape, scatter, smooth_field, with_noise

NAME = "clutter"
SUMMARY = "small shapes among grey scribbles (96 px); what shape is the <colour> object?"
IMAGE_SIZE = 96
SIZES = {"train": 3000, "validation": 500, "test": 1000}
TEXT_COLUMN = "question"
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
COUNTS = (2, 3, 4, 5, 6)
COUNT_WEIGHTS = (0.15, 0.25, 0.25, 0.2, 0.15)
QUESTIONS = (
    "what shape is the {c} object?",
    "{c} thing: which shape?",
    "name the shape of the {c} one",
    "somewhere in this mess there is a {c} item. what shape is it?",
    "shape of the {c} piece?",
    "which shape has the colour {c}?",
)
FILLERS = ("please", "quickly", "hmm", "ok", "look closely", "ignore the scribbles")


@dataclass(frozen=True)
class Item:
    color: str
    shape: str
    x: int
    y: int
    radius: int


@dataclass(frozen=True)
class Query:
    color: str  # the object asked about
    foil: str | None  # another object's colour, mentioned only to be ruled out


def sample_scene(rng: np.random.Generator) -> tuple[Item, ...]:
    count = pick(rng, COUNTS, COUNT_WEIGHTS)
    colors = rng.permutation(len(COLORS))[:count]
    points = scatter(rng, count, IMAGE_SIZE, margin=12, gap=16)
    return tuple(
        Item(COLORS[c], pick(rng, SHAPES, SHAPE_WEIGHTS), x, y, int(rng.integers(3, 6)))
        for c, (x, y) in zip(colors, points)
    )


def sample_query(scene: tuple[Item, ...], rng: np.random.Generator) -> Query:
    order = rng.permutation(len(scene))
    foil = scene[order[1]].color if rng.random() < 0.35 else None
    return Query(scene[order[0]].color, foil)


def caption(query: Query, rng: np.random.Generator) -> str:
    text = pick(rng, QUESTIONS).format(c=query.color)
    if query.foil is not None:
        text = f"not the {query.foil} one: {text}" if rng.random() < 0.5 else f"{text} (not the {query.foil} one)"
    if rng.random() < 0.3:
        text = f"{pick(rng, FILLERS)}, {text}"
    return text


def render(scene: tuple[Item, ...], rng: np.random.Generator):
    base = rng.integers(80, 150) + rng.integers(-15, 16, size=3)
    image = with_noise(base + 30 * smooth_field(rng, IMAGE_SIZE, 5), rng, 6)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(25, 45))):  # grey scribbles and specks, under the objects
        grey = int(rng.integers(40, 220))
        x, y = rng.integers(0, IMAGE_SIZE, size=2)
        dx, dy = rng.integers(-10, 11, size=2)
        draw.line((x, y, x + dx, y + dy), fill=(grey, grey, grey), width=int(rng.integers(1, 3)))
    for item in scene:
        draw_shape(draw, item.shape, item.x, item.y, item.radius, PALETTE[item.color], float(rng.uniform(0, 6.3)))
    return image


def _shape(scene, query: Query) -> str:
    return next(item.shape for item in scene if item.color == query.color)


TASKS = (
    Task(
        "shape",
        "classification",
        _shape,
        image=lambda scene: tuple(sorted(item.shape for item in scene)),
        classes=SHAPES,
        noise=0.05,
    ),
    Task(
        "colors",
        "multilabel",
        lambda scene, query: sorted(item.color for item in scene),
        image="all",
        text=lambda query: (query.color, query.foil),
        classes=COLORS,
        missing=0.15,
    ),
    Task("count", "regression", lambda scene, query: len(scene), image="all", missing=0.1),
)
