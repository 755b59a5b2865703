"""Drawing helpers shared by the suite's sets: palette, shapes, backgrounds, noise, placement and fonts."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = {
    "red": (225, 35, 35),
    "green": (35, 185, 60),
    "blue": (45, 95, 245),
    "yellow": (245, 215, 30),
    "magenta": (220, 50, 210),
    "cyan": (30, 210, 225),
    "orange": (250, 135, 25),
    "white": (245, 245, 245),
}
POLYGONS = {  # shape -> radii of its vertices, as fractions of the circumradius, evenly spaced in angle
    "square": (1.0,) * 4,
    "triangle": (1.0,) * 3,
    "pentagon": (1.0,) * 5,
    "hexagon": (1.0,) * 6,
    "diamond": (1.0, 0.55) * 2,
    "star": (1.0, 0.45) * 5,
}
CROSS = ((-1, -3), (1, -3), (1, -1), (3, -1), (3, 1), (1, 1), (1, 3), (-1, 3), (-1, 1), (-3, 1), (-3, -1), (-1, -1))
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", str(Path.home() / ".fonts"))
FONT_PREFERENCE = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
)
DEFAULT_FONT = "Pillow's built-in default font (ImageFont.load_default)"


def outline(shape: str, x: float, y: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape (or a cross) centred at (x, y) with circumradius r, rotated by angle."""
    if shape == "cross":
        points = np.array(CROSS, dtype=float) * r / np.hypot(1, 3)
    else:
        radii = np.array(POLYGONS[shape]) * r
        steps = np.arange(len(radii)) * 2 * np.pi / len(radii)
        points = np.stack([radii * np.sin(steps), -radii * np.cos(steps)], axis=1)
    cos, sin = np.cos(angle), np.sin(angle)
    rotated = points @ np.array([[cos, sin], [-sin, cos]])
    return [(x + px, y + py) for px, py in rotated]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill, angle: float = 0.0, line=None, width=1
) -> None:
    """Draw a circle or a polygonal shape, filled with `fill` (None: outline only) and outlined with `line`."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=line, width=width)
    else:
        draw.polygon(outline(shape, x, y, r, angle), fill=fill, outline=line, width=width)


def shape_mask(size: int, shape: str, x: float, y: float, r: float, angle: float = 0.0) -> np.ndarray:
    """Boolean (size, size) mask of a filled shape."""
    mask = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(mask), shape, x, y, r, 255, angle)
    return np.asarray(mask) > 0


def smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [-1, 1], shape (size, size, channels): a cells x cells random grid, upsampled."""
    grid = rng.integers(0, 256, size=(cells, cells, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    image = Image.fromarray(grid if channels == 3 else grid[..., 0], mode).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    return np.asarray(image, dtype=np.float32).reshape(size, size, channels) / 127.5 - 1.0


def with_noise(pixels: np.ndarray, rng: np.random.Generator, sigma: float) -> Image.Image:
    """`pixels` (float, 0-255) plus Gaussian noise of standard deviation `sigma`, as an 8-bit RGB image."""
    noisy = pixels + rng.normal(0.0, sigma, size=pixels.shape) if sigma else pixels
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def scatter(rng: np.random.Generator, count: int, size: int, margin: int, gap: float) -> list[tuple[int, int]]:
    """`count` integer points inside `margin` of the border, pairwise at least `gap` apart (rejection sampling)."""
    while True:
        points: list[tuple[int, int]] = []
        for _ in range(200):
            x, y = (int(v) for v in rng.integers(margin, size - margin, size=2))
            if all((x - px) ** 2 + (y - py) ** 2 >= gap**2 for px, py in points):
                points.append((x, y))
                if len(points) == count:
                    return points


@functools.cache
def font_files() -> tuple[Path, ...]:
    """TrueType fonts on this machine: the DejaVu families when present, else the first six found (sorted)."""
    found = {}
    for root in FONT_DIRS:
        if Path(root).is_dir():
            found.update({path.name: path for path in sorted(Path(root).rglob("*.ttf"))})
    preferred = [found[name] for name in FONT_PREFERENCE if name in found]
    return tuple(preferred or sorted(found.values())[:6])


def font_names() -> list[str]:
    """What the glyphs are drawn with, as recorded beside the generated data."""
    return [path.name for path in font_files()] or [DEFAULT_FONT]


@functools.cache
def load_font(index: int, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Font number `index` of `font_files()` at `size` px, or Pillow's default font when none is installed."""
    files = font_files()
    if not files:
        return ImageFont.load_default(size)
    return ImageFont.truetype(str(files[index % len(files)]), size)
