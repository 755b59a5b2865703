"""Generate the small, procedurally drawn image-text sample dataset in ``data/sample``.

Every row is a 64x64 RGB PNG of a few coloured shapes on a (possibly textured) background, plus an English
caption and five label columns (see ``data/README.md``). The output uses the Hugging Face ``imagefolder``
layout, so ``datasets.load_dataset("imagefolder", data_dir=...)`` yields train/validation/test splits.

Each row is drawn from its own random generator seeded with ``(seed, split, index)``, so any row can be
regenerated on its own and two runs with the same arguments write byte-identical files.

Usage::

    python data/make_sample.py [--out data/sample] [--seed 0] [--train 3000 --validation 500 --test 500]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 3000, "validation": 500, "test": 500}
DEFAULT_OUT = Path(__file__).resolve().parent / "sample"

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (150, 70, 210),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")
RADII = {"small": 5, "large": 8}  # circumradius in pixels
POSITIONS = ("left", "right", "top", "bottom", "center")
ANCHORS = {"left": (10, 32), "right": (54, 32), "top": (32, 10), "bottom": (32, 54), "center": (32, 32)}
PAIR_OFFSET = 9  # distance of each object of a pair from the group anchor
MAX_JITTER = 3  # the whole group is shifted by up to this many pixels per axis
BACKGROUNDS = ("plain", "stripes", "dots")
BACKGROUND_BASES = ((25, 30, 70), (25, 60, 35), (70, 25, 30), (45, 45, 50), (20, 60, 65), (55, 30, 70))
TEXTURE_LIFT = 45  # the texture colour is the base colour lifted by this much
TONES = ("positive", "neutral", "negative")
PERTURBABLE = ("color", "shape", "count", "position")
# False captions differ in colour only by default: that comparison a small model learns within the 3-minute CPU
# budget of the default training run; --mismatch adds shape, count and position for a harder task.
DEFAULT_MISMATCH = ("color",)
NULLABLE_COLUMNS = ("background", "tone", "area", "colors")
NULL_RATE = 0.15

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {
    "left": ("on the left", "on the left side", "to the left"),
    "right": ("on the right", "on the right side", "to the right"),
    "top": ("at the top", "near the top", "along the top"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom"),
    "center": ("in the center", "in the middle"),
}
SINGLE_TEMPLATES = {True: ("{g1} {p1}", "{g1} placed {p1}"), False: ("{g1}",)}
PAIR_TEMPLATES = {
    True: ("{g1} {p1} and {g2} {p2}", "{g1} {p1}, {g2} {p2}", "{g1} {p1} with {g2} {p2}", "{g1} {p1} beside {g2} {p2}"),
    False: ("{g1} and {g2}", "{g1} together with {g2}", "{g1} plus {g2}"),
}
TONE_FRAMES = {
    "positive": (
        "What a lovely picture of {b}!",
        "A beautiful scene with {b}.",
        "{B}, how delightful!",
        "I love this: {b}.",
        "Such a charming image of {b}!",
    ),
    "neutral": ("{B}.", "A picture of {b}.", "This image shows {b}.", "The scene contains {b}.", "Here we see {b}."),
    "negative": (
        "An ugly picture of {b}.",
        "Sadly, just {b}.",
        "{B}, how boring.",
        "What a dull image of {b}.",
        "I dislike this: {b}.",
    ),
}


@dataclass(frozen=True)
class Group:
    """One or two identical objects described together, e.g. "two large red circles on the left"."""

    count: int
    color: str
    shape: str
    size: str
    position: str


Scene = tuple[Group, ...]


@dataclass(frozen=True)
class Style:
    """Caption choices made before any attribute is changed, so both scenes of a pair share them."""

    mention_size: bool
    mention_position: bool
    tone: str


@dataclass(frozen=True)
class Background:
    """A flat base colour, optionally overlaid with stripes or dots in a lighter shade."""

    kind: str
    base: tuple[int, int, int]
    period: int
    phase: int
    direction: int  # stripes: 0 horizontal, 1 vertical, 2 and 3 diagonal


@dataclass(frozen=True)
class Example:
    """A generated row: the scene the caption describes, the scene the image shows, the image and its labels."""

    caption_scene: Scene
    image_scene: Scene
    image: Image.Image
    row: dict


def pick(rng: np.random.Generator, options):
    """Return one element of ``options``, chosen uniformly."""
    return options[int(rng.integers(len(options)))]


def row_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator that owns row ``index`` of ``split``."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def is_valid(scene: Scene) -> bool:
    """Groups must sit at distinct positions and differ in colour or shape, so captions stay unambiguous."""
    positions = {group.position for group in scene}
    kinds = {(group.color, group.shape) for group in scene}
    return len(positions) == len(scene) and len(kinds) == len(scene)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw 1-2 groups of 1-2 objects each: 1-4 objects in total."""
    while True:
        scene = tuple(
            Group(
                count=1 + int(rng.integers(2)),
                color=pick(rng, tuple(COLORS)),
                shape=pick(rng, SHAPES),
                size=pick(rng, tuple(RADII)),
                position=pick(rng, POSITIONS),
            )
            for _ in range(1 + int(rng.integers(2)))
        )
        if is_valid(scene):
            return scene


