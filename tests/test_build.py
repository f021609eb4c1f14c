"""Builds through the real pipeline (EfficientNet-Lite0 at a small input size, so each build takes seconds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from cache_builder.build import STATE_FILE, BuildOptions, build_cache
from cache_builder.errors import BuildError
from cache_builder.sources import SourceOptions, parse_source
from cache_builder import cache_format as fmt
from cache_builder.index import default_dims
from dashboard.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model="efficientnet_lite0", image_size=96, batch_size=4, workers=0, frame="crop")


def make_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        for i in range(5):
            pixels = rng.integers(0, 255, size=(50 + i, 70, 3), dtype=np.uint8)
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    (root / "cat" / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def built_sources(dataset, tmp_path_factory) -> list:
    csv_root = tmp_path_factory.mktemp("csv")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(csv_root / "g.png")
    Image.new("L", (80, 60), 128).save(csv_root / "gray.png")
    (csv_root / "m.csv").write_text(
        "path,age,taken,diagnoses\ng.png,61,2024-01-02,Effusion|Mass\ngray.png,,2024-02-03,No Finding\n"
    )
    return [
        parse_source(f"folder:{dataset}@in"),
        parse_source(f"csv:{csv_root / 'm.csv'}@out", SourceOptions(multilabel=("diagnoses",))),
    ]


@pytest.fixture(scope="module")
def built(built_sources, tmp_path_factory) -> tuple[Path, fmt.Manifest]:
    out = tmp_path_factory.mktemp("cache")
    return out, build_cache(built_sources, out, BuildOptions(**SMALL))


def test_manifest_describes_the_cache(built):
    out, manifest = built
    assert manifest.status == fmt.STATUS_COMPLETE
    assert manifest.image_count == 12 and manifest.grid == (3, 3, 320)
    assert manifest.model == "efficientnet_lite0" and manifest.layer == "blocks.6"
    assert manifest.weights_sha256 and manifest.preprocessing["input_size"] == 96
    assert {s["domain"] for s in manifest.sources} == {"in", "out"}
    assert {"read_s", "model_s", "write_s", "total_s"} <= set(manifest.timings)
    assert not (out / STATE_FILE).exists()


def test_unreadable_files_are_skipped_and_listed(built):
    out, manifest = built
    assert sorted(s["path"] for s in manifest.skipped) == ["cat/corrupt.jpg", "dog/truncated.png"]
    assert all(s["reason"] for s in manifest.skipped)
    paths = duckdb.connect(str(out / fmt.METADATA_FILE), read_only=True).execute(
        "SELECT path FROM images ORDER BY id").fetchall()
    assert ("cat/corrupt.jpg",) not in paths and len(paths) == 12


def test_metadata_columns_are_typed(built):
    out, _ = built
    con = duckdb.connect(str(out / fmt.METADATA_FILE), read_only=True)
    types = {name: kind for name, kind, *_ in con.execute("DESCRIBE images").fetchall()}
    assert types["id"] == "BIGINT" and types["path"] == "VARCHAR"
    assert types["domain"] == "VARCHAR" and types["source"] == "VARCHAR" and types["label"] == "VARCHAR"
    assert types["age"] == "BIGINT" and types["taken"].startswith("TIMESTAMP")
    assert types["diagnoses"] == "VARCHAR[]"
    rows = con.execute("SELECT domain, label, diagnoses FROM images WHERE path = 'g.png'").fetchone()
    assert rows == ("out", None, ["Effusion", "Mass"])
    assert con.execute("SELECT count(*) FROM images WHERE domain = 'in' AND label = 'cat'").fetchone()[0] == 5


def test_arrays_and_images_line_up_with_ids(built):
    out, manifest = built
    cache = FeatureCache.open(out)
    assert cache.features().shape == (12, 3, 3, 320)
    recomputed = cache.features().float().square().sum(-1).numpy()
    np.testing.assert_allclose(cache.sqnorms, recomputed, rtol=1e-5)
    for image_id in range(cache.size):
        assert cache.load_image(image_id).size == (96, 96)
    gray = int(cache.metadata.filter_ids(None)[-1])
    assert np.ptp(np.asarray(cache.load_image(gray)), axis=2).max() <= 8  # grayscale stays gray in RGB


def test_rerunning_a_complete_build_does_nothing(built, built_sources):
    out, manifest = built
    before = (out / fmt.FEATURES_FILE).stat().st_mtime_ns
    again = build_cache(built_sources, out, BuildOptions(**SMALL))
    assert again.created == manifest.created
    assert (out / fmt.FEATURES_FILE).stat().st_mtime_ns == before


def test_a_new_cache_gets_its_first_stage_index_and_a_rerun_restores_a_lost_one(built, built_sources, tmp_path):
    out, manifest = built
    index = FeatureCache.open(out).first_stage()
    channels = manifest.grid[2]
    assert index.dims == default_dims(channels) and index.codes.shape == (12, 3, 3, index.dims // 2)
    shutil.rmtree(out / fmt.INDEX_DIR)  # as if the index build had been interrupted
    indexed = []
    build_cache(built_sources, out, BuildOptions(**SMALL), on_index_progress=lambda d, t: indexed.append((d, t)))
    assert FeatureCache.open(out).first_stage().dims == index.dims and indexed[-1] == (12, 12)
    bare = tmp_path / "bare"
    build_cache(built_sources[:1], bare, BuildOptions(**SMALL, index=False))
    assert not (bare / fmt.INDEX_DIR).exists()


def test_different_cache_in_output_folder_is_refused(built, dataset):
    out, _ = built
    with pytest.raises(BuildError, match="--overwrite"):
        build_cache([parse_source(f"folder:{dataset}")], out, BuildOptions(**SMALL))


def test_non_cache_folder_is_refused(tmp_path, dataset):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(BuildError, match="not empty"):
        build_cache([parse_source(f"folder:{dataset}")], tmp_path, BuildOptions(**SMALL, overwrite=True))
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_overwrite_replaces_a_cache(tmp_path, dataset):
    build_cache([parse_source(f"folder:{dataset / 'cat'}")], tmp_path, BuildOptions(**SMALL))
    manifest = build_cache([parse_source(f"folder:{dataset / 'dog'}")], tmp_path,
                           BuildOptions(**SMALL, overwrite=True))
    assert manifest.image_count == 5 and FeatureCache.open(tmp_path).size == 5


class Interrupt(Exception):
    pass


def test_interrupted_build_resumes_to_identical_arrays(tmp_path):
    sources = [parse_source("demo", SourceOptions(demo_size=24))]
    clean = tmp_path / "clean"
    build_cache(sources, clean, BuildOptions(**SMALL))

    resumed = tmp_path / "resumed"

    def stop_after_two_batches(done: int, total: int) -> None:
        if done >= 8:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_cache(sources, resumed, BuildOptions(**SMALL), on_progress=stop_after_two_batches)
    committed = json.loads((resumed / STATE_FILE).read_text())["done"]  # batches written before it stopped
    assert 8 <= committed < 24
    assert fmt.read_manifest(resumed).status == fmt.STATUS_BUILDING
    with pytest.raises(fmt.CacheError, match="not complete"):
        FeatureCache.open(resumed)
    seen = []
    build_cache(sources, resumed, BuildOptions(**SMALL), on_progress=lambda d, t: seen.append(d))
    assert seen[0] == committed + 4  # continued after the committed batches
    assert_same_cache(clean, resumed)


def assert_same_cache(a: Path, b: Path, images: bool = True) -> None:
    for name in (fmt.FEATURES_FILE, fmt.SQNORMS_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for image_id in range(fmt.read_manifest(a).image_count if images else 0):
        assert (a / fmt.image_relpath(image_id)).read_bytes() == (b / fmt.image_relpath(image_id)).read_bytes()


def test_build_killed_with_sigkill_resumes_to_identical_arrays(tmp_path):
    args = [sys.executable, "-m", "cache_builder", "build", "--source", "demo", "--demo-size", "48",
            "--image-size", "96", "--batch-size", "4", "--workers", "0", "--quiet"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(args + ["--out", str(clean)], cwd=ROOT, check=True, capture_output=True)

    process = subprocess.Popen(args + ["--out", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            state = killed / STATE_FILE
            try:
                if json.loads(state.read_text())["done"] >= 12:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert fmt.read_manifest(killed).status == fmt.STATUS_BUILDING
    subprocess.run(args + ["--out", str(killed)], cwd=ROOT, check=True, capture_output=True)
    assert fmt.read_manifest(killed).status == fmt.STATUS_COMPLETE
    assert_same_cache(clean, killed)


def test_all_images_unreadable_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"nope")
    with pytest.raises(BuildError, match="every image failed"):
        build_cache([parse_source(f"folder:{data}")], tmp_path / "out", BuildOptions(**SMALL))


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(tmp_path, dataset, limit):
    with pytest.raises(BuildError, match="--limit"):
        build_cache([parse_source(f"folder:{dataset}")], tmp_path, BuildOptions(**SMALL, limit=limit))


def test_limit_keeps_the_first_images(tmp_path, dataset):
    manifest = build_cache([parse_source(f"folder:{dataset}")], tmp_path, BuildOptions(**SMALL, limit=3))
    assert manifest.image_count == 3


def test_new_image_is_encoded_like_the_cached_ones(built, dataset):
    """A query image from outside the cache goes through the cache's own model, layer and preprocessing."""
    from dashboard.query_encoder import encode_image

    out, manifest = built
    cache = FeatureCache.open(out)
    image_id = int(cache.metadata.filter_ids(None)[0])
    original = dataset / cache.metadata.rows([image_id], ["path"])["path"][0]
    encoded = encode_image(manifest, Image.open(original))
    assert encoded.image.size == (96, 96) and encoded.features.shape == (3, 3, 320)
    assert encoded.content == (0, 0, 3, 3)  # a crop has no padding
    np.testing.assert_allclose(encoded.features, cache.image_features(image_id), rtol=2**-7, atol=1e-2)
    # any size of upload works: it is preprocessed like the cache's images
    other = encode_image(manifest, Image.new("RGB", (640, 200), (30, 90, 200)))
    assert other.features.shape == (3, 3, 320)


