"""catalog: one product (8 shape categories, 6 visual attributes) photographed on an 80 px studio backdrop, with
a short review that gives the quantity bought (digits or words) and an opinion, often negated ("not bad").

Meant to test multilabel attributes with imbalanced prevalences and 30 % missing label lists, a text-only task
where a bag of words fails (`sentiment`: the polarity word flips under "not", "never", "hardly", and a neutral
filler sounds negative), and a multiplicative interaction (`total` = quantity from the text x unit price of the
category seen): concatenation needs its MLP for it, bilinear or FiLM fusion have it built in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .base import Task, number, pick
from .draw import PALETTE, shape_mask, with_noise

NAME = "catalog"
SUMMARY = "one product with visual attributes (80 px) and a review; sentiment, attributes, quantity x price"
IMAGE_SIZE = 80
SIZES = {"train": 7000, "validation": 1000, "test": 2000}
TEXT_COLUMN = "review"
CATEGORIES = ("circle", "square", "triangle", "star", "pentagon", "hexagon", "diamond", "cross")
PRICES = dict(zip(CATEGORIES, (2, 3, 4, 6, 8, 10, 13, 16)))
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange")
ATTRIBUTES = {"striped": 0.35, "outlined": 0.4, "shadow": 0.3, "two_tone": 0.25, "tilted": 0.3, "glossy": 0.15}
QUANTITIES = (1, 2, 3, 4, 5, 6)
POSITIVE = ("good", "great", "lovely", "sturdy", "worth it")
NEGATIVE = ("bad", "awful", "flimsy", "cheap looking", "a waste")
NEGATIONS = ("not", "never", "hardly", "not at all")
AMOUNTS = ("bought {n}", "a pack of {n}", "ordered {n} of these", "{n} in the box", "got {n}")
FILLERS = ("shipping was slow", "arrived on time", "a gift for my sister", "the colour is as pictured", "")


@dataclass(frozen=True)
class Scene:
    category: str
    color: str
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class Query:
    quantity: int
    word: str  # the opinion word
    negated: bool


def sample_scene(rng: np.random.Generator) -> Scene:
    category = pick(rng, CATEGORIES)
    draws = rng.random(len(ATTRIBUTES))
    attributes = tuple(
        name
        for (name, rate), draw in zip(ATTRIBUTES.items(), draws)
        if draw < rate and not (name == "tilted" and category == "circle")  # a tilted circle looks the same
    )
    return Scene(category, pick(rng, COLORS), attributes)


def sample_query(scene: Scene, rng: np.random.Generator) -> Query:
    return Query(pick(rng, QUANTITIES), pick(rng, POSITIVE + NEGATIVE), bool(rng.random() < 0.4))


def caption(query: Query, rng: np.random.Generator) -> str:
    opinion = (
        f"{pick(rng, NEGATIONS)} {query.word}"
        if query.negated
        else f"{pick(rng, ('really', 'quite', ''))} {query.word}"
    )
    amount = pick(rng, AMOUNTS).format(n=number(query.quantity, rng)) if query.quantity > 1 else "just one"
    parts = [amount, f"{pick(rng, ('it is', 'they are', 'honestly'))} {opinion.strip()}", pick(rng, FILLERS)]
    parts = [parts[i] for i in rng.permutation(3) if parts[i]]
    return ". ".join(parts) + "."


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    size = IMAGE_SIZE
    shade = rng.integers(170, 235) + rng.integers(-10, 11, size=3)
    rows = np.arange(size, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(shade - 0.4 * rows, (size, size, 3)).astype(np.float32)
    x, y = (40 + int(rng.integers(-8, 9)) for _ in range(2))
    radius = int(rng.integers(18, 27))
    tilted = "tilted" in scene.attributes
    angle = float(rng.choice((-1, 1)) * (rng.uniform(0.35, 0.7) if tilted else rng.uniform(0, 0.08)))
    attributes = set(scene.attributes)
    inside = shape_mask(size, scene.category, x, y, radius, angle)
    if "shadow" in attributes:
        pixels[shape_mask(size, scene.category, x + 5, y + 5, radius, angle)] = (70, 70, 75)
    colour = np.array(PALETTE[scene.color], dtype=np.float32)
    pixels[inside] = colour
    grid_y, grid_x = np.mgrid[:size, :size]
    if "two_tone" in attributes:
        pixels[inside & (grid_x < x)] = 0.45 * colour + 0.55 * np.array(PALETTE["white"])
    if "striped" in attributes:
        pixels[inside & ((grid_x + grid_y) % 8 < 3)] = (250, 250, 250)
    if "glossy" in attributes:
        spot = (grid_x - x + radius / 4) ** 2 + (grid_y - y + radius / 4) ** 2 < (radius / 5) ** 2
        pixels[inside & spot] = (255, 255, 255)
    if "outlined" in attributes:
        pixels[inside & ~shape_mask(size, scene.category, x, y, radius - 3, angle)] = (20, 20, 20)
    return with_noise(pixels, rng, 4)


def _sentiment(scene, query: Query) -> str:
    return "positive" if (query.word in POSITIVE) != query.negated else "negative"


TASKS = (
    Task("category", "classification", lambda scene, query: scene.category, image="all", classes=CATEGORIES),
    Task(
        "attributes",
        "multilabel",
        lambda scene, query: list(scene.attributes),
        image="all",
        classes=tuple(ATTRIBUTES),
        missing=0.3,
    ),
    Task(
        "sentiment",
        "classification",
        _sentiment,
        text="all",
        classes=("negative", "positive"),
        noise=0.05,
    ),
    Task(
        "total",
        "regression",
        lambda scene, query: query.quantity * PRICES[scene.category],
        image=lambda scene: scene.category,
        text=lambda query: query.quantity,
    ),
)