def sample_style(rng: np.random.Generator) -> Style:
    """Draw which attributes the caption mentions and in which voice it is written."""
    return Style(
        mention_size=bool(rng.random() < 0.5), mention_position=bool(rng.random() < 0.7), tone=pick(rng, TONES)
    )


def perturb(scene: Scene, style: Style, rng: np.random.Generator, mismatch=DEFAULT_MISMATCH) -> Scene:
    """Change exactly one caption-visible attribute (one of `mismatch`: colour, shape, count, position) of one
    group; a position change only when the caption mentions positions."""
    attributes = [a for a in mismatch if a != "position" or style.mention_position] or ["color"]
    attribute = pick(rng, attributes)
    while True:
        index = int(rng.integers(len(scene)))
        group = scene[index]
        if attribute == "count":
            changed = replace(group, count=3 - group.count)
        elif attribute == "color":
            changed = replace(group, color=pick(rng, [c for c in COLORS if c != group.color]))
        elif attribute == "shape":
            changed = replace(group, shape=pick(rng, [s for s in SHAPES if s != group.shape]))
        else:
            changed = replace(group, position=pick(rng, [p for p in POSITIONS if p != group.position]))
        candidate = scene[:index] + (changed,) + scene[index + 1 :]
        if is_valid(candidate):
            return candidate


def sample_background(rng: np.random.Generator) -> Background:
    """Draw the background texture (the image-only label) and its colour."""
    base = np.clip(np.array(pick(rng, BACKGROUND_BASES)) + rng.integers(-10, 11, size=3), 0, 255)
    return Background(
        kind=pick(rng, BACKGROUNDS),
        base=tuple(int(v) for v in base),
        period=int(rng.integers(4, 9)),
        phase=int(rng.integers(8)),
        direction=int(rng.integers(4)),
    )


def background_pixels(background: Background) -> np.ndarray:
    """Render the background as an ``(H, W, 3)`` uint8 array."""
    y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    if background.kind == "stripes":
        t = (y, x, x + y, x - y + IMAGE_SIZE)[background.direction]
        texture = (t + background.phase) % background.period < background.period // 2
    elif background.kind == "dots":
        texture = ((x + background.phase) % background.period < 2) & ((y + background.phase) % background.period < 2)
    else:
        texture = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    base = np.array(background.base, dtype=np.int16)
    colors = np.stack([base, np.clip(base + TEXTURE_LIFT, 0, 255)]).astype(np.uint8)
    return colors[texture.astype(int)]


def group_offsets(scene: Scene, group: Group) -> list[tuple[int, int]]:
    """Object offsets from the group anchor: pairs stack vertically on the left/right, otherwise side by side."""
    if group.count == 1:
        return [(0, 0)]
    others = {g.position for g in scene if g is not group}
    vertical = group.position in ("left", "right") or (group.position == "center" and others & {"left", "right"})
    return [(0, -PAIR_OFFSET), (0, PAIR_OFFSET)] if vertical else [(-PAIR_OFFSET, 0), (PAIR_OFFSET, 0)]


def place_objects(scene: Scene, shifts: list[tuple[int, int]]) -> list[tuple[int, int, int, Group]]:
    """Object centres and radii, as ``(x, y, radius, group)``, with each group moved by its shift."""
    placed = []
    for group, (dx, dy) in zip(scene, shifts):
        ax, ay = ANCHORS[group.position]
        placed += [(ax + ox + dx, ay + oy + dy, RADII[group.size], group) for ox, oy in group_offsets(scene, group)]
    return placed


def fits(placed: list[tuple[int, int, int, Group]]) -> bool:
    """True if every object lies inside the image and no two objects' circumcircles touch."""
    inside = all(r <= x <= IMAGE_SIZE - 1 - r and r <= y <= IMAGE_SIZE - 1 - r for x, y, r, _ in placed)
    apart = all(
        (x1 - x2) ** 2 + (y1 - y2) ** 2 >= (r1 + r2 + 1) ** 2
        for i, (x1, y1, r1, _) in enumerate(placed)
        for x2, y2, r2, _ in placed[i + 1 :]
    )
    return inside and apart


def layout(scene: Scene, rng: np.random.Generator) -> list[tuple[int, int, int, Group]]:
    """Jitter every group a little; fall back to the unshifted layout, which always fits."""
    for _ in range(20):
        placed = place_objects(scene, [tuple(rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2)) for _ in scene])
        if fits(placed):
            return placed
    return place_objects(scene, [(0, 0)] * len(scene))