def test_damaged_build_state_is_a_clear_error_and_overwrite_recovers(tmp_path):
    sources = [parse_source("demo", SourceOptions(demo_size=8))]

    def stop(done: int, total: int) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        build_cache(sources, tmp_path, BuildOptions(**SMALL), on_progress=stop)
    (tmp_path / STATE_FILE).write_text("{truncated")
    with pytest.raises(BuildError, match="damaged.*--overwrite"):
        build_cache(sources, tmp_path, BuildOptions(**SMALL))
    assert build_cache(sources, tmp_path, BuildOptions(**SMALL, overwrite=True)).image_count == 8


def test_a_manifests_own_domain_fills_the_cache_and_the_charts_split_by_it(tmp_path):
    """No @ tag: a manifest's `domain` column (any values, a hospital's name too) is the cache's domain."""
    from dashboard import analysis
    from dashboard.search import SearchRequest, search_regions

    rng = np.random.default_rng(5)
    rows = ["path,domain,source"]
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{['in', 'out', 'Hospital de San Juan'][i % 3]},{'nih' if i < 4 else 'padchest'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cache"
    build_cache([parse_source(f"csv:{tmp_path / 'm.csv'}")], out, BuildOptions(**SMALL))
    cache = FeatureCache.open(out)
    table = cache.metadata.rows(None)
    assert list(table["domain"]) == ["in", "out", "Hospital de San Juan"] * 2 + ["in", "out"]
    assert list(table["source"]) == ["nih"] * 4 + ["padchest"] * 4
    assert "domain_original" not in table.columns and "source_original" not in table.columns
    result = search_regions(SearchRequest(cache=cache, image_id=0, weights=np.ones(cache.grid), k=4))
    shares = analysis.composition(result.hits, result.searched, "domain")
    assert set(shares["value"]) == {"in", "out", "Hospital de San Juan"}
    assert shares["searched"].sum() == 8


# ------------------------------------------------------------------------------------------ multi-layer caches
TWO_LAYERS = ("blocks.6", "blocks.2")


@pytest.fixture(scope="module")
def two_layer_build(built_sources, tmp_path_factory) -> tuple[Path, fmt.Manifest]:
    out = tmp_path_factory.mktemp("two_layers")
    return out, build_cache(built_sources, out, BuildOptions(**SMALL, layers=TWO_LAYERS))


def test_several_layers_share_one_cache_and_each_equals_its_single_layer_build(two_layer_build, built,
                                                                               built_sources, tmp_path):
    out, manifest = two_layer_build
    assert manifest.layer_names == list(TWO_LAYERS) and manifest.layer == "blocks.6"
    assert [entry["dir"] for entry in manifest.layers] == ["", "layers/01"]
    early = manifest.at_layer("blocks.2")
    assert early.grid == (12, 12, 40) and manifest.grid == (3, 3, 320)
    single_early = tmp_path / "early"
    build_cache(built_sources, single_early, BuildOptions(**SMALL, layers=("blocks.2",), index=False))
    for folder, single in ((out, built[0]), (out / "layers" / "01", single_early)):
        for name in (fmt.FEATURES_FILE, fmt.SQNORMS_FILE):  # the same forward pass, rows dropped the same way
            assert (folder / name).read_bytes() == (single / name).read_bytes(), (folder, name)
    assert not (out / "layers" / "01" / fmt.IMAGES_DIR).exists()  # images are shared, stored once
    assert manifest.image_count == built[1].image_count and manifest.skipped == built[1].skipped


def test_each_layer_opens_with_its_own_grid_index_and_the_shared_images(two_layer_build):
    out, _ = two_layer_build
    last, early = FeatureCache.open(out), FeatureCache.open(out, layer="blocks.2")
    try:
        assert (last.layer, last.grid, last.channels) == ("blocks.6", (3, 3), 320)
        assert (early.layer, early.grid, early.channels) == ("blocks.2", (12, 12), 40)
        assert early.layers == last.layers == list(TWO_LAYERS)
        assert early.image_file(3) == last.image_file(3)
        assert early.first_stage().dims == default_dims(40) and last.first_stage().dims == default_dims(320)
        assert early.first_stage().codes.shape[1:3] == (12, 12)
        with pytest.raises(fmt.CacheError, match="no layer 'blocks.9'.*blocks.6, blocks.2"):
            FeatureCache.open(out, layer="blocks.9")
    finally:
        last.metadata.close()
        early.metadata.close()


def test_an_interrupted_multi_layer_build_resumes_to_identical_arrays(tmp_path):
    sources = [parse_source("demo", SourceOptions(demo_size=16))]
    options = BuildOptions(**SMALL, layers=TWO_LAYERS, index=False)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    build_cache(sources, clean, options)

    def stop(done: int, total: int) -> None:
        if done >= 8:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_cache(sources, resumed, options, on_progress=stop)
    build_cache(sources, resumed, options)
    assert_same_cache(clean, resumed)
    assert_same_cache(clean / "layers" / "01", resumed / "layers" / "01", images=False)


def test_a_single_layer_build_does_not_resume_as_a_two_layer_one(built, built_sources):
    with pytest.raises(BuildError, match="different cache"):
        build_cache(built_sources, built[0], BuildOptions(**SMALL, layers=TWO_LAYERS))


@pytest.mark.parametrize("layers, message", [
    (("blocks.6", "blocks.6"), "distinct layers"),
    (("blocks.6", "block.2"), "no layer 'block.2'"),
    (("blocks.6", "classifier"), "not a \\(C, H, W\\) feature map"),
])
def test_bad_layer_lists_are_refused_before_any_work(layers, message, dataset, tmp_path):
    with pytest.raises(BuildError, match=message):
        build_cache([parse_source(f"folder:{dataset}")], tmp_path / "out", BuildOptions(**SMALL, layers=layers))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (lambda layers: layers[1].update(dir="../../etc"), "expected .*dir 'layers/01'"),
    (lambda layers: layers[1].update(name="blocks.6"), "expected a new name"),
    (lambda layers: layers[1].pop("grid"), "malformed"),
    (lambda layers: layers[0].update(name="blocks.5"), "first layer"),
])
def test_a_tampered_layer_list_is_refused(two_layer_build, tmp_path, change, message):
    copy = tmp_path / "copy"
    shutil.copytree(two_layer_build[0], copy)
    data = json.loads((copy / fmt.MANIFEST_FILE).read_text())
    change(data["layers"])
    (copy / fmt.MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(fmt.CacheError, match=message):
        FeatureCache.open(copy, layer="blocks.2")


def test_a_missing_layer_array_is_refused_by_name(two_layer_build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(two_layer_build[0], copy)
    (copy / "layers" / "01" / fmt.SQNORMS_FILE).unlink()
    FeatureCache.open(copy).metadata.close()  # the other layer still opens
    with pytest.raises(fmt.CacheError, match="layers/01.*sqnorms.npy is missing"):
        FeatureCache.open(copy, layer="blocks.2")
