"""What whole frames cost: `--frame fit` against `--frame crop` on the same wide frames, side by side, one run.

    .venv/bin/python benchmarks/frames.py [--images 240] [--width 1280 --height 720] [--batch-size 32]

The frames are JPEGs written by code (smooth camera-trap-like scenes with sensor noise, so decoding costs what a
real frame costs), 16:9 by default. Both builds run the whole builder (decode, frame, JPEG for display, model,
writes) with EfficientNet-Lite0 at its default layer; the table gives images/s, bytes per cached image (feature
arrays, display JPEG, frame boxes) and the grid, then fit as a multiple of crop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_builder.build import BuildOptions, build_cache  # noqa: E402
from cache_builder.sources import parse_source  # noqa: E402
from dashboard.scoring.kernel import path_flags  # noqa: E402


def write_frames(folder: Path, count: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    ys, xs = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    for index in range(count):
        corners = rng.integers(30, 220, size=(2, 2, 3)).astype(np.float32)
        scene = (corners[0, 0] * (1 - ys) * (1 - xs) + corners[0, 1] * (1 - ys) * xs
                 + corners[1, 0] * ys * (1 - xs) + corners[1, 1] * ys * xs)
        noise = rng.normal(0, 8, size=(height, width, 3)).astype(np.float32)
        Image.fromarray(np.clip(scene + noise, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)


def cache_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "metadata.duckdb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(f"CPU flags: {path_flags()}; {args.images} frames of {args.width}x{args.height}")
    with tempfile.TemporaryDirectory(prefix="vfs-frames-") as tmp:
        frames = Path(tmp) / "frames"
        frames.mkdir()
        write_frames(frames, args.images, args.width, args.height)
        rows = {}
        for mode in ("crop", "fit"):
            out = Path(tmp) / mode
            options = BuildOptions(model="efficientnet_lite0", batch_size=args.batch_size, workers=args.workers,
                                   frame=mode)
            started = time.perf_counter()
            manifest = build_cache([parse_source(f"folder:{frames}")], out, options)
            elapsed = time.perf_counter() - started
            height, width = manifest.image_size
            rows[mode] = (manifest.image_count / elapsed, cache_bytes(out) / manifest.image_count,
                          f"{manifest.grid[0]}x{manifest.grid[1]}", f"{width}x{height}")
    print(f"{'frame':<6} {'input':>8} {'grid':>6} {'images/s':>9} {'bytes/image':>12}")
    for mode, (rate, size, grid, shape) in rows.items():
        print(f"{mode:<6} {shape:>8} {grid:>6} {rate:9.1f} {size:12,.0f}")
    (crop_rate, crop_bytes, *_), (fit_rate, fit_bytes, *_) = rows["crop"], rows["fit"]
    print(f"fit / crop: time per image x{crop_rate / fit_rate:.2f}, bytes per image x{fit_bytes / crop_bytes:.2f}")


if __name__ == "__main__":
    main()
