"""What a suite set is made of: a scene (what the image shows), a query (what the text says), tasks whose clean
labels are functions of both, and seeded rows.

Every set module defines NAME, SUMMARY, IMAGE_SIZE, SIZES, TEXT_COLUMN, TASKS and four functions:
`sample_scene(rng)`, `sample_query(scene, rng)`, `caption(query, rng) -> str` (the text sees only the query) and
`render(scene, rng) -> PIL image` (the image sees only the scene). Each row draws from five generators seeded
with (seed, split, index, stream), so rows can be made one by one and labels without drawing the image.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

SPLITS = ("train", "validation", "test")
SCENE, QUERY, TEXT, LABELS, IMAGE = range(5)  # a row's random streams

View = Callable[[Any], Hashable] | str | None
"""What one modality determines about a task's clean label: "all" (the label itself), None (nothing), or a
function of the scene (image) or the query (text) whose value is a sufficient statistic for the label."""


@dataclass(frozen=True)
class Task:
    """One label column (or a matching task) and what each modality alone determines about it."""

    name: str
    type: str  # classification, multilabel, regression or matching
    label: Callable[[Any, Any], Any] | None = None  # clean label from (scene, query); None for a matching task
    image: View = None
    text: View = None
    classes: tuple = ()  # classification and multilabel: every possible value
    column: str | None = None  # matching: the boolean column of true pairs (None: every row is a true pair)
    key: Callable[[Any, Any], Hashable] | None = None  # matching: what a true pair's image and text both determine
    noise: float = 0.0  # classification: chance that the label is replaced by another class; regression: noise sd
    missing: float = 0.0  # chance that the label is null

    @property
    def needs(self) -> str:
        """ "image" or "text" when that modality alone determines the label, else "both"."""
        if self.type != "matching" and self.image == "all":
            return "image"
        if self.type != "matching" and self.text == "all":
            return "text"
        return "both"

    def spec(self) -> dict:
        """The task as a mmfusion TaskSpec mapping (tasks.yaml)."""
        spec = {"name": self.name, "type": self.type}
        if self.type != "matching":
            spec["column"] = self.name
        elif self.column is not None:
            spec["column"] = self.column
        return spec

    def observe(self, value: Any, rng: np.random.Generator) -> Any:
        """The written label: the clean value, possibly replaced (noise) or null (missing)."""
        noisy, missing, draw = rng.random(3)
        shift = rng.standard_normal()
        if missing < self.missing:
            return None
        if self.type == "regression":
            return round(float(value) + self.noise * float(shift), 4)
        if self.type == "classification" and noisy < self.noise:
            others = [c for c in self.classes if c != value]
            return others[int(draw * len(others))]
        return value


@dataclass
class Row:
    """One generated row: its latents, its metadata.jsonl record and (unless skipped) its image."""

    scene: Any
    query: Any
    record: dict
    image: Image.Image | None


@dataclass(frozen=True)
class SetSpec:
    """A registered suite set: its generator module, seed and version (bump it when the output changes)."""

    module: ModuleType
    seed: int
    version: int = 1
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.module.NAME)

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.module.TASKS

    @property
    def text_column(self) -> str:
        return self.module.TEXT_COLUMN

    @property
    def image_size(self) -> int:
        return self.module.IMAGE_SIZE

    def sizes(self, scale: float = 1.0) -> dict[str, int]:
        """Rows per split at `scale` (at least 4 each)."""
        return {split: max(4, round(size * scale)) for split, size in self.module.SIZES.items()}

    def make_row(self, split: str, index: int, render: bool = True) -> Row:
        """Row `index` of `split`; with render=False the image is not drawn (labels and text are the same)."""
        rngs = [np.random.default_rng([self.seed, SPLITS.index(split), index, stream]) for stream in range(5)]
        scene = self.module.sample_scene(rngs[SCENE])
        query = self.module.sample_query(scene, rngs[QUERY])
        record = {"file_name": f"{index:05d}.png", self.text_column: self.module.caption(query, rngs[TEXT])}
        for task in self.tasks:
            if task.label is not None:
                record[task.name] = task.observe(task.label(scene, query), rngs[LABELS])
        image = self.module.render(scene, rngs[IMAGE]) if render else None
        return Row(scene, query, record, image)

    def latents(self, count: int, seed: int) -> list[tuple[Any, Any]]:
        """`count` (scene, query) draws from one generator: a Monte Carlo sample of the set's distribution."""
        rng = np.random.default_rng([self.seed, seed])
        pairs = []
        for _ in range(count):
            scene = self.module.sample_scene(rng)
            pairs.append((scene, self.module.sample_query(scene, rng)))
        return pairs


def pick(rng: np.random.Generator, options, p=None):
    """One element of `options` (uniformly, or with probabilities `p`), as a plain Python value."""
    return options[int(rng.choice(len(options), p=p))]


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def number(value: int, rng: np.random.Generator, as_word: float = 0.5) -> str:
    """`value` written as a digit or (with chance `as_word`) as an English word."""
    return NUMBER_WORDS[value] if rng.random() < as_word else str(value)
