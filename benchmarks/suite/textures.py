"""textures: a full-frame periodic texture (8 patterns, long-tailed) at 3-8 px periods in two random colours with
noise, 32 px; the text claims the swatch does (or does not) show some pattern.

Meant to test low-resolution texture recognition on the largest set (20,000 rows, where throughput decides how
much a time budget buys), negation in the text (`true` flips with "not"/"no"), class imbalance, 10 % wrong and
20 % missing `pattern` labels, and a regression (`period`) read from the image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .base import Task, pick
from .draw import with_noise

NAME = "textures"
SUMMARY = "periodic textures in 2 colours with noise (32 px); is the (negated) claim about the pattern true?"
IMAGE_SIZE = 32
SIZES = {"train": 14000, "validation": 2000, "test": 4000}
TEXT_COLUMN = "caption"
PATTERNS = ("stripes", "bands", "diagonal", "checker", "dots", "grid", "speckle", "rings")
PATTERN_WEIGHTS = (0.28, 0.18, 0.12, 0.1, 0.08, 0.08, 0.08, 0.08)
# Chance that the claim names the pattern shown (else one of the 7 others, uniformly): rarer patterns are named
# right more often, so that every claim is right half of the time and the text alone says nothing about `true`.
# It solves w_p * r_p = sum_{q != p} w_q (1 - r_q) / 7 for every p; it needs 1/14 <= w_p <= 1/2.
RIGHT_CLAIM = {p: (0.5 / w - 1) / (len(PATTERN_WEIGHTS) - 2) for p, w in zip(PATTERNS, PATTERN_WEIGHTS)}
PERIODS = (3, 4, 5, 6, 7, 8)
NAMES = {
    "stripes": ("vertical stripes", "upright stripes"),
    "bands": ("horizontal stripes", "horizontal bands"),
    "diagonal": ("diagonal stripes", "slanted lines"),
    "checker": ("a checkerboard", "checks"),
    "dots": ("dots", "polka dots"),
    "grid": ("a grid", "crossing lines"),
    "speckle": ("speckles", "random speckle"),
    "rings": ("rings", "concentric circles"),
}
AFFIRM = ("this swatch shows {p}", "{p}, I believe", "a fabric with {p}", "clearly {p}")
DENY = ("this swatch does not show {p}", "no {p} here", "{p}? not at all", "I would not call this {p}")
HUES = ("teal", "rusty", "pale", "dark", "bright", "muted")  # distractors: colours are random and not labelled


@dataclass(frozen=True)
class Scene:
    pattern: str
    period: int


@dataclass(frozen=True)
class Query:
    claim: str
    negated: bool


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(pick(rng, PATTERNS, PATTERN_WEIGHTS), pick(rng, PERIODS))


def sample_query(scene: Scene, rng: np.random.Generator) -> Query:
    right = rng.random() < RIGHT_CLAIM[scene.pattern]
    claim = scene.pattern if right else pick(rng, [p for p in PATTERNS if p != scene.pattern])
    return Query(claim, bool(rng.random() < 0.5))


def caption(query: Query, rng: np.random.Generator) -> str:
    text = pick(rng, DENY if query.negated else AFFIRM).format(p=pick(rng, NAMES[query.claim]))
    if rng.random() < 0.4:
        text = f"{pick(rng, HUES)} swatch. {text}"
    return text


def texture(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Boolean (size, size) foreground mask of the pattern at the scene's period, with a random phase. No pattern
    is another one with the colours swapped, and each shows its period."""
    phase = rng.integers(0, scene.period, size=2)
    y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] + phase[:, None, None]
    p, half = scene.period, scene.period / 2
    if scene.pattern == "stripes":
        return x % p < half
    if scene.pattern == "bands":
        return y % p < half
    if scene.pattern == "diagonal":
        return (x + y) % p < half
    if scene.pattern == "checker":
        return (x % p < half) != (y % p < half)
    if scene.pattern == "dots":
        return (x % p < p // 3) & (y % p < p // 3)
    if scene.pattern == "grid":
        return (x % p == 0) | (y % p == 0)
    if scene.pattern == "speckle":  # p x p blocks, each on or off at random
        blocks = rng.random((IMAGE_SIZE // p + 2, IMAGE_SIZE // p + 2)) < 0.5
        return np.kron(blocks, np.ones((p, p), dtype=bool))[phase[0] :, phase[1] :][:IMAGE_SIZE, :IMAGE_SIZE]
    centre = rng.integers(0, IMAGE_SIZE, size=2)
    return np.hypot(x - phase[1] - centre[0], y - phase[0] - centre[1]) % p < half  # rings


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 256, size=3)
    foreground = (background + rng.integers(70, 186, size=3) * rng.choice((-1, 1), size=3)) % 256
    mask = texture(scene, rng)[..., None]
    return with_noise(np.where(mask, foreground, background).astype(np.float32), rng, 14)


TASKS = (
    Task(
        "true",
        "classification",
        lambda scene, query: (scene.pattern == query.claim) != query.negated,
        text=lambda query: (query.claim, query.negated),
        classes=(False, True),
    ),
    Task(
        "pattern",
        "classification",
        lambda scene, query: scene.pattern,
        image="all",
        text=lambda query: query.claim,
        classes=PATTERNS,
        noise=0.1,
        missing=0.2,
    ),
    Task("period", "regression", lambda scene, query: scene.period, image="all", missing=0.1),
)
