"""The generated demo dataset: determinism, balance, honest boxes, domain shifts and distinct locations."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cache_builder.sources import demo

ROOT = Path(__file__).resolve().parents[1]
FRAMES = demo.demo_frames()
INFRARED = {"loc07", "loc08"}


def pixels(index: int, seed: int = 0, size: int = 224, draw_animal: bool = True) -> np.ndarray:
    return np.asarray(demo._render(index, seed, size, draw_animal=draw_animal), dtype=np.int16)


def first_frames(predicate, count: int) -> list[demo.DemoFrame]:
    chosen = [f for f in FRAMES if predicate(f.metadata)][:count]
    assert len(chosen) == count
    return chosen


def digest(index: int, seed: int = 0) -> str:
    frame = demo.DemoFrame(index=index, metadata={})
    return hashlib.sha256(demo.render_demo_image(frame, seed=seed).tobytes()).hexdigest()


# --- determinism -----------------------------------------------------------------------------------------------


def test_render_returns_rgb_of_requested_size():
    for size in (224, 160):
        image = demo.render_demo_image(demo.demo_frames(3, size=size)[2], size=size)
        assert image.mode == "RGB" and image.size == (size, size)


def test_same_seed_and_index_give_identical_bytes_in_any_order():
    indices = [0, 7, 13, 500, 1499]
    forward = {i: digest(i) for i in indices}
    demo._location_background.cache_clear()
    demo._frame_textures.cache_clear()
    backward = {i: digest(i) for i in reversed(indices)}
    assert forward == backward


def test_other_process_renders_identical_bytes():
    indices = [1499, 42, 3]
    script = (
        "import hashlib; from cache_builder.sources import demo\n"
        f"for i in {indices}:\n"
        "    image = demo.render_demo_image(demo.DemoFrame(index=i, metadata={}))\n"
        "    print(hashlib.sha256(image.tobytes()).hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == [digest(i) for i in indices]


def test_different_seed_gives_different_images_and_assignment():
    assert all(digest(i, seed=0) != digest(i, seed=1) for i in range(5))
    other = demo.demo_frames(200, seed=1)
    assert [f.metadata for f in other] != [f.metadata for f in FRAMES[:200]]


def test_metadata_is_deterministic_and_independent_of_n():
    assert [f.metadata for f in demo.demo_frames(100)] == [f.metadata for f in FRAMES[:100]]
    assert [f.metadata for f in demo.demo_frames()] == [f.metadata for f in FRAMES]
    assert [f.index for f in FRAMES] == list(range(demo.DEFAULT_DEMO_SIZE))
    assert all(f.metadata["frame"] == f.index for f in FRAMES)
    with pytest.raises(ValueError):
        demo.demo_frames(-1)


# --- counts and metadata ---------------------------------------------------------------------------------------


def test_species_locations_and_domains_are_balanced_and_independent():
    assert len(FRAMES) == demo.DEFAULT_DEMO_SIZE == 1500
    assert len(demo.SPECIES) >= 6 and "empty" not in demo.SPECIES
    assert len(demo.LOCATIONS) >= 10 and demo.IN_DOMAIN_LOCATIONS < set(demo.LOCATIONS)
    species = Counter(f.metadata["species"] for f in FRAMES)
    assert set(species) == set(demo.SPECIES) | {"empty"}
    assert 0.12 <= species["empty"] / len(FRAMES) <= 0.18
    animals = [species[s] for s in demo.SPECIES]
    assert max(animals) <= 1.2 * min(animals)
    locations = Counter(f.metadata["location"] for f in FRAMES)
    assert set(locations) == set(demo.LOCATIONS)
    assert max(locations.values()) <= 1.2 * min(locations.values())
    for location in demo.LOCATIONS:  # every camera sees (nearly) every species
        seen = {f.metadata["species"] for f in FRAMES if f.metadata["location"] == location}
        assert len(seen - {"empty"}) >= len(demo.SPECIES) - 1, location


def test_domain_split_and_time_of_day():
    assert {f.metadata["domain"] for f in FRAMES} == {"in", "out"}
    for f in FRAMES:
        m = f.metadata
        assert set(m) == {"location", "domain", "species", "split", "time_of_day", "frame"} | {
            f"bbox_{k}" for k in ("x0", "y0", "x1", "y1")
        }
        assert m["domain"] == ("in" if m["location"] in demo.IN_DOMAIN_LOCATIONS else "out")
        assert m["split"] in ({"train", "val"} if m["domain"] == "in" else {"test"})
        assert m["time_of_day"] == ("night" if m["location"] in INFRARED else "day")
    in_domain = [f.metadata["split"] for f in FRAMES if f.metadata["domain"] == "in"]
    assert 0.14 <= in_domain.count("val") / len(in_domain) <= 0.26


def test_boxes_lie_inside_the_image_and_are_none_when_empty():
    for size in (224, 96):
        for f in demo.demo_frames(300, size=size):
            m = f.metadata
            box = [m["bbox_x0"], m["bbox_y0"], m["bbox_x1"], m["bbox_y1"]]
            if m["species"] == "empty":
                assert box == [None] * 4
            else:
                assert all(isinstance(v, int) for v in box)
                assert 0 <= box[0] and box[0] + 8 <= box[2] <= size
                assert 0 <= box[1] and box[1] + 8 <= box[3] <= size


# --- pixels ----------------------------------------------------------------------------------------------------


def test_animal_is_drawn_in_its_box_and_fills_it():
    # Six frames of each species; not at the foliage location, where leaves in front may hide the box edges.
    frames = [
        f for s in demo.SPECIES for f in first_frames(lambda m, s=s: m["species"] == s and m["location"] != "loc10", 6)
    ]
    for f in frames:
        m = f.metadata
        x0, y0, x1, y1 = m["bbox_x0"], m["bbox_y0"], m["bbox_x1"], m["bbox_y1"]
        changed = np.abs(pixels(f.index) - pixels(f.index, draw_animal=False)).sum(axis=2) > 0
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any(), f"frame {f.index}: pixels changed outside the box"
        ys, xs = np.nonzero(changed)
        tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) - [x0, y0, x1, y1]
        assert np.abs(tight).max() <= 2, f"frame {f.index} ({m['species']}): box is not tight {tight}"
        assert changed[y0:y1, x0:x1].mean() > 0.15, f"frame {f.index}: animal covers little of its box"


def test_animal_stands_out_from_the_background_everywhere():
    frames = [
        f
        for loc in demo.LOCATIONS
        for f in first_frames(lambda m, loc=loc: m["location"] == loc and m["species"] != "empty", 3)
    ]
    for f in frames:
        m = f.metadata
        box = (slice(m["bbox_y0"], m["bbox_y1"]), slice(m["bbox_x0"], m["bbox_x1"]))
        difference = np.abs(pixels(f.index) - pixels(f.index, draw_animal=False))[box].max(axis=2)
        visible = (difference >= 20).mean()  # share of the box clearly changed by the animal
        assert visible > 0.1, f"frame {f.index} ({m['location']}, {m['species']}): animal barely visible"


def test_empty_frames_equal_their_background():
    for f in first_frames(lambda m: m["species"] == "empty", 5):
        assert np.array_equal(pixels(f.index), pixels(f.index, draw_animal=False))


def test_infrared_frames_are_grayscale_and_others_are_not():
    for f in first_frames(lambda m: m["location"] in INFRARED, 10):
        rgb = pixels(f.index)
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    for f in first_frames(lambda m: m["location"] not in INFRARED, 20):
        rgb = pixels(f.index)
        assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 3, f.metadata["location"]


def test_infrared_eyes_shine():
    for f in first_frames(lambda m: m["location"] in INFRARED and m["species"] != "empty", 5):
        assert pixels(f.index).max() == 255 and pixels(f.index, draw_animal=False).max() < 255


def descriptor(index: int) -> np.ndarray:
    """Coarse layout (4x4 mean colour) plus texture (mean absolute gradient) of a frame's background."""
    image = pixels(index, draw_animal=False).astype(np.float32)
    layout = image.reshape(4, 56, 4, 56, 3).mean(axis=(1, 3)).ravel()
    texture = np.abs(np.diff(image, axis=1)).mean() + np.abs(np.diff(image, axis=0)).mean()
    return np.concatenate([layout, [4 * texture]])


