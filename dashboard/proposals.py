"""Suggested regions: a handful of class-agnostic boxes proposed from the query's own cached feature map.

No extra model: what stands out in a feature map is what differs from the rest of the image. Each cell's
saliency is its feature's distance to the image's median cell (the background, for most photos: the median is
robust to an object covering up to half the frame). The saliency map is upsampled bilinearly to a quarter of the
display resolution, thresholded at several levels between its minimum and maximum, and every connected blob
becomes a box (activation-blob proposals, as in DASR-style instance search). Boxes are ranked by how much more
salient they are inside than outside, times the fourth root of their area (contrast alone favours a small peak
over the object around it: on 400 demo images the top suggestion matched the animal 11% of the time ranked by
contrast, 45% with the area term); boxes around more than 80% of the picture are no region (on 600 demo images
that took the top suggestion from 45.5% to 52.5%); near-duplicates are dropped, and the best `count` are kept.

Measured on the 1,500-image demo cache (`benchmarks/proposals.py`, the 1,282 images with an animal): the best of
5 suggestions overlaps the animal's box with IoU >= 0.5 for 76.9% of them, the top suggestion alone for 54.6%;
the naive baseline (per-cell feature norm above its mean, boxes of the connected blobs of cells) for 9.8%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dashboard.geometry import box_mask, mask_to_grid

LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # thresholds, as shares of the saliency's range
DEFAULT_COUNT = 5
DUPLICATE_IOU = 0.7  # a box overlapping a better one this much is the same suggestion
MIN_AREA = 0.01  # of the picture: smaller blobs are noise
MAX_AREA = 0.8  # of the picture: a box around nearly all of it is no region (the lowest levels' blob)
SCALE = 4  # the saliency map is labelled at a quarter of the display resolution
AREA_POWER = 0.25


@dataclass(frozen=True)
class SuggestedRegion:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in display pixels, x1/y1 exclusive
    contrast: float  # mean saliency inside minus outside, on a 0..1 scale: how much it stands out
    score: float  # the rank: contrast x area share ** AREA_POWER

    def weights(self, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
        """The region as search weights on the feature grid (each cell's share of the box)."""
        return mask_to_grid(box_mask(image_size, self.box), grid)


def saliency(features: np.ndarray, content: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(H, W) each cell's distance to the median cell of the picture (padding cells: 0)."""
    h, w, c = features.shape
    r0, c0, r1, c1 = content if content is not None else (0, 0, h, w)
    picture = features[r0:r1, c0:c1].reshape(-1, c)
    if len(picture) == 0:
        return np.zeros((h, w), np.float32)
    median = np.median(picture, axis=0)
    out = np.zeros((h, w), np.float32)
    out[r0:r1, c0:c1] = np.linalg.norm(features[r0:r1, c0:c1] - median, axis=-1)
    return out


def suggest_regions(features: np.ndarray, image_size: tuple[int, int],
                    content: tuple[int, int, int, int] | None = None,
                    count: int = DEFAULT_COUNT) -> list[SuggestedRegion]:
    """Up to `count` boxes (display pixels of an image of `image_size` = (height, width)) around what stands out
    in the (H, W, C) feature map, best first; none for a featureless image. `content`: the cells (r0, c0, r1, c1)
    showing the picture of a letterboxed image, so the bars are never suggested."""
    height, width = image_size
    grid_h, grid_w = features.shape[:2]
    cell_h, cell_w = height / grid_h, width / grid_w
    r0, c0, r1, c1 = content if content is not None else (0, 0, grid_h, grid_w)
    picture = (int(round(c0 * cell_w)), int(round(r0 * cell_h)), int(round(c1 * cell_w)), int(round(r1 * cell_h)))
    small_w, small_h = max(1, width // SCALE), max(1, height // SCALE)
    sal = saliency(np.asarray(features, dtype=np.float32), content)
    up = np.asarray(Image.fromarray(sal, mode="F").resize((small_w, small_h), Image.BILINEAR))
    inside_picture = np.zeros(up.shape, bool)
    inside_picture[picture[1] // SCALE:-(-picture[3] // SCALE), picture[0] // SCALE:-(-picture[2] // SCALE)] = True
    values = up[inside_picture]
    if values.size == 0 or values.max() - values.min() <= 1e-12:
        return []
    scaled = np.where(inside_picture, (up - values.min()) / (values.max() - values.min()), 0.0)
    area = inside_picture.sum()
    candidates = []
    for level in LEVELS:
        for y0, x0, y1, x1 in blob_boxes(scaled >= level):
            if not MIN_AREA * area <= (y1 - y0) * (x1 - x0) <= MAX_AREA * area:
                continue
            inside = np.zeros(up.shape, bool)
            inside[y0:y1, x0:x1] = True
            outside = inside_picture & ~inside
            contrast = scaled[inside].mean() - (scaled[outside].mean() if outside.any() else 0.0)
            box = (min(width, x0 * SCALE), min(height, y0 * SCALE), min(width, x1 * SCALE), min(height, y1 * SCALE))
            share = (y1 - y0) * (x1 - x0) / area
            candidates.append(SuggestedRegion(box, float(contrast), float(contrast * share ** AREA_POWER)))
    candidates.sort(key=lambda region: (-region.score, region.box))
    kept: list[SuggestedRegion] = []
    for region in candidates:
        if all(box_iou(region.box, other.box) < DUPLICATE_IOU for other in kept):
            kept.append(region)
        if len(kept) == count:
            break
    return kept


def blob_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) boxes of the 4-connected blobs of a boolean image (exclusive ends), in label order.

    Labels spread by repeated minimum over neighbours, vectorised: a blob of diameter d settles in d steps, and
    the maps here are at most a few hundred cells across."""
    h, w = mask.shape
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(h * w, dtype=np.int64).reshape(h, w), big)
    while True:
        spread = labels.copy()
        spread[1:] = np.minimum(spread[1:], labels[:-1])
        spread[:-1] = np.minimum(spread[:-1], labels[1:])
        spread[:, 1:] = np.minimum(spread[:, 1:], labels[:, :-1])
        spread[:, :-1] = np.minimum(spread[:, :-1], labels[:, 1:])
        spread = np.where(mask, spread, big)
        if np.array_equal(spread, labels):
            break
        labels = spread
    boxes = []
    for label in np.unique(labels[mask]):
        ys, xs = np.nonzero(labels == label)
        boxes.append((int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1))
    return boxes


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def baseline_regions(features: np.ndarray, image_size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The naive baseline the suggestions are measured against: cells whose feature norm is above the image's
    mean norm, one box (display pixels) per connected blob of them."""
    norms = np.linalg.norm(np.asarray(features, dtype=np.float32), axis=-1)
    grid_h, grid_w = norms.shape
    height, width = image_size
    return [(int(x0 * width / grid_w), int(y0 * height / grid_h), int(x1 * width / grid_w), int(y1 * height / grid_h))
            for y0, x0, y1, x1 in blob_boxes(norms >= norms.mean())]
