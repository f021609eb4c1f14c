"""A procedurally generated camera-trap dataset: the built-in demo and the retrieval-quality benchmark.

Why generated: the app must open on something without a download, and the benchmark needs ground truth for two
independent questions -- "are the hits the same species?" (query an animal's box) and "are the hits from the same
camera?" (query a background patch). So every frame is one of several visually distinct species (shape, pattern
and colour differ) or empty, placed at random on the fixed background of one of twelve camera locations. Species
and location are drawn independently, so every location shows every species. Locations 0-6 are the "in" domain;
7-11 are "out" of domain and shifted the way real camera traps shift: grayscale night infrared, a dark blue dusk
cast, heavy foreground foliage and an amber cast.

Every random choice comes from ``numpy.random.default_rng([seed, stream, index])`` (see the ``_*_STREAM``
constants), so a frame's pixels depend only on (seed, index, size): not on generation order, process or cache
state. That is what lets DataLoader workers render frames by index. Metadata (`demo_frames`) and pixels
(`render_demo_image`) share `_assignment` and `_pose`, so the stored bounding box is the box the animal is drawn
in. Backgrounds are drawn once per (seed, location, size) and cached; a frame then costs a couple of milliseconds.

As a source (`--source demo`), `list_items` lists the frames' metadata only; the builder's workers render each
frame by index (`open_item` in the package).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from cache_builder.errors import BuildError
from cache_builder.sources.base import Source, SourceItem, SourceOptions

DEFAULT_DEMO_SIZE = 1500
DEFAULT_DEMO_SEED = 0

SPECIES: tuple[str, ...] = ("tiger", "leopard", "elephant", "hedgehog", "bluebird", "snake", "flamingo")
EMPTY = "empty"
LOCATIONS: tuple[str, ...] = tuple(f"loc{i:02d}" for i in range(12))
IN_DOMAIN_LOCATIONS: frozenset[str] = frozenset(LOCATIONS[:7])

# Random streams: each random choice reads default_rng([seed, stream, n]) for its own stream.
_SPLIT_STREAM, _POSE_STREAM, _PIXEL_STREAM, _PATTERN_STREAM = 0, 1, 2, 3
_LOCATION_BLOCK_STREAM, _SPECIES_BLOCK_STREAM, _LAYOUT_STREAM, _TEXTURE_STREAM = 4, 5, 6, 7

# Locations are dealt in shuffled blocks of 12 (one frame each); species in shuffled blocks of 41 frames holding
# 5 of each species and 6 empty frames (14.6 %). Both stay balanced for any n and a frame's draw ignores n.
_EMPTY_PER_BLOCK, _ANIMALS_PER_SPECIES_PER_BLOCK = 6, 5
_SPECIES_BLOCK = (EMPTY,) * _EMPTY_PER_BLOCK + tuple(
    s for s in SPECIES for _ in range(_ANIMALS_PER_SPECIES_PER_BLOCK)
)
_TRAIN_SHARE = 0.8


@dataclass(frozen=True)
class DemoFrame:
    """One frame of the demo: its index and metadata (see `demo_frames` for the keys)."""

    index: int
    metadata: dict


def demo_frames(n: int = DEFAULT_DEMO_SIZE, seed: int = DEFAULT_DEMO_SEED, size: int = 224) -> list[DemoFrame]:
    """Metadata of frames 0..n-1, without pixels.

    Keys: ``location`` ("loc00".."loc11"), ``domain`` ("in"/"out"), ``species`` (a name of `SPECIES` or
    "empty"), ``split`` ("train"/"val" for in-domain frames, ~80/20; "test" out of domain), ``time_of_day``
    ("night" at the infrared locations, else "day"), ``bbox_x0, bbox_y0, bbox_x1, bbox_y1`` (the animal's box in
    pixels of a ``size`` image, PIL convention: x1/y1 exclusive, so ``image.crop(box)`` is the animal; None when
    empty) and ``frame`` (= index). Frame i is the same whatever n is.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [DemoFrame(index=i, metadata=_metadata(i, seed, size)) for i in range(n)]


def render_demo_image(frame: DemoFrame, seed: int = DEFAULT_DEMO_SEED, size: int = 224) -> Image.Image:
    """The RGB ``size`` x ``size`` image of a frame; pass the seed and size its metadata was made with.

    Pixels depend only on (frame.index, seed, size); the metadata dict is not read.
    """
    return _render(frame.index, seed, size)