def test_each_location_has_its_own_background():
    per_location = {
        loc: [descriptor(f.index) for f in first_frames(lambda m, loc=loc: m["location"] == loc, 4)]
        for loc in demo.LOCATIONS
    }
    centroids = {loc: np.mean(d, axis=0) for loc, d in per_location.items()}
    names = list(centroids)
    for a in names:
        for b in names:
            if a < b:
                distance = np.abs(centroids[a] - centroids[b]).mean()
                assert distance > 10, f"{a} and {b} look alike ({distance:.1f})"
    for loc, descriptors in per_location.items():  # frame-to-frame variation stays below location differences
        for d in descriptors:
            nearest = min(names, key=lambda other: np.abs(centroids[other] - d).mean())
            assert nearest == loc


def test_species_differ_in_colour_and_shape():
    """Nearest-centroid on (mean animal colour, box aspect) separates the species in the in-domain frames."""

    def features(f: demo.DemoFrame) -> np.ndarray:
        m = f.metadata
        box = (slice(m["bbox_y0"], m["bbox_y1"]), slice(m["bbox_x0"], m["bbox_x1"]))
        image, background = pixels(f.index)[box], pixels(f.index, draw_animal=False)[box]
        animal = image[np.abs(image - background).sum(axis=2) > 0]
        aspect = (m["bbox_x1"] - m["bbox_x0"]) / (m["bbox_y1"] - m["bbox_y0"])
        return np.concatenate([animal.mean(axis=0), [60 * aspect]])

    samples = {
        s: [features(f) for f in first_frames(lambda m, s=s: m["species"] == s and m["domain"] == "in", 8)]
        for s in demo.SPECIES
    }
    centroids = {s: np.mean(v, axis=0) for s, v in samples.items()}
    hits = [
        min(centroids, key=lambda c: np.linalg.norm(centroids[c] - x)) == s for s, xs in samples.items() for x in xs
    ]
    assert np.mean(hits) >= 0.9
