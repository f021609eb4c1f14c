"""Features of an image that is not in the cache, computed exactly as the cache's own images were.

The model is loaded once per process (per model/layer/weights) and shared by every session.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from PIL import Image

from cache_builder.cache_format import CacheError, Manifest
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


def encode_image(manifest: Manifest, image: Image.Image) -> tuple[Image.Image, np.ndarray]:
    """The image as the model sees it (for display and drawing) and its (H, W, C) float32 features."""
    preprocessing = Preprocessing.from_dict(manifest.preprocessing)
    extractor, lock = _extractor(manifest.model, manifest.layer, manifest.weights_arg, manifest.input_size,
                                 manifest.weights_sha256)
    crop = preprocessing.crop(image)
    tensor = preprocessing.normalize(np.asarray(crop, dtype=np.uint8))[None]
    with lock, torch.inference_mode():
        output = extractor(tensor)
    features = output[0].permute(1, 2, 0).float().numpy()
    if features.shape != tuple(manifest.grid):
        raise CacheError(f"the model gives a {features.shape} grid but the cache holds {tuple(manifest.grid)}")
    return crop, np.ascontiguousarray(features)