def list_items(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    """`demo`: `--demo-size` frames (default `DEFAULT_DEMO_SIZE`) of seed `options.demo_seed`; no argument."""
    if arg:
        raise BuildError(f"the demo source takes no argument (got 'demo:{arg}')")
    n = options.demo_size or DEFAULT_DEMO_SIZE
    source.demo_seed = options.demo_seed
    source.label_column = "species"
    source.frame = "crop"  # the demo's frames are square
    return [
        SourceItem(
            path=f"demo/{f.metadata['location']}/{f.index:05d}.png",
            metadata=dict(f.metadata),
            demo_index=f.index,
        )
        for f in demo_frames(n, seed=options.demo_seed)
    ]


# --- assignment and pose: shared by metadata and rendering ------------------------------------------------------


@lru_cache(maxsize=256)
def _block_permutation(seed: int, stream: int, block: int, length: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([seed, stream, block]).permutation(length).tolist())


def _assignment(index: int, seed: int) -> tuple[int, str]:
    """(location number, species or "empty") of a frame."""
    location = _block_permutation(seed, _LOCATION_BLOCK_STREAM, index // len(LOCATIONS), len(LOCATIONS))
    species = _block_permutation(seed, _SPECIES_BLOCK_STREAM, index // len(_SPECIES_BLOCK), len(_SPECIES_BLOCK))
    return location[index % len(LOCATIONS)], _SPECIES_BLOCK[species[index % len(_SPECIES_BLOCK)]]


@dataclass(frozen=True)
class _Pose:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, x1/y1 exclusive
    flip: bool  # facing left instead of right
    tint: tuple[float, float, float]  # per-channel colour jitter


def _pose(index: int, seed: int, species: str, size: int) -> _Pose:
    """Where and how the animal of a frame is drawn: scale, position, facing and colour jitter."""
    spec = _SPECIES_SPECS[species]
    rng = np.random.default_rng([seed, _POSE_STREAM, index])
    width = rng.uniform(*spec.width) * size
    aspect = spec.aspect * rng.uniform(0.92, 1.08)
    w = max(8, round(min(width, size - 2, (size - 2) * aspect)))
    h = max(8, round(w / aspect))
    x0 = int(rng.integers(1, size - w))
    if spec.flies:
        y0 = int(rng.integers(1, size - h))
    else:  # feet on the ground in the lower part of the frame
        y0 = int(np.clip(round(rng.uniform(0.62, 0.98) * size) - h, 1, size - 1 - h))
    flip = bool(rng.random() < 0.5)
    tint = tuple((rng.uniform(0.88, 1.08) * rng.normal(1.0, 0.05, 3)).tolist())
    return _Pose(box=(x0, y0, x0 + w, y0 + h), flip=flip, tint=tint)


def _metadata(index: int, seed: int, size: int) -> dict:
    location, species = _assignment(index, seed)
    name = LOCATIONS[location]
    domain = "in" if name in IN_DOMAIN_LOCATIONS else "out"
    if domain == "in":
        split = "train" if np.random.default_rng([seed, _SPLIT_STREAM, index]).random() < _TRAIN_SHARE else "val"
    else:
        split = "test"
    box: tuple[int | None, ...] = (None,) * 4
    if species != EMPTY:
        box = _pose(index, seed, species, size).box
    return {
        "location": name,
        "domain": domain,
        "species": species,
        "split": split,
        "time_of_day": "night" if _LOCATION_SPECS[location][1] == "infrared" else "day",
        "bbox_x0": box[0],
        "bbox_y0": box[1],
        "bbox_x1": box[2],
        "bbox_y1": box[3],
        "frame": index,
    }


# --- rendering -------------------------------------------------------------------------------------------------


def _render(index: int, seed: int, size: int, draw_animal: bool = True) -> Image.Image:
    """One frame; with ``draw_animal=False`` the identical frame without its animal (used by the tests)."""
    location, species = _assignment(index, seed)
    shift = _LOCATION_SPECS[location][1]
    rng = np.random.default_rng([seed, _PIXEL_STREAM, index])
    background = _location_background(seed, location, size)
    margin = (background.shape[0] - size) // 2
    ox, oy = rng.integers(0, 2 * margin + 1, 2)  # the camera shakes a little
    image = Image.fromarray(background[oy : oy + size, ox : ox + size])

    eyes: list[tuple[float, float, float]] = []
    if draw_animal and species != EMPTY:
        pose = _pose(index, seed, species, size)
        flash = 1.4 if shift == "infrared" else 1.0  # the IR flash lights the near animal more than the scene
        pattern_rng = np.random.default_rng([seed, _PATTERN_STREAM, index])
        eyes = _draw_animal(image, species, pose, pattern_rng, flash)
    if shift == "clutter":
        _draw_foliage(image, rng, size)

    noise, light = _frame_textures(seed, size)
    tx, ty, lx, ly = rng.integers(0, size, 4)
    pixels = np.asarray(image, dtype=np.float32)
    pixels *= light[ly : ly + size, lx : lx + size, None]  # passing clouds, dappled light
    pixels *= np.float32(rng.uniform(0.85, 1.1)) * rng.normal(1.0, 0.02, 3).astype(np.float32)
    noise = noise[ty : ty + size, tx : tx + size]
    if shift == "infrared":
        gray = pixels @ np.array([0.3, 0.59, 0.11], dtype=np.float32)
        gray = 55 + 0.5 * gray + 9 * noise[..., 0]
        gray = np.clip(gray, 0, 255).astype(np.uint8)
        image = Image.fromarray(gray).convert("RGB")
        draw = ImageDraw.Draw(image)
        for x, y, r in eyes:  # eye shine: the IR flash reflects off the retina
            r = max(1.5, 1.3 * r)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255))
        return image
    if shift == "dusk":
        pixels *= np.array([0.32, 0.4, 0.72], dtype=np.float32)
        pixels += np.array([4, 8, 22], dtype=np.float32) + 7 * noise
    elif shift == "amber":
        pixels = pixels * np.array([0.85, 0.58, 0.3], dtype=np.float32) + np.array([70, 42, 12], dtype=np.float32)
        pixels += 3 * noise
    else:
        pixels += 3 * noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@lru_cache(maxsize=4)
def _frame_textures(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A (2 size)^2 sensor-noise tile and light-field tile; frames read size^2 windows at random offsets."""
    rng = np.random.default_rng([seed, _TEXTURE_STREAM, size])
    noise = rng.standard_normal((2 * size, 2 * size, 3), dtype=np.float32)
    light = 1 + 0.1 * _smooth_noise(rng, 2 * size, 10)
    return noise, light.astype(np.float32)


def _draw_foliage(image: Image.Image, rng: np.random.Generator, size: int) -> None:
    """Leaves and twigs right in front of the lens, different in every frame."""
    draw = ImageDraw.Draw(image)
    count = 34
    centres = rng.uniform(0, size, (count, 2))
    lengths = rng.uniform(0.05, 0.14, count) * size
    angles = rng.uniform(0, np.pi, count)
    greens = rng.integers(0, len(_LEAF_COLOURS), count)
    for (cx, cy), length, angle, colour in zip(centres, lengths, angles, greens):
        draw.polygon(_leaf(cx, cy, length, 0.35 * length, angle), fill=_LEAF_COLOURS[colour])
    for _ in range(4):
        x, y = rng.uniform(0, size, 2)
        dx, dy = rng.normal(0, 0.3 * size, 2)
        draw.line((x, y, x + dx, y + dy), fill=(60, 45, 30), width=max(1, round(0.012 * size)))


_LEAF_COLOURS = ((40, 95, 35), (60, 125, 45), (85, 150, 60), (30, 70, 30), (110, 140, 50), (95, 80, 40))


def _leaf(cx: float, cy: float, length: float, width: float, angle: float) -> list[tuple[float, float]]:
    """Polygon of a pointed leaf centred on (cx, cy)."""
    t = np.linspace(-1, 1, 7)
    along = np.concatenate([t, t[::-1]]) * length / 2
    across = np.concatenate([1 - t**2, -(1 - t[::-1] ** 2)]) * width / 2
    c, s = np.cos(angle), np.sin(angle)
    return list(zip((cx + along * c - across * s).tolist(), (cy + along * s + across * c).tolist()))


# --- animals ---------------------------------------------------------------------------------------------------


class _Canvas:
    """A w x h crop holding one animal: a colour layer and a silhouette mask, drawn in unit coordinates.

    (0, 0) is the crop's top-left pixel and (1, 1) its bottom-right one; the animal faces right. Shapes add to the
    silhouette unless ``solid=False``: those only colour what lies inside it (stripes, spots).
    """

    def __init__(self, w: int, h: int, tint: tuple[float, float, float]):
        self.w, self.h = w, h
        self.colour = Image.new("RGB", (w, h))
        self.mask = Image.new("L", (w, h))
        self.eyes: list[tuple[float, float, float]] = []
        self._tint = tint
        self._colour_draw = ImageDraw.Draw(self.colour)
        self._mask_draw = ImageDraw.Draw(self.mask)

    def px(self, u: float, v: float) -> tuple[float, float]:
        return u * (self.w - 1), v * (self.h - 1)

    def _rgb(self, colour: tuple[int, int, int]) -> tuple[int, ...]:
        return tuple(min(255, max(0, int(c * t))) for c, t in zip(colour, self._tint))

    def _shape(self, kind: str, coords, colour, solid: bool, **kwargs) -> None:
        getattr(self._colour_draw, kind)(coords, fill=self._rgb(colour), **kwargs)
        if solid:
            getattr(self._mask_draw, kind)(coords, fill=255, **kwargs)

    def ellipse(self, u0: float, v0: float, u1: float, v1: float, colour, solid: bool = True) -> None:
        self._shape("ellipse", (*self.px(u0, v0), *self.px(u1, v1)), colour, solid)

    def polygon(self, points, colour, solid: bool = True) -> None:
        self._shape("polygon", [self.px(u, v) for u, v in points], colour, solid)

    def line(self, points, width: float, colour, solid: bool = True) -> None:
        """A polyline ``width`` (a fraction of the crop width) thick."""
        px = [self.px(u, v) for u, v in points]
        self._shape("line", px, colour, solid, width=max(1, round(width * self.w)), joint="curve")

    def eye(self, u: float, v: float, radius: float) -> None:
        """A dark eye of ``radius`` (a fraction of the crop width); remembered for the infrared eye shine."""
        x, y = self.px(u, v)
        r = max(1.0, radius * self.w)
        self._colour_draw.ellipse((x - r, y - r, x + r, y + r), fill=(15, 12, 10))
        self._colour_draw.point((x - r / 3, y - r / 3), fill=(250, 250, 250))
        self.eyes.append((x, y, r))


def _draw_animal(
    image: Image.Image, species: str, pose: _Pose, rng: np.random.Generator, gain: float
) -> list[tuple[float, float, float]]:
    """Paste the animal, its colours scaled by ``gain``, into its pose box; returns its eyes as (x, y, radius)."""
    x0, y0, x1, y1 = pose.box
    canvas = _Canvas(x1 - x0, y1 - y0, tuple(gain * t for t in pose.tint))
    _SPECIES_SPECS[species].draw(canvas, rng)
    colour, mask, eyes = canvas.colour, canvas.mask, canvas.eyes
    if pose.flip:
        colour = colour.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        eyes = [(canvas.w - 1 - x, y, r) for x, y, r in eyes]
    image.paste(colour, (x0, y0), mask)
    return [(x0 + x, y0 + y, r) for x, y, r in eyes]


def _quadruped_legs(c: _Canvas, xs, top: float, width: float, colour) -> None:
    for u in xs:
        c.line([(u, top), (u + 0.01, 1.0)], width, colour)


def _draw_tiger(c: _Canvas, rng: np.random.Generator) -> None:
    """Heavy orange cat with black stripes."""
    orange, cream, black = (235, 120, 30), (245, 225, 190), (25, 18, 12)
    c.line([(0.2, 0.35), (0.08, 0.32), (0.015, 0.1)], 0.05, orange)
    _quadruped_legs(c, (0.2, 0.32, 0.62, 0.73), 0.5, 0.075, orange)
    c.ellipse(0.12, 0.2, 0.82, 0.72, orange)
    c.ellipse(0.28, 0.5, 0.72, 0.72, cream)
    c.polygon([(0.75, 0.18), (0.78, 0.0), (0.85, 0.12)], orange)
    c.polygon([(0.87, 0.1), (0.91, 0.0), (0.96, 0.15)], orange)
    c.ellipse(0.72, 0.07, 1.0, 0.5, orange)
    for u in np.linspace(0.1, 0.95, 10) + rng.normal(0, 0.015, 10):
        slant, length = rng.normal(0, 0.03), rng.uniform(0.45, 0.7)
        c.polygon([(u - 0.022, 0.0), (u + 0.022, 0.0), (u + slant + 0.004, length)], black, solid=False)
    for v in (0.6, 0.72, 0.84):  # leg stripes
        c.line([(0.0, v), (1.0, v + 0.02)], 0.012, black, solid=False)
    c.ellipse(0.87, 0.27, 1.0, 0.47, cream)
    c.ellipse(0.955, 0.28, 1.0, 0.35, black)
    c.eye(0.86, 0.22, 0.022)


def _draw_leopard(c: _Canvas, rng: np.random.Generator) -> None:
    """Slender yellow cat with dark rosettes and a long curled tail."""
    yellow, cream, dark, inner = (228, 188, 85), (242, 228, 190), (40, 28, 15), (205, 140, 55)
    c.line([(0.17, 0.4), (0.07, 0.5), (0.018, 0.72), (0.06, 0.86), (0.12, 0.84)], 0.035, yellow)
    _quadruped_legs(c, (0.21, 0.31, 0.64, 0.73), 0.5, 0.05, yellow)
    c.ellipse(0.15, 0.28, 0.81, 0.62, yellow)
    c.ellipse(0.3, 0.47, 0.72, 0.62, cream)
    c.ellipse(0.8, 0.0, 0.86, 0.14, yellow)
    c.ellipse(0.89, 0.0, 0.95, 0.13, yellow)
    c.ellipse(0.77, 0.07, 1.0, 0.42, yellow)
    centres = rng.uniform((0.0, 0.0), (1.0, 0.95), (60, 2))
    radii = rng.uniform(0.014, 0.026, 60)
    for (u, v), r in zip(centres, radii):
        rv = r * c.w / c.h
        c.ellipse(u - r, v - rv, u + r, v + rv, dark, solid=False)
        c.ellipse(u - r / 2, v - rv / 2, u + r / 2, v + rv / 2, inner, solid=False)
    c.ellipse(0.955, 0.24, 1.0, 0.31, dark)
    c.eye(0.88, 0.18, 0.018)


def _draw_elephant(c: _Canvas, rng: np.random.Generator) -> None:
    """Big wrinkled grey body, fan ear, trunk, tusk, pillar legs."""
    grey, ear, wrinkle, ivory = (142, 140, 136), (112, 108, 106), (118, 116, 112), (245, 240, 222)
    c.line([(0.04, 0.3), (0.0, 0.58)], 0.025, grey)
    _quadruped_legs(c, (0.17, 0.36, 0.55, 0.7), 0.55, 0.13, grey)
    c.ellipse(0.02, 0.08, 0.8, 0.76, grey)
    c.ellipse(0.62, 0.0, 0.92, 0.5, grey)
    c.line([(0.86, 0.32), (0.93, 0.55), (0.955, 0.75), (0.98, 0.86)], 0.07, grey)
    for v in np.arange(0.15, 1.0, 0.11) + rng.uniform(0, 0.11):  # skin wrinkles
        c.line([(0.0, v), (0.5, v + 0.04), (1.0, v)], 0.008, wrinkle, solid=False)
    c.ellipse(0.58, 0.08, 0.8, 0.58, ear)
    c.polygon([(0.83, 0.38), (0.96, 0.5), (0.85, 0.46)], ivory)
    c.eye(0.8, 0.22, 0.014)


def _draw_hedgehog(c: _Canvas, rng: np.random.Generator) -> None:
    """Small brown dome of spines with a pale pointed snout."""
    brown, spine, tip, face = (125, 88, 55), (60, 40, 26), (215, 190, 150), (210, 175, 135)
    angles = np.linspace(np.pi, 0, 25)
    reach = np.where(np.arange(25) % 2 == 0, 1.0, 0.86)
    cu, cv, ru, rv = 0.43, 0.93, 0.43, 0.93
    outline = [(cu + ru * r * np.cos(a), cv - rv * r * np.sin(a)) for a, r in zip(angles, reach)]
    c.polygon([*outline, (0.82, 1.0), (0.05, 1.0)], brown)
    for a in angles[::2] + rng.normal(0, 0.04, 13):
        base = (cu + 0.45 * ru * np.cos(a), cv - 0.45 * rv * np.sin(a))
        end = (cu + 0.95 * ru * np.cos(a), cv - 0.95 * rv * np.sin(a))
        c.line([base, end], 0.03, spine, solid=False)
        c.line([end, (cu + ru * np.cos(a), cv - rv * np.sin(a))], 0.03, tip, solid=False)
    c.ellipse(0.15, 0.9, 0.28, 1.0, spine)
    c.ellipse(0.55, 0.9, 0.68, 1.0, spine)
    c.polygon([(0.68, 0.42), (1.0, 0.78), (0.96, 0.88), (0.7, 0.97)], face)
    c.ellipse(0.945, 0.74, 1.0, 0.86, spine)
    c.eye(0.82, 0.63, 0.025)


def _draw_bluebird(c: _Canvas, rng: np.random.Generator) -> None:
    """Blue bird with raised, white-barred wings, a white belly and an orange beak."""
    blue, wing, bar, belly, beak = (45, 95, 215), (25, 50, 145), (235, 240, 255), (240, 236, 226), (245, 160, 30)
    c.polygon([(0.42, 0.5), (0.58, 0.52), (0.47, 0.0), (0.37, 0.05)], wing)
    c.polygon([(0.31, 0.62), (0.38, 0.72), (0.16, 1.0), (0.07, 0.93)], wing)
    c.ellipse(0.27, 0.44, 0.78, 0.78, blue)
    c.ellipse(0.42, 0.6, 0.76, 0.78, belly)
    c.ellipse(0.67, 0.3, 0.9, 0.6, blue)
    near = ((0.3, 0.56), (0.56, 0.56), (0.06, 0.13), (0.0, 0.26))  # root front, root back, tip front, tip back
    c.polygon([near[0], near[1], near[2], near[3]], wing)
    for t in np.linspace(0.3, 0.8, 3) + rng.uniform(-0.04, 0.04):
        a = np.add(near[0], t * np.subtract(near[3], near[0]))
        b = np.add(near[1], t * np.subtract(near[2], near[1]))
        c.line([tuple(a), tuple(b)], 0.025, bar, solid=False)
    c.polygon([(0.87, 0.4), (1.0, 0.47), (0.87, 0.53)], beak)
    c.eye(0.8, 0.41, 0.02)


def _draw_snake(c: _Canvas, rng: np.random.Generator) -> None:
    """Long green body winding from a thin tail to a broad head, with pale bands and dark diamonds."""
    green, band, diamond = (65, 150, 50), (190, 205, 75), (20, 60, 25)
    w, h = c.w - 1, c.h - 1
    s = np.linspace(0, 1, 48)
    radius = 0.22 * h * (0.3 + 0.7 * np.minimum(s / 0.7, 1))
    x = radius[0] + s * (w - radius[0] - radius[-1] * 1.2)
    y = np.sin(2 * np.pi * 1.5 * s + rng.uniform(0, 2 * np.pi))
    lo, hi = np.argmin(y - radius / h), np.argmax(y + radius / h)  # fit the curve to the box height exactly
    scale = (h - radius[lo] - radius[hi]) / (y[hi] - y[lo])
    y = radius[lo] + (y - y[lo]) * scale
    for xi, yi, r in zip(x, y, radius):
        c.ellipse((xi - r) / w, (yi - r) / h, (xi + r) / w, (yi + r) / h, green)
    for i in range(2, 46, 4):
        dx, dy = x[i + 1] - x[i - 1], y[i + 1] - y[i - 1]
        n = np.hypot(dx, dy)
        r = radius[i]
        nx, ny = -dy / n * r, dx / n * r
        c.line([((x[i] + nx) / w, (y[i] + ny) / h), ((x[i] - nx) / w, (y[i] - ny) / h)], 0.012, band, solid=False)
        q = 0.45 * r
        j = i + 2
        diamond_points = [(x[j] - q, y[j]), (x[j], y[j] - q), (x[j] + q, y[j]), (x[j], y[j] + q)]
        c.polygon([(px / w, py / h) for px, py in diamond_points], diamond, solid=False)
    r = radius[-1] * 1.2
    hx, hy = w - r, y[-1]
    c.ellipse((hx - r) / w, (hy - 0.85 * r) / h, 1.0, (hy + 0.85 * r) / h, green)
    c.eye((hx + 0.3 * r) / w, (hy - 0.35 * r) / h, 0.22 * r / w)


def _draw_flamingo(c: _Canvas, rng: np.random.Generator) -> None:
    """Tall pink wader on one leg, S-shaped neck, black-tipped bent beak."""
    pink, wing, leg, black, pale = (242, 125, 160), (212, 80, 118), (215, 135, 150), (25, 22, 22), (235, 222, 210)
    c.line([(0.42, 0.55), (0.44, 0.77), (0.42, 1.0)], 0.05, leg)
    c.line([(0.5, 0.55), (0.64, 0.72), (0.47, 0.78)], 0.05, leg)
    c.ellipse(0.0, 0.37, 0.72, 0.6, pink)
    c.line([(0.62, 0.44), (0.78, 0.34), (0.72, 0.22), (0.6, 0.12), (0.68, 0.045), (0.8, 0.05)], 0.1, pink)
    c.ellipse(0.7, 0.0, 0.92, 0.1, pink)
    c.ellipse(0.1, 0.41, 0.6, 0.56, wing)
    for v in np.linspace(0.44, 0.53, 3) + rng.uniform(-0.01, 0.01):
        c.line([(0.14, v), (0.35, v + 0.015), (0.58, v)], 0.02, pink, solid=False)
    c.polygon([(0.0, 0.45), (0.14, 0.43), (0.1, 0.52)], black)
    c.polygon([(0.88, 0.03), (1.0, 0.075), (0.97, 0.16), (0.9, 0.1)], pale)
    c.polygon([(0.95, 0.055), (1.0, 0.075), (0.97, 0.16), (0.935, 0.115)], black)
    c.eye(0.8, 0.045, 0.035)


@dataclass(frozen=True)
class _SpeciesSpec:
    draw: Callable[[_Canvas, np.random.Generator], None]
    aspect: float  # box width / height
    width: tuple[float, float]  # range of box width, as a fraction of the image
    flies: bool = False


_SPECIES_SPECS: dict[str, _SpeciesSpec] = {
    "tiger": _SpeciesSpec(_draw_tiger, 1.75, (0.38, 0.62)),
    "leopard": _SpeciesSpec(_draw_leopard, 2.0, (0.4, 0.65)),
    "elephant": _SpeciesSpec(_draw_elephant, 1.3, (0.5, 0.8)),
    "hedgehog": _SpeciesSpec(_draw_hedgehog, 1.45, (0.2, 0.34)),
    "bluebird": _SpeciesSpec(_draw_bluebird, 1.6, (0.28, 0.48), flies=True),
    "snake": _SpeciesSpec(_draw_snake, 2.7, (0.45, 0.75)),
    "flamingo": _SpeciesSpec(_draw_flamingo, 0.62, (0.24, 0.4)),
}


# --- locations -------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Blotchy noise in about [-1, 1]: random values on a cells x cells grid, smoothly upsampled."""
    grid = Image.fromarray(rng.uniform(0, 255, (cells, cells)).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1


def _fill(size: int, colour) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.float32), (size, size, 3)).copy()


def _textured(rng: np.random.Generator, size: int, colour, blotch: float, grain: float, cells: int = 8):
    """A colour with large blotches and fine grain."""
    out = _fill(size, colour)
    out += blotch * _smooth_noise(rng, size, cells)[..., None]
    out += grain * rng.standard_normal((size, size, 1)).astype(np.float32)
    return out


def _vertical_gradient(size: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.array(top) + t * np.array(bottom), (size, size, 3)).astype(np.float32)


def _compose(sky: np.ndarray, ground: np.ndarray, horizon: np.ndarray) -> np.ndarray:
    """``sky`` above the per-column horizon row, ``ground`` below it."""
    rows = np.arange(sky.shape[0])[:, None]
    return np.where((rows < horizon[None, :])[..., None], sky, ground)


def _horizon(rng: np.random.Generator, size: int, level: float, wobble: float) -> np.ndarray:
    x = np.linspace(0, 1, size)
    phase = rng.uniform(0, 2 * np.pi, 2)
    shape = np.sin(2 * np.pi * x * 1.3 + phase[0]) + 0.5 * np.sin(2 * np.pi * x * 3.7 + phase[1])
    return (level + wobble * shape) * size


def _strokes(draw, rng, size, count, top, colours, length, lean, width=1) -> None:
    """Short, mostly vertical strokes (grass blades, reeds) below row ``top`` (a fraction of the size)."""
    xs = rng.uniform(0, size, count)
    ys = rng.uniform(top * size, size, count)
    lengths = rng.uniform(*length, count) * size * (0.4 + 0.6 * ys / size)  # nearer is bigger
    tilts = rng.normal(0, lean, count)
    picks = rng.integers(0, len(colours), count)
    for x, y, n, t, k in zip(xs, ys, lengths, tilts, picks):
        draw.line((x, y, x + t * n, y - n), fill=colours[k], width=width)


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _scene_meadow(rng: np.random.Generator, size: int) -> Image.Image:
    """Green grass with blades and a few flowers under a dark tree line."""
    horizon = _horizon(rng, size, rng.uniform(0.15, 0.3), 0.03)
    trees = _textured(rng, size, (40, 70, 40), 25, 8, cells=16)
    ground = _textured(rng, size, (80, 140, 55), 22, 6)
    image = _to_image(_compose(trees, ground, horizon))
    draw = ImageDraw.Draw(image)
    blades = ((60, 115, 40), (105, 165, 65), (130, 180, 80), (50, 95, 35))
    _strokes(draw, rng, size, 1400, 0.25, blades, (0.015, 0.05), 0.3)
    for x, y in rng.uniform((0, 0.35), (1, 1), (25, 2)) * size:
        draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=((245, 230, 80), (250, 250, 245))[int(x) % 2])
    return image


