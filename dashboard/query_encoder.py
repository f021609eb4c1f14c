"""Features of an image that is not in the cache, computed exactly as the cache's own images were.

The model is loaded once per process (per model/layer/weights) and shared by every session.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cache_builder.cache_format import CacheError, Manifest, content_cells, content_mask
from cache_builder.errors import BuildError
from cache_builder.models import FeatureExtractor, Preprocessing, load_model


@functools.lru_cache(maxsize=4)
def _extractor(model: str, layer: str, weights: str | None, image_size: int, sha256: str | None):
    try:
        loaded = load_model(model, weights=weights, image_size=image_size)
    except BuildError as exc:
        raise CacheError(f"cannot load the cache's model to encode a new image: {exc}") from None
    if sha256 and loaded.weights_sha256 and loaded.weights_sha256 != sha256:
        raise CacheError(f"the weights of {model} changed since the cache was built; rebuild the cache")
    return FeatureExtractor(loaded, layer).eval(), threading.Lock()


@dataclass(frozen=True)
class EncodedImage:
    image: Image.Image  # as the model saw it: what the region is drawn on
    features: np.ndarray  # (H, W, C) float32, zero on padding cells as in the cache
    content: tuple[int, int, int, int]  # (r0, c0, r1, c1): the cells that show the picture, not padding


def encode_image(manifest: Manifest, image: Image.Image) -> EncodedImage:
    """An image framed, encoded and padded exactly as the cache's own images were."""
    preprocessing = Preprocessing.from_dict(manifest.preprocessing)
    extractor, lock = _extractor(manifest.model, manifest.layer, manifest.weights_arg, manifest.input_size,
                                 manifest.weights_sha256)
    framed, box = preprocessing.frame_image(image)
    tensor = preprocessing.normalize(np.asarray(framed, dtype=np.uint8))[None]
    with lock, torch.inference_mode():
        output = extractor(tensor)
    features = np.ascontiguousarray(output[0].permute(1, 2, 0).float().numpy())
    if features.shape != tuple(manifest.grid):
        raise CacheError(f"the model gives a {features.shape} grid but the cache holds {tuple(manifest.grid)}")
    cells = content_cells(np.array([box]), features.shape[:2], manifest.image_size)
    features[~content_mask(cells, features.shape[:2])[0]] = 0  # padding holds zeros, as in the cache
    return EncodedImage(framed, features, tuple(int(v) for v in cells[0]))
