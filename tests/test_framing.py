"""Whole frames (`--frame fit`) against the square centre crop, on 16:9 frames with an object at the far left edge.

The crop cuts the object off (so it can be neither drawn nor found); fit keeps it, and a region on it finds the
other frames that have it at the edge. Letterboxed images keep their padding out of every match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from wide_frames import EDGE_FRAMES, SQUARE, write_frames

from cache_builder import cache_format as fmt
from cache_builder.build import BuildOptions, build_cache
from cache_builder.framing import choose_framing, dominant_aspect
from cache_builder.models import Preprocessing
from cache_builder.sources import parse_source
from dashboard.feature_cache import FeatureCache
from dashboard.geometry import QueryError
from dashboard.search import SearchRequest, search_regions

OPTIONS = dict(model="efficientnet_lite0", image_size=96, batch_size=4, workers=0)

@pytest.fixture(scope="module")
def frames_folder(tmp_path_factory) -> Path:
    return write_frames(tmp_path_factory.mktemp("wide"))


@pytest.fixture(scope="module")
def caches(frames_folder, tmp_path_factory) -> dict[str, FeatureCache]:
    built = {}
    for mode in ("fit", "crop"):
        out = tmp_path_factory.mktemp(mode) / "cache"
        build_cache([parse_source(f"folder:{frames_folder}")], out, BuildOptions(**OPTIONS, frame=mode))
        built[mode] = FeatureCache.open(out)
    return built


def red_pixels(image: Image.Image) -> np.ndarray:
    a = np.asarray(image, dtype=np.int16)
    return a[..., 0] - np.maximum(a[..., 1], a[..., 2]) > 80


def test_fit_keeps_the_whole_frame_at_its_aspect_ratio(caches):
    cache = caches["fit"]
    assert cache.manifest.frame == "fit" and cache.image_size == (96, 160) and cache.grid == (3, 5)
    picture = cache.load_image(0)
    assert picture.size == (160, 96)
    assert red_pixels(picture)[:, :32].sum() > 50  # the object, in the first column of cells


def test_crop_cuts_the_object_off_which_is_why_fit_exists(caches):
    cache = caches["crop"]
    assert cache.manifest.frame == "crop" and cache.image_size == (96, 96) and cache.grid == (3, 3)
    assert all(red_pixels(cache.load_image(i)).sum() == 0 for i in EDGE_FRAMES)


def test_a_region_on_the_edge_object_finds_the_other_frames_with_it(caches):
    cache = caches["fit"]
    region = np.zeros(cache.grid, dtype=np.float32)
    region[1, 0] = 1  # the object's cell, at the far left edge
    result = search_regions(SearchRequest(cache=cache, image_id=0, weights=region, k=5, exclude_query=True))
    paths = list(result.hits["path"])
    assert {int(Path(p).stem) for p in paths} <= set(EDGE_FRAMES) | {SQUARE}, paths
    assert (result.hits["col"] <= 1).all()


def test_letterboxed_padding_is_recorded_zeroed_and_never_drawn_on(caches):
    cache = caches["fit"]
    square_id = int(cache.metadata.filter_ids(None)[-1])
    assert cache.metadata.rows([square_id], ["path"])["path"][0] == f"{SQUARE:02d}.png"
    x0, y0, x1, y1 = (int(v) for v in cache.frames[square_id])
    assert (x0, y0, x1, y1) == (32, 0, 128, 96)  # 180x180 fitted to 96x96, centred in 160 pixels
    assert tuple(cache.content_cells([square_id])[0]) == (0, 1, 3, 4)
    features = cache.image_features(square_id)
    assert not features[:, [0, 4]].any() and features[:, 1:4].any()
    assert not cache.sqnorms[square_id][:, [0, 4]].any()
    assert tuple(cache.content_cells([0])[0]) == (0, 0, 3, 5)  # a 16:9 frame is all picture
    on_padding = np.zeros(cache.grid, dtype=np.float32)
    on_padding[:, 0] = 1
    with pytest.raises(QueryError, match="padding"):
        search_regions(SearchRequest(cache=cache, image_id=square_id, weights=on_padding))


def test_a_letterboxed_hit_matches_on_its_picture(caches):
    """The square frame's object sits next to its padding; its best window must lie on the picture."""
    cache = caches["fit"]
    region = np.zeros(cache.grid, dtype=np.float32)
    region[1, 0] = 1
    result = search_regions(SearchRequest(cache=cache, image_id=0, weights=region, k=20, exclude_query=True))
    square = result.hits[result.hits["path"] == f"{SQUARE:02d}.png"].iloc[0]
    assert 1 <= square["col"] <= 3


