"""`build --ray` (cache_builder/ray_build.py) on a real two-node Ray cluster on loopback: the same cache as a
single-process build, through a model actor killed mid-build and a driver killed mid-build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache_builder import cache_format as fmt
from cache_builder import ray_build
from cache_builder.build import BuildOptions, build_cache
from cache_builder.cli import main as builder_main
from cache_builder.cluster import ClusterError
from cache_builder.ray_build import build_cache_on_ray
from cache_builder.sharding import read_shard_info
from cache_builder.sources import SourceOptions, parse_source
from dashboard.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(model="efficientnet_lite0", image_size=64, batch_size=4, workers=0, frame="crop", index=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """14 readable images in two classes, one corrupt file and one truncated one (both skipped)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i in range(7):
            Image.fromarray(rng.integers(0, 255, (40 + i, 56, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    (root / "cat" / "corrupt.jpg").write_bytes(b"not a jpeg")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory) -> FeatureCache:
    out = tmp_path_factory.mktemp("single")
    build_cache([parse_source(f"folder:{folder}")], out, BuildOptions(**OPTIONS))
    return FeatureCache.open(out)


def assert_same_cache(sharded: FeatureCache, single: FeatureCache) -> None:
    """Identical ids, metadata, images and skipped files; features within bfloat16 rounding."""
    assert sharded.size == single.size and sharded.sharded
    assert sharded.manifest.skipped == single.manifest.skipped
    assert sharded.metadata.rows(None).equals(single.metadata.rows(None))
    for image_id in range(single.size):
        a, b = sharded.image_features(image_id), single.image_features(image_id)
        # one bfloat16 step (other batch boundaries sum in another order; near zero, a step of a tiny value)
        np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-4)
        assert sharded.image_file(image_id).read_bytes() == single.image_file(image_id).read_bytes()


def test_a_ray_build_equals_a_single_process_build(ray_cluster, folder, single, tmp_path):
    out = tmp_path / "ray"
    seen = []
    manifest = build_cache_on_ray([parse_source(f"folder:{folder}")], out, BuildOptions(**{**OPTIONS, "index": True}),
                                  address=ray_cluster.address, shard_size=5, actors=2,
                                  on_progress=lambda done, total: seen.append((done, total)))
    assert manifest.status == fmt.STATUS_COMPLETE and len(manifest.skipped) == 2
    # 16 items in listing order by 5: cat/corrupt.jpg (item 8) is skipped from shard 1, and dog/truncated.png,
    # alone in shard 3, leaves it empty: an empty shard is a valid one
    assert [entry["count"] for entry in manifest.shards] == [5, 4, 5, 0]
    assert seen[-1] == (16, 16)
    cache = FeatureCache.open(out)
    assert_same_cache(cache, single)
    assert not list(out.glob("shards/*.parts")) and not (out / "build_state.json").exists()
    assert cache.first_stage().dims == 128 and len(cache.indexed_shards()) == 3  # the empty shard needs none


def test_a_multi_layer_ray_build_equals_a_single_process_one_at_every_layer(ray_cluster, folder, tmp_path):
    layers = {"layers": ("blocks.6", "blocks.2")}
    single = tmp_path / "single"
    build_cache([parse_source(f"folder:{folder}")], single, BuildOptions(**OPTIONS, **layers))
    out = tmp_path / "ray"
    manifest = build_cache_on_ray([parse_source(f"folder:{folder}")], out, BuildOptions(**OPTIONS, **layers),
                                  address=ray_cluster.address, shard_size=8, actors=1)
    assert manifest.layer_names == ["blocks.6", "blocks.2"] and len(manifest.shards) == 2
    for layer in manifest.layer_names:
        assert_same_cache(FeatureCache.open(out, layer), FeatureCache.open(single, layer))
    assert (out / "shards" / "00001" / "layers" / "01" / fmt.FEATURES_FILE).is_file()


def _processes(title: str) -> list[int]:
    """Pids of the processes whose command line holds `title` (Ray names actor processes after their class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and title in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_model_actor_killed_mid_build_still_gives_the_same_cache(ray_cluster, folder, single, tmp_path):
    killed = []

    def kill_an_actor(done: int, total: int) -> None:
        if done and not killed:
            pids = _processes("_Extract")
            assert pids, "no model actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    out = tmp_path / "ray"
    build_cache_on_ray([parse_source(f"folder:{folder}")], out, BuildOptions(**OPTIONS),
                       address=ray_cluster.address, shard_size=3, actors=1, on_progress=kill_an_actor)
    assert killed
    assert_same_cache(FeatureCache.open(out), single)


def test_a_driver_killed_mid_build_resumes_and_keeps_the_finished_shards(ray_cluster, tmp_path):
    # 16 images in 4 shards, one model actor: most of the time goes to starting Ray Data's workers, and after the
    # first shard three more batches are left, seconds of work, for the kill to land in
    args = [sys.executable, "-m", "cache_builder", "build", "--source", "demo", "--demo-size", "16",
            "--image-size", "64", "--batch-size", "4", "--no-index", "--quiet", "--ray", ray_cluster.address,
            "--shard-size", "4", "--actors", "1", "--out", str(tmp_path / "killed")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_shard = tmp_path / "killed" / "shards" / "00000"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and read_shard_info(first_shard) is None and driver.poll() is None:
            time.sleep(0.05)
        parts = list((tmp_path / "killed").glob("shards/*.parts/*.npz"))
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert fmt.read_manifest(tmp_path / "killed").status == fmt.STATUS_BUILDING
    with pytest.raises(fmt.CacheError, match="not complete"):
        FeatureCache.open(tmp_path / "killed")
    kept = first_shard / fmt.FEATURES_FILE
    written = kept.stat().st_mtime_ns
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert kept.stat().st_mtime_ns == written  # a finished shard is not redone
    resumed = FeatureCache.open(tmp_path / "killed")
    reference = tmp_path / "single"
    build_cache([parse_source("demo", SourceOptions(demo_size=16))], reference, BuildOptions(**OPTIONS))
    assert_same_cache(resumed, FeatureCache.open(reference))
    assert parts or read_shard_info(first_shard) is not None


def test_a_cluster_that_cannot_see_the_output_folder_is_refused(ray_cluster, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_build, "_write_probe", lambda probe: None)  # as if --out were local to the driver
    with pytest.raises(ClusterError, match=r"not visible from 2 of 2 Ray nodes.*shared storage|storage they all mount"):
        build_cache_on_ray([parse_source(f"folder:{folder}")], tmp_path / "out", BuildOptions(**OPTIONS),
                           address=ray_cluster.address, shard_size=5)
    assert not (tmp_path / "out" / fmt.MANIFEST_FILE).exists()


def test_an_unreachable_cluster_is_one_clear_error_before_any_work(folder, tmp_path, capsys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = builder_main(["build", "--source", f"folder:{folder}", "--out", str(tmp_path / "out"), "--quiet",
                         "--ray", f"127.0.0.1:{port}"])
    assert code == 2 and "no Ray cluster answers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = builder_main(["build", "--source", f"folder:{folder}", "--out", str(tmp_path / "out"), "--quiet",
                         "--ray", "--shard-size", "0"])
    assert code == 2 and "--shard-size must be a positive" in capsys.readouterr().err