def _scene_desert(rng: np.random.Generator, size: int) -> Image.Image:
    """Rippled sand dunes under a pale sky."""
    horizon = _horizon(rng, size, rng.uniform(0.2, 0.32), 0.05)
    sky = _vertical_gradient(size, (170, 200, 235), (225, 230, 235))
    sand = _textured(rng, size, (222, 190, 138), 18, 5, cells=5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(-0.5, 0.5)
    ripples = np.sin(2 * np.pi * (yy * np.cos(angle) + xx * np.sin(angle)) * 14 + 4 * _smooth_noise(rng, size, 6))
    sand += 14 * ripples[..., None]
    image = _to_image(_compose(sky, sand, horizon))
    draw = ImageDraw.Draw(image)
    for x, y, r in rng.uniform((0, 0.35, 0.003), (1, 1, 0.012), (40, 3)) * size:
        draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=(150, 125, 95))
    return image


def _scene_forest(rng: np.random.Generator, size: int) -> Image.Image:
    """Dark undergrowth, leaf litter and a row of barked tree trunks."""
    floor_level = rng.uniform(0.5, 0.62)
    horizon = _horizon(rng, size, floor_level, 0.02)
    canopy = _textured(rng, size, (45, 62, 42), 22, 7, cells=20)
    litter = _textured(rng, size, (95, 75, 50), 20, 10, cells=12)
    image = _to_image(_compose(canopy, litter, horizon))
    draw = ImageDraw.Draw(image)
    for x, y, r, k in rng.uniform((0, floor_level, 0.004, 0), (1, 1, 0.014, 3), (350, 4)) * (size, size, size, 1):
        draw.ellipse((x - r, y - r / 2, x + r, y + r / 2), fill=((130, 90, 45), (150, 120, 60), (70, 55, 35))[int(k)])
    for depth in np.sort(rng.uniform(0, 1, int(rng.integers(5, 8)))):  # far (thin, pale) to near (thick, dark)
        width = (0.03 + 0.09 * depth) * size
        x = rng.uniform(0, size)
        base = (floor_level + 0.02 + 0.35 * depth) * size
        bark = tuple(int(v) for v in np.array((95, 80, 65)) * (1.1 - 0.5 * depth))
        draw.rectangle((x - width / 2, 0, x + width / 2, base), fill=bark)
        for bx in rng.uniform(x - width / 2, x + width / 2, 6):
            draw.line((bx, 0, bx + rng.normal(0, 2), base), fill=tuple(v // 2 for v in bark), width=1)
    return image


def _scene_rocks(rng: np.random.Generator, size: int) -> Image.Image:
    """Grey-brown scree strewn with shaded boulders."""
    horizon = _horizon(rng, size, rng.uniform(0.08, 0.16), 0.03)
    sky = _vertical_gradient(size, (185, 200, 215), (210, 215, 220))
    ground = _textured(rng, size, (158, 148, 128), 22, 12, cells=10)
    image = _to_image(_compose(sky, ground, horizon))
    draw = ImageDraw.Draw(image)
    for x, y, r, shade in rng.uniform((0, 0.12, 0.03, 0.6), (1, 1, 0.12, 1.15), (16, 4)) * (size, size, size, 1):
        grey = np.array((140, 138, 132)) * shade
        draw.ellipse((x - r, y - 0.7 * r, x + r, y + 0.7 * r), fill=tuple((grey * 0.6).astype(int).tolist()))
        draw.ellipse((x - r, y - 0.75 * r, x + 0.85 * r, y + 0.5 * r), fill=tuple(grey.astype(int).tolist()))
        draw.ellipse((x - 0.6 * r, y - 0.6 * r, x, y - 0.1 * r), fill=tuple(np.minimum(grey * 1.25, 255).astype(int)))
    for _ in range(12):
        x, y = rng.uniform(0, size, 2)
        draw.line((x, y, x + rng.normal(0, 12), y + rng.normal(0, 6)), fill=(90, 85, 75), width=1)
    return image


def _scene_snow(rng: np.random.Generator, size: int) -> Image.Image:
    """Snowfield with blue shadows, twigs and dark conifers on the horizon."""
    level = rng.uniform(0.25, 0.35)
    horizon = _horizon(rng, size, level, 0.015)
    sky = _vertical_gradient(size, (200, 205, 215), (230, 232, 236))
    snow = _textured(rng, size, (238, 242, 250), 4, 3)
    snow -= 28 * np.clip(_smooth_noise(rng, size, 7), 0, 1)[..., None] * np.array([1.0, 0.7, 0.2], np.float32)
    image = _to_image(_compose(sky, snow, horizon))
    draw = ImageDraw.Draw(image)
    for x in np.sort(rng.uniform(0, size, 14)):
        h = rng.uniform(0.08, 0.2) * size
        base = level * size + 2
        draw.polygon([(x - 0.3 * h, base), (x, base - h), (x + 0.3 * h, base)], fill=(30, 55, 40))
    for _ in range(10):
        x, y = rng.uniform((0, level * size), (size, size))
        draw.line((x, y, x + rng.normal(0, 10), y - rng.uniform(5, 20)), fill=(70, 55, 45), width=1)
    return image


def _scene_lake(rng: np.random.Generator, size: int) -> Image.Image:
    """Far shore, rippled blue water, a muddy bank with reeds."""
    shore = _horizon(rng, size, rng.uniform(0.55, 0.68), 0.04)
    far = _horizon(rng, size, rng.uniform(0.12, 0.2), 0.01)
    sky = _vertical_gradient(size, (150, 185, 225), (200, 215, 230))
    water = _vertical_gradient(size, (40, 85, 135), (60, 120, 160))
    mud = _textured(rng, size, (120, 100, 72), 18, 8)
    treeline = _textured(rng, size, (35, 60, 40), 15, 6, cells=24)
    scene = _compose(_compose(sky, treeline, far), water, far + 0.05 * size)
    image = _to_image(_compose(scene, mud, shore))
    draw = ImageDraw.Draw(image)
    for x, y in rng.uniform((0, far.mean() / size + 0.06), (1, shore.min() / size), (120, 2)) * size:
        n = rng.uniform(3, 12)
        draw.line((x - n, y, x + n, y), fill=(140, 180, 210), width=1)
    reeds = ((80, 110, 50), (120, 130, 60), (60, 80, 40))
    _strokes(draw, rng, size, 220, shore.mean() / size - 0.05, reeds, (0.05, 0.12), 0.12)
    return image


def _scene_savanna(rng: np.random.Generator, size: int) -> Image.Image:
    """Dry yellow grass, blue sky and flat-topped acacia trees."""
    level = rng.uniform(0.3, 0.4)
    horizon = _horizon(rng, size, level, 0.01)
    sky = _vertical_gradient(size, (110, 160, 230), (190, 210, 230))
    grass = _textured(rng, size, (205, 172, 95), 20, 6, cells=6)
    image = _to_image(_compose(sky, grass, horizon))
    draw = ImageDraw.Draw(image)
    for x, scale in rng.uniform((0, 0.5), (size, 1.3), (3, 2)):
        base, h = level * size + 1, 0.12 * size * scale
        draw.line((x, base, x + 0.1 * h, base - h), fill=(60, 45, 35), width=max(1, round(0.08 * h)))
        draw.ellipse((x - 0.9 * h, base - 1.25 * h, x + 1.0 * h, base - 0.85 * h), fill=(55, 70, 35))
    blades = ((225, 195, 110), (170, 135, 70), (235, 210, 140), (150, 120, 60))
    _strokes(draw, rng, size, 1100, level, blades, (0.02, 0.06), 0.35)
    return image


def _scene_trail(rng: np.random.Generator, size: int) -> Image.Image:
    """A dirt trail winding between grass and bushes."""
    horizon = _horizon(rng, size, rng.uniform(0.25, 0.35), 0.03)
    bushes = _textured(rng, size, (50, 80, 45), 28, 8, cells=14)
    grass = _textured(rng, size, (95, 130, 60), 18, 8)
    image = _to_image(_compose(bushes, grass, horizon))
    draw = ImageDraw.Draw(image)
    start, end, bend = rng.uniform((0.2, 0.4, -0.3), (0.8, 0.6, 0.3)) * size
    ys = np.linspace(horizon.mean(), size, 20)
    t = (ys - ys[0]) / (ys[-1] - ys[0])
    centre = start + (end - start) * t + bend * np.sin(np.pi * t)
    half = (0.02 + 0.25 * t) * size
    path = list(zip(centre - half, ys)) + list(zip((centre + half)[::-1], ys[::-1]))
    draw.polygon(path, fill=(145, 112, 80))
    for x, y in rng.uniform((0, 0.35), (1, 1), (150, 2)) * size:
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(110, 90, 70))
    return image


def _scene_jungle(rng: np.random.Generator, size: int) -> Image.Image:
    """Dense layered foliage."""
    image = _to_image(_textured(rng, size, (30, 55, 30), 20, 6, cells=12))
    draw = ImageDraw.Draw(image)
    for cx, cy, length, angle, k in rng.uniform((0, 0, 0.06, 0, 0), (1, 1, 0.2, np.pi, 6), (160, 5)) * (
        size, size, size, 1, 1
    ):
        draw.polygon(_leaf(cx, cy, length, 0.4 * length, angle), fill=_LEAF_COLOURS[int(k)])
    return image


def _scene_canyon(rng: np.random.Generator, size: int) -> Image.Image:
    """Layered red rock strata above a gravel floor."""
    level = rng.uniform(0.55, 0.65)
    horizon = _horizon(rng, size, level, 0.02)
    yy = np.arange(size, dtype=np.float32)[:, None] / size + 0.03 * _smooth_noise(rng, size, 5)
    strata = np.sin(2 * np.pi * yy * rng.uniform(9, 13)) + 0.5 * np.sin(2 * np.pi * yy * 29)
    rock = _fill(size, (180, 95, 60)) + 22 * strata[..., None] * np.array([1, 0.7, 0.5], np.float32)
    rock += 6 * rng.standard_normal((size, size, 1)).astype(np.float32)
    gravel = _textured(rng, size, (165, 120, 90), 15, 16, cells=10)
    image = _to_image(_compose(rock, gravel, horizon))
    draw = ImageDraw.Draw(image)
    for x in rng.uniform(0, size, 8):
        draw.line((x, 0, x + rng.normal(0, 8), level * size * rng.uniform(0.4, 1)), fill=(110, 55, 35), width=1)
    return image


_SCENES: dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "meadow": _scene_meadow,
    "desert": _scene_desert,
    "forest": _scene_forest,
    "rocks": _scene_rocks,
    "snow": _scene_snow,
    "lake": _scene_lake,
    "savanna": _scene_savanna,
    "trail": _scene_trail,
    "jungle": _scene_jungle,
    "canyon": _scene_canyon,
}

# (scene, domain shift) of each location; locations 7-11 are out of domain.
_LOCATION_SPECS: tuple[tuple[str, str], ...] = (
    ("meadow", "none"),
    ("desert", "none"),
    ("forest", "none"),
    ("rocks", "none"),
    ("snow", "none"),
    ("lake", "none"),
    ("savanna", "none"),
    ("forest", "infrared"),
    ("meadow", "infrared"),
    ("trail", "dusk"),
    ("jungle", "clutter"),
    ("canyon", "amber"),
)


@lru_cache(maxsize=32)
def _location_background(seed: int, location: int, size: int) -> np.ndarray:
    """The fixed view of one camera, with a small margin for camera shake; read-only uint8 (H, W, 3)."""
    margin = max(1, round(size / 56))
    scene = _LOCATION_SPECS[location][0]
    rng = np.random.default_rng([seed, _LAYOUT_STREAM, location])
    pixels = np.asarray(_SCENES[scene](rng, size + 2 * margin))
    pixels.setflags(write=False)
    return pixels