def shape_outline(shape: str, x: int, y: int, radius: int, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a square, triangle or five-pointed star inscribed in the given circle."""
    if shape == "star":
        radii = [radius if k % 2 == 0 else 0.45 * radius for k in range(10)]
    else:
        radii = [radius] * (4 if shape == "square" else 3)
    steps = np.arange(len(radii)) * 2 * np.pi / len(radii) + angle
    return [(x + r * np.sin(t), y - r * np.cos(t)) for r, t in zip(radii, steps)]


def draw_image(scene: Scene, background: Background, rng: np.random.Generator) -> tuple[Image.Image, float]:
    """Draw the scene; return the image and the fraction of pixels covered by objects."""
    image = Image.fromarray(background_pixels(background), mode="RGB")
    mask = Image.new("L", image.size, 0)
    placed = layout(scene, rng)
    angles = rng.uniform(0, 2 * np.pi, size=len(placed))
    for canvas, fill in ((ImageDraw.Draw(image), None), (ImageDraw.Draw(mask), 255)):
        for (x, y, radius, group), angle in zip(placed, angles):
            colour = COLORS[group.color] if fill is None else fill
            if group.shape == "circle":
                canvas.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
            else:
                canvas.polygon(shape_outline(group.shape, x, y, radius, float(angle)), fill=colour)
    area = round(np.count_nonzero(np.asarray(mask)) / mask.width / mask.height, 4)
    return image, area


def with_article(phrase: str) -> str:
    """Prefix ``phrase`` with "a" or "an"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe_group(group: Group, style: Style, rng: np.random.Generator) -> str:
    """E.g. "two big red circles" or "an orange star"."""
    words = [pick(rng, SIZE_WORDS[group.size])] if style.mention_size else []
    noun = " ".join(words + [group.color, group.shape + ("s" if group.count == 2 else "")])
    if group.count == 2:
        return pick(rng, ("two", "a pair of")) + " " + noun
    return with_article(noun) if rng.random() < 0.75 else "one " + noun


def render_caption(scene: Scene, style: Style, rng: np.random.Generator) -> str:
    """Write the scene as a sentence in one of several templates, framed in the style's tone."""
    slots = {}
    for k, group in enumerate(scene, start=1):
        slots[f"g{k}"] = describe_group(group, style, rng)
        slots[f"p{k}"] = pick(rng, POSITION_WORDS[group.position])
    templates = (SINGLE_TEMPLATES if len(scene) == 1 else PAIR_TEMPLATES)[style.mention_position]
    body = pick(rng, templates).format(**slots)
    return pick(rng, TONE_FRAMES[style.tone]).format(b=body, B=body[0].upper() + body[1:])


def make_example(seed: int, split: str, index: int, mismatch=DEFAULT_MISMATCH) -> Example:
    """Generate row ``index`` of ``split``.

    A scene and a copy with one attribute changed form an unordered pair; the caption always describes one
    member and the image shows the same member (``match``) or the other one. Both members have the same
    distribution, so neither the caption nor the image alone says anything about ``match``.
    """
    rng = row_rng(seed, split, index)
    match = bool(rng.random() < 0.5)
    style = sample_style(rng)
    first = sample_scene(rng)
    second = perturb(first, style, rng, mismatch)
    if rng.random() < 0.5:
        first, second = second, first
    image_scene = first if match else second
    background = sample_background(rng)
    image, area = draw_image(image_scene, background, rng)
    labels = {
        "background": background.kind,
        "tone": style.tone,
        "area": area,
        "colors": sorted({group.color for group in image_scene}),
    }
    missing = {column for column in NULLABLE_COLUMNS if rng.random() < NULL_RATE}
    row = {"file_name": f"{index:05d}.png", "caption": render_caption(first, style, rng), "match": match}
    row.update({column: None if column in missing else value for column, value in labels.items()})
    return Example(caption_scene=first, image_scene=image_scene, image=image, row=row)


def png_bytes(image: Image.Image) -> bytes:
    """Encode ``image`` as an optimised PNG (no timestamps or other varying metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def metadata_line(row: dict) -> str:
    """One ``metadata.jsonl`` line with sorted keys."""
    return json.dumps(row, sort_keys=True) + "\n"


def write_split(out: Path, split: str, size: int, seed: int, mismatch=DEFAULT_MISMATCH) -> None:
    """Write ``size`` rows of ``split`` under ``out/split``, replacing any earlier PNGs and metadata there."""
    directory = out / split
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.png"):
        stale.unlink()
    lines = []
    for index in range(size):
        example = make_example(seed, split, index, mismatch)
        (directory / example.row["file_name"]).write_bytes(png_bytes(example.image))
        lines.append(metadata_line(example.row))
    (directory / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: data/sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_SIZES[split], help=f"rows in the {split} split")
    parser.add_argument(
        "--mismatch",
        nargs="+",
        choices=PERTURBABLE,
        default=list(DEFAULT_MISMATCH),
        help="attributes a false caption may get wrong (default: color)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Generate every split."""
    args = parse_args(argv)
    start = time.perf_counter()
    for split in SPLITS:
        write_split(args.out, split, getattr(args, split), args.seed, tuple(args.mismatch))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