def test_the_auto_frame_measures_folders_and_trusts_camera_trap_formats(frames_folder):
    folder = parse_source(f"folder:{frames_folder}")
    assert dominant_aspect(folder.items) == pytest.approx(1.78)
    chosen = choose_framing("auto", [folder], folder.items)
    assert chosen.mode == "fit" and "1.78" in chosen.reason
    assert choose_framing("crop", [folder], folder.items).mode == "crop"
    folder.frame = "fit"  # as iwildcam and coco-cameratraps declare
    assert "folder" in choose_framing("auto", [folder], folder.items).reason
    demo = parse_source("demo")
    assert choose_framing("auto", [demo], demo.items).mode == "crop"


def test_fitted_preprocessing_rounds_the_long_side_to_whole_cells():
    prep = Preprocessing(224, 256, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert prep.fitted(16 / 9).input_shape == (224, 384)  # a 7x12 grid at stride 32
    assert prep.fitted(4 / 3).input_shape == (224, 288)
    assert prep.fitted(9 / 16).input_shape == (384, 224)
    assert Preprocessing.from_dict(prep.fitted(16 / 9).to_dict()) == prep.fitted(16 / 9)
    assert "frame" not in prep.to_dict()  # crop caches keep their fingerprints
    framed, box = prep.fitted(16 / 9).frame_image(Image.new("RGB", (100, 100), "red"))
    assert framed.size == (384, 224) and box == (80, 0, 304, 224)
    assert framed.getpixel((0, 0)) == (128, 128, 128)  # padding in the mean colour: zero after normalising


def test_old_cropped_caches_open_as_before(small_cache):
    assert small_cache.manifest.frame == "crop" and small_cache.frames is None
    assert small_cache.content_cells() is None and small_cache.image_size == (48, 48)


def test_a_model_that_needs_a_square_input_says_so(tmp_path, frames_folder):
    from cache_builder.errors import BuildError

    options = BuildOptions(model="timm:vit_tiny_patch16_224", weights="none", frame="fit", workers=0)
    with pytest.raises(BuildError, match="--frame crop"):
        build_cache([parse_source(f"folder:{frames_folder}")], tmp_path / "vit", options)


def test_the_frames_file_is_checked_against_the_manifest(caches, tmp_path):
    import shutil

    from cache_builder.cache_format import CacheError

    copy = tmp_path / "copy"
    shutil.copytree(caches["fit"].path, copy)
    np.save(copy / fmt.FRAMES_FILE, np.zeros((3, 4), dtype=np.int32))
    with pytest.raises(CacheError, match="frames.npy"):
        FeatureCache.open(copy)


def test_an_upload_is_framed_and_padded_like_the_cached_images(caches):
    from dashboard.query_encoder import encode_image
    from wide_frames import frame

    cache = caches["fit"]
    square_id = int(cache.metadata.filter_ids(None)[-1])
    encoded = encode_image(cache.manifest, frame(SQUARE, 180, 180))
    assert encoded.image.size == (160, 96) and encoded.content == (0, 1, 3, 4)
    assert not encoded.features[:, [0, 4]].any()
    np.testing.assert_allclose(encoded.features, cache.image_features(square_id), rtol=2**-6, atol=2e-2)
    wide = encode_image(cache.manifest, frame(0))
    assert wide.content == (0, 0, 3, 5)


def test_the_heat_map_of_a_wide_hit_peaks_on_its_window(caches):
    from dashboard import rendering
    from dashboard.search import heat_maps

    cache = caches["fit"]
    region = np.zeros(cache.grid, dtype=np.float32)
    region[1, 0] = 1
    result = search_regions(SearchRequest(cache=cache, image_id=0, weights=region, k=1, exclude_query=True))
    hit = result.hits.iloc[0]
    heat = heat_maps(cache, result, [int(hit["id"])])[0]
    assert heat.shape == (3, 5)
    out = np.asarray(rendering.heatmap_overlay(cache.load_image(int(hit["id"])), heat, cache.grid,
                                               result.query.box, alpha=1.0))
    peak = np.all(out == rendering.colormap(np.array(1.0)), axis=2)
    assert out.shape == (96, 160, 3)
    assert peak[hit["y0"]:hit["y1"], hit["x0"]:hit["x1"]].all() and peak.sum() == (hit["y1"] - hit["y0"]) * (
        hit["x1"] - hit["x0"])
