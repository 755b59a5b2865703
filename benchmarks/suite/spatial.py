"""spatial: 3-7 shapes on a jittered 4x4 grid over a noisy dark 48 px canvas; the text asks whether one named
object is left of / right of / above / below another (sometimes negated) and how many objects have a colour or
a shape.

Meant to test spatial reasoning and counting: a globally pooled image vector loses where things are, so `answer`
rewards encoders and fusions that keep positions (token-level cross-attention) and `count` rewards features that
add up. `answer` is balanced and says nothing from either modality alone; `total` (objects in the image) is
imbalanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from .base import Task, pick
from .draw import PALETTE, draw_shape, smooth_field, with_noise

NAME = "spatial"
SUMMARY = "3-7 shapes on a grid (48 px); is the A left of/above the B (or not), how many <attribute>?"
IMAGE_SIZE = 48
SIZES = {"train": 4200, "validation": 600, "test": 1200}
TEXT_COLUMN = "question"
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
TOTALS = (3, 4, 5, 6, 7)
TOTAL_WEIGHTS = (0.1, 0.15, 0.25, 0.3, 0.2)
CELL, MARGIN = 10, 9  # grid cell side and the first cell centre, in pixels
RELATIONS = {  # relation -> (axis compared: 0 column, 1 row; sign) and its phrasings
    "left": (0, -1, ("left of", "to the left of", "on the left of")),
    "right": (0, 1, ("right of", "to the right of", "on the right of")),
    "above": (1, -1, ("above", "over", "higher than")),
    "below": (1, 1, ("below", "under", "lower than")),
}


@dataclass(frozen=True)
class Item:
    color: str
    shape: str
    column: int
    row: int


@dataclass(frozen=True)
class Query:
    first: tuple[str, str]  # (colour, shape) of the object asked about
    relation: str
    second: tuple[str, str]
    negated: bool
    counted: str  # a colour or a shape


def sample_scene(rng: np.random.Generator) -> tuple[Item, ...]:
    count = pick(rng, TOTALS, TOTAL_WEIGHTS)
    kinds = rng.permutation(len(COLORS) * len(SHAPES))[:count]
    cells = rng.permutation(16)[:count]
    return tuple(
        Item(COLORS[k // len(SHAPES)], SHAPES[k % len(SHAPES)], int(c % 4), int(c // 4)) for k, c in zip(kinds, cells)
    )


def holds(a: Item, relation: str, b: Item) -> bool:
    axis, sign, _ = RELATIONS[relation]
    return sign * ((a.column, a.row)[axis] - (b.column, b.row)[axis]) > 0


def sample_query(scene: tuple[Item, ...], rng: np.random.Generator) -> Query:
    answer, negated = bool(rng.random() < 0.5), bool(rng.random() < 0.25)
    options = [
        (a, relation, b)
        for a in scene
        for b in scene
        for relation, (axis, _, _) in RELATIONS.items()
        if (a.column, a.row)[axis] != (b.column, b.row)[axis] and holds(a, relation, b) == (answer != negated)
    ]
    a, relation, b = options[int(rng.integers(len(options)))]
    counted = pick(rng, COLORS + SHAPES)
    return Query((a.color, a.shape), relation, (b.color, b.shape), negated, counted)


def caption(query: Query, rng: np.random.Generator) -> str:
    a, b = " ".join(query.first), " ".join(query.second)
    relation = pick(rng, RELATIONS[query.relation][2])
    if query.negated:
        relation = pick(rng, ("not ", "in no way ")) + relation
    if rng.random() < 0.7:
        question = f"is the {a} {relation} the {b}?"
    else:
        question = f"look at the {b}: is the {a} {relation} it?"
    counted = PLURALS.get(query.counted) or f"{query.counted} things"
    count = pick(rng, (f"how many {counted} are there?", f"count the {counted}.", f"number of {counted}?"))
    return f"{question} {count}" if rng.random() < 0.5 else f"{count} {question}"


def render(scene: tuple[Item, ...], rng: np.random.Generator):
    base = rng.integers(20, 60, size=3)
    image = with_noise(base + 15 * smooth_field(rng, IMAGE_SIZE, 3), rng, 12)
    draw = ImageDraw.Draw(image)
    for item in scene:
        x, y = (MARGIN + CELL * v + int(rng.integers(-1, 2)) for v in (item.column, item.row))
        angle = float(rng.uniform(-0.3, 0.3))
        draw_shape(draw, item.shape, x, y, int(rng.integers(3, 5)), PALETTE[item.color], angle)
    return image


def _answer(scene, query: Query) -> str:
    a, b = ({(i.color, i.shape): i for i in scene}[kind] for kind in (query.first, query.second))
    return "yes" if holds(a, query.relation, b) != query.negated else "no"


def _count(scene, query: Query) -> int:
    return sum(query.counted in (item.color, item.shape) for item in scene)


TASKS = (
    Task("answer", "classification", _answer, text=lambda q: (q.relation, q.negated), classes=("no", "yes")),
    Task(
        "count",
        "regression",
        _count,
        image=len,  # the mean over the seven attributes asked about is 2 * len(scene) / 7
        text=lambda q: (q.counted, sum(q.counted in kind for kind in (q.first, q.second))),
    ),
    Task("total", "classification", lambda scene, query: len(scene), image="all", classes=TOTALS, noise=0.05),
)
