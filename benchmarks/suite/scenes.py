"""scenes: 2-4 small filled, outlined, striped or dotted shapes in distinct regions of a 128 px landscape (sky by
time of day over textured ground); the caption lists every object's colour, shape and region, and 30 % of the
captions get one detail wrong.

Meant to test few rows (1,500) at a large canvas with objects small relative to it, image-text matching where a
caption identifies its image almost uniquely (`pair` reads `faithful`), and image-only labels that no caption
mentions: the fill patterns (multilabel, fine detail) and the time of day (global colour).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .base import Task, pick
from .draw import PALETTE, shape_mask, smooth_field, with_noise

NAME = "scenes"
SUMMARY = "small patterned shapes in a 128 px landscape; captions list them (30 % with one error)"
IMAGE_SIZE = 128
SIZES = {"train": 1000, "validation": 200, "test": 300}
TEXT_COLUMN = "caption"
COLORS = ("red", "green", "blue", "yellow", "magenta", "white")
SHAPES = ("circle", "square", "triangle", "star")
FILLS = ("solid", "outline", "striped", "dotted")
TIMES = ("day", "dusk", "night")
SKIES = {
    "day": ((90, 160, 235), (170, 210, 250)),
    "dusk": ((90, 60, 130), (245, 140, 80)),
    "night": ((10, 15, 45), (35, 40, 90)),
}
REGIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
PLACES = ("at the {r}", "in the {r}", "{r}")


@dataclass(frozen=True)
class Item:
    color: str
    shape: str
    fill: str
    region: int  # index into REGIONS (row-major 3x3)


@dataclass(frozen=True)
class Scene:
    time: str
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Query:
    said: tuple[tuple[str, str, int], ...]  # (colour, shape, region) of each object, sorted
    faithful: bool
    absent: str  # a colour no object has, mentioned in a negation


def described(items) -> tuple[tuple[str, str, int], ...]:
    return tuple(sorted((item.color, item.shape, item.region) for item in items))


def sample_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(2, 5))
    kinds = rng.permutation(len(COLORS) * len(SHAPES))[:count]
    regions = rng.permutation(9)[:count]
    items = tuple(
        Item(COLORS[k // len(SHAPES)], SHAPES[k % len(SHAPES)], pick(rng, FILLS), int(r))
        for k, r in zip(kinds, regions)
    )
    return Scene(pick(rng, TIMES), items)


def sample_query(scene: Scene, rng: np.random.Generator) -> Query:
    """Describe every object; in 30 % of rows change the colour, shape or region of one of them."""
    items, faithful = list(scene.items), bool(rng.random() >= 0.3)
    while not faithful:
        index, attribute = int(rng.integers(len(items))), pick(rng, ("color", "shape", "region"))
        values = {"color": COLORS, "shape": SHAPES, "region": range(9)}[attribute]
        value = pick(rng, [v for v in values if v != getattr(items[index], attribute)])
        changed = replace(items[index], **{attribute: value})
        others = items[:index] + items[index + 1 :]
        if all((o.color, o.shape) != (changed.color, changed.shape) and o.region != changed.region for o in others):
            items[index] = changed
            break
    named = {item.color for item in scene.items} | {color for color, _, _ in described(items)}
    absent = pick(rng, [c for c in COLORS if c not in named])  # never contradicts the caption
    return Query(described(items), faithful, absent)


def caption(query: Query, rng: np.random.Generator) -> str:
    parts = [f"a {color} {shape} {pick(rng, PLACES).format(r=REGIONS[region])}" for color, shape, region in query.said]
    parts = [parts[i] for i in rng.permutation(len(parts))]
    text = ", ".join(parts[:-1]) + " and " + parts[-1]
    if rng.random() < 0.4:
        text += f"; no {query.absent} things"
    return pick(rng, ("{t}.", "In this picture: {t}.", "There is {t}.")).format(t=text)


def _paint(pixels: np.ndarray, item: Item, x: int, y: int, r: int, rng: np.random.Generator) -> None:
    """Draw one object into `pixels` (float array) with its fill pattern."""
    colour = np.array(PALETTE[item.color], dtype=np.float32)
    angle = float(rng.uniform(0, 6.3))
    inside = shape_mask(IMAGE_SIZE, item.shape, x, y, r, angle)
    if item.fill == "outline":
        inside &= ~shape_mask(IMAGE_SIZE, item.shape, x, y, r - 2.5, angle)
    elif item.fill in ("striped", "dotted"):
        rows, cols = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
        if item.fill == "striped":
            pattern = (rows + cols) % 4 < 2
        else:
            pattern = (rows % 3 == 0) & (cols % 3 == 0)
        pixels[inside & ~pattern] = 0.35 * colour
        inside &= pattern
    pixels[inside] = colour


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    low, high = (np.array(c, dtype=np.float32) for c in SKIES[scene.time])
    horizon = int(rng.integers(70, 90))
    t = np.clip(np.arange(IMAGE_SIZE, dtype=np.float32) / horizon, 0, 1)[:, None, None]
    pixels = np.broadcast_to(low + (high - low) * t, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    ground = rng.integers(40, 140, size=3) + 30 * smooth_field(rng, IMAGE_SIZE, 12)
    pixels[horizon:] = ground[horizon:]
    if scene.time == "night":
        stars = rng.integers(0, IMAGE_SIZE, size=(30, 2))
        stars = stars[stars[:, 0] < horizon]
        pixels[stars[:, 0], stars[:, 1]] = 230
    for item in scene.items:
        row, column = divmod(item.region, 3)
        x, y = (22 + 42 * v + int(rng.integers(-8, 9)) for v in (column, row))
        _paint(pixels, item, x, y, int(rng.integers(6, 10)), rng)
    return with_noise(pixels, rng, 5)


TASKS = (
    Task("faithful", "classification", lambda scene, query: query.faithful, classes=(False, True)),
    Task("pair", "matching", column="faithful", key=lambda scene, query: query.said),
    Task(
        "fills",
        "multilabel",
        lambda scene, query: sorted({item.fill for item in scene.items}),
        image="all",
        classes=FILLS,
        missing=0.1,
    ),
    Task("time", "classification", lambda scene, query: scene.time, image="all", classes=TIMES),
)
