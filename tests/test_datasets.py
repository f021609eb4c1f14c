"""Real dataset sources fed messy input: every kind of bad row is counted or refused, never a crash mid-build.

The well-formed path of each format (and the multi-source dashboard check) is in test_dataset_formats.py; here
the fixtures are written in the same on-disk formats but hold the rows real downloads get wrong: non-UTF-8
names, unknown ids, EXIF-style dates, a second index table, RGBA and 16-bit PNGs, links out of the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from cache_builder.build import BuildOptions, build_cache
from cache_builder.errors import BuildError
from cache_builder.sources import SourceOptions, base, imagenet, parse_source
from cache_builder import cache_format as fmt

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model="efficientnet_lite0", image_size=64, batch_size=4, workers=0)
CHEST_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")


def image(path: Path | bytes, value=(90, 120, 150), mode="RGB", size=(16, 12)) -> None:
    """A constant image, so the cached crop's pixels can be checked exactly; `path` may be bytes (any name)."""
    path = Path(os.fsdecode(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], value, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, value).save(path)


def latin1(folder: Path, name: bytes) -> bytes:
    return os.fsencode(str(folder)) + b"/" + name


def table(cache: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """Column types and rows keyed by path (NULL stays None)."""
    with duckdb.connect(str(cache / fmt.METADATA_FILE), read_only=True) as con:
        types = {name: kind for name, kind, *_ in con.execute("DESCRIBE images").fetchall()}
        result = con.execute("SELECT * FROM images ORDER BY id")
        names = [d[0] for d in result.description]
        rows = [dict(zip(names, row)) for row in result.fetchall()]
    return types, {row["path"]: row for row in rows}


def cached_pixels(cache: Path, image_id: int) -> np.ndarray:
    """The picture of a cached image: whole-frame caches letterbox images of other shapes, padding left out."""
    pixels = np.asarray(Image.open(cache / fmt.image_relpath(image_id)).convert("RGB"), dtype=int)
    if (cache / fmt.FRAMES_FILE).is_file():
        x0, y0, x1, y1 = np.load(cache / fmt.FRAMES_FILE)[image_id]
        pixels = pixels[y0 + 8:y1 - 8, x0 + 8:x1 - 8]  # JPEG blocks at the edge blend in the padding
    return pixels


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def messy_iwildcam(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("iwildcam_messy")
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        image(root / "train" / name)
    image(latin1(root / "train", b"caf\xe9.jpg"))
    (root / "categories.csv").write_text("y,category_id,name\n0,0,empty\n1,3,ocelot\nbad,9,weird\n")
    # columns in another order, WILDS' extra columns, no `sequence` column at all
    (root / "metadata.csv").write_bytes(
        b"filename,y,split,location_remapped,datetime,seq_num_frames,frame_num,__index__\n"
        b"a.jpg,1,train,0,2013-06-05 10:00:00.000,3,1,0\n"
        b"b.jpg,0,id_val,7,2013:06:05 10:00:01,3,2,1\n"  # an EXIF-style date
        b"caf\xe9.jpg,1,test,2,2013-06-05 10:00:02.000,3,3,2\n"  # not UTF-8: its file cannot be matched
        b",1,test,2,2013-06-05 10:00:03.000,1,1,3\n"  # no file name
        b"a.jpg,1,train,0,2013-06-05 10:00:00.000,3,1,4\n"  # duplicated
        b"c.jpg,42,val,5,garbage,1,1,5\n"  # unknown category id, a date that is not one
    )
    return root


@pytest.fixture(scope="module")
def messy_chestxray(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chestxray_messy")
    image(root / "images_001" / "images" / "00000001_000.png", value=51400, mode="I;16")  # 51400 / 257 = 200
    image(root / "images_002" / "images" / "00000002_000.png", value=77, mode="L")
    image(root / "images_002" / "images" / "00000003_000.png", value=(30, 60, 90, 255), mode="RGBA")
    image(root / "images_002" / "images" / "00000005_000.png", value=10, mode="L")  # only in the old table
    image(root / "other" / "00000006_000.png", value=10, mode="L")  # not under an images* folder
    image(latin1(root / "images_002" / "images", b"0000000\xe9_000.png"), value=10, mode="L")
    (root / "Data_Entry_2017.csv").write_text(CHEST_HEADER + "00000005_000.png,Mass,0,5,40,M,PA,1,1,0.1,0.1,\n")
    (root / "Data_Entry_2017_v2020.csv").write_bytes(CHEST_HEADER.encode() + (
        b"00000001_000.png,Effusion|Mass,2,1,058Y,M,PA,2682,2749,0.143,0.143,\n"  # the early "058Y" ages
        b",,,,,,,,,,,\n"  # an empty row
        b"00000002_000.png,,0,2,81,F,AP,2500,2048,0.168,0.168,\n"  # no findings at all
        b"00000003_000.png,No Finding,0,3,x,,AP,2500,2048,0.168,0.168,\n"  # an age that is not one, no sex
        b"00000004_000.png,Nodule,0,4,30,F,PA,2500,2048,0.168,0.168,\n"  # image not downloaded
        b"00000006_000.png,Nodule,0,6,30,F,PA,2500,2048,0.168,0.168,\n"  # outside images*/
        b"0000000\xe9_000.png,Mass,0,7,30,F,PA,2500,2048,0.168,0.168,\n"  # not UTF-8
    ))
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Effusion,10,20,30,40,,,\n"
        "00000001_000.png,Mass,1.26,2,3,4,,,\n"
        "00000003_000.png,Mass,n/a,2,3,4,,,\n"  # a box that is not numbers: ignored
        "00000004_000.png,Nodule,1,2,3,4,,,\n"  # a box of an image that is not there
    )
    return root


@pytest.fixture(scope="module")
def messy_coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco_messy")
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        image(root / "images" / name)
    image(latin1(root / "images", b"caf\xe9.jpg"))
    images = [
        {"id": 1, "file_name": "a.jpg", "location": 3, "datetime": "2019:05:01 08:00:00", "seq_id": 10},
        {"id": "2", "file_name": "b.jpg", "location": "3", "datetime": "2019-05-01T08:00:01+02:00"},
        {"id": [3], "file_name": "c.jpg", "location": "north", "datetime": "never"},  # an id of the wrong type
        {"file_name": "d.jpg"},  # no id
        {"id": 5, "file_name": "caf\u00e9.jpg"},  # written below as a Latin-1 byte: not UTF-8
        "not an object",
    ]
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}, 7,
                   {"image_id": [3], "category_id": 2, "bbox": [0, 0, 1, 1]}]
    text = json.dumps({"images": images, "annotations": annotations,
                       "categories": [{"id": 1, "name": "deer"}, {"id": 2, "name": "fox"}, {"name": "no id"}]},
                      ensure_ascii=False)
    (root / "index.json").write_bytes(text.encode().replace(b"\xc3\xa9", b"\xe9"))
    (root / "in.txt").write_text("3\n\n")
    return root


@pytest.fixture(scope="module")
def messy_cache(messy_iwildcam, messy_chestxray, tmp_path_factory) -> tuple[Path, fmt.Manifest]:
    """One real build of both CSV-indexed formats' messy fixtures."""
    out = tmp_path_factory.mktemp("messy_cache")
    sources = [parse_source(f"iwildcam:{messy_iwildcam}"), parse_source(f"chestxray14:{messy_chestxray}")]
    return out, build_cache(sources, out, BuildOptions(**SMALL))


@pytest.fixture(scope="module")
def coco_cache(messy_coco, tmp_path_factory) -> tuple[Path, fmt.Manifest]:
    out = tmp_path_factory.mktemp("coco_cache")
    source = parse_source(f"coco-cameratraps:{messy_coco / 'index.json'}:{messy_coco / 'images'}",
                          SourceOptions(domain_locations=str(messy_coco / "in.txt")))
    return out, build_cache([source], out, BuildOptions(**SMALL))


# ------------------------------------------------------------------------------------------------ iWildCam


def test_iwildcam_messy_rows_are_counted_and_never_reach_the_builder(messy_iwildcam):
    source = parse_source(f"iwildcam:{messy_iwildcam}")
    assert [item.path for item in source.items] == ["train/a.jpg", "train/b.jpg", "train/c.jpg"]
    assert dict(source.notes) == {base.NOT_UTF8: 1, base.MISSING_FILE: 1, base.DUPLICATE: 1,
                                  base.UNKNOWN_CATEGORY: 1}
    assert source.describe()["dropped"] == dict(source.notes) and source.describe()["label_column"] == "species"


def test_iwildcam_messy_build_columns(messy_cache):
    out, manifest = messy_cache
    assert manifest.sources[0]["dropped"][base.NOT_UTF8] == 1 and not manifest.skipped
    types, rows = table(out)
    assert types["datetime"].startswith("TIMESTAMP") and types["location"] == "VARCHAR"
    a, b, c = rows["train/a.jpg"], rows["train/b.jpg"], rows["train/c.jpg"]
    assert (a["location"], a["species"], a["split"], a["domain"]) == ("loc0000", "ocelot", "train", "in")
    assert (b["location"], b["species"], b["domain"], str(b["datetime"])) == ("loc0007", "empty", "in",
                                                                               "2013-06-05 10:00:01")
    assert (c["species"], c["domain"], c["datetime"], c["sequence"]) == (None, "out", None, None)


@pytest.mark.parametrize("metadata, categories, message", [
    ("split,filename\ntrain,a.jpg\n", "y,name\n0,empty\n", "location_remapped, y"),
    ("split,location_remapped,y,filename\ntrain,1,0,a.jpg\n", "y,category_id\n0,0\n", "column.s. name"),
    ("split,location_remapped,y,filename\ntrain,1,0,../../outside.jpg\n", "y,name\n0,empty\n", "escapes"),
    ("split,location_remapped,y,filename\ntrain,1,0,/etc/hostname\n", "y,name\n0,empty\n", "absolute"),
])
def test_iwildcam_bad_index_files_are_one_line_errors(tmp_path, metadata, categories, message):
    (tmp_path / "metadata.csv").write_text(metadata)
    (tmp_path / "categories.csv").write_text(categories)
    with pytest.raises(BuildError, match=message):
        parse_source(f"iwildcam:{tmp_path}")


def test_iwildcam_without_categories_file(tmp_path):
    (tmp_path / "metadata.csv").write_text("split,location_remapped,y,filename\n")
    with pytest.raises(BuildError, match="categories.csv does not exist"):
        parse_source(f"iwildcam:{tmp_path}")


# ------------------------------------------------------------------------------------------ ChestX-ray14


def test_chestxray14_messy_rows_are_counted(messy_chestxray):
    source = parse_source(f"chestxray14:{messy_chestxray}")
    assert [item.path for item in source.items] == [
        "images_001/images/00000001_000.png", "images_002/images/00000002_000.png",
        "images_002/images/00000003_000.png",
    ]  # the v2020 table wins over the 2017 one; files outside images*/ are not looked at
    assert dict(source.notes) == {base.MISSING_FILE: 3, base.NOT_UTF8: 1}  # incl. the empty row
    assert source.describe()["label_column"] == "diagnoses"


def test_chestxray14_messy_build_columns_and_grayscale_pixels(messy_cache):
    out, manifest = messy_cache
    assert manifest.frame == "fit"  # with iwildcam's wide frames in the cache, the square X-rays are letterboxed
    types, rows = table(out)
    assert types["diagnoses"] == "VARCHAR[]" and types["bbox_labels"] == "VARCHAR[]" and types["age"] == "BIGINT"
    first = rows["images_001/images/00000001_000.png"]
    second = rows["images_002/images/00000002_000.png"]
    third = rows["images_002/images/00000003_000.png"]
    assert list(first["diagnoses"]) == ["Effusion", "Mass"] and first["age"] == 58 and first["follow_up"] == 2
    assert list(first["bbox_labels"]) == ["Effusion", "Mass"]
    assert json.loads(first["bboxes"]) == [["Effusion", 10.0, 20.0, 30.0, 40.0], ["Mass", 1.3, 2.0, 3.0, 4.0]]
    assert list(second["diagnoses"]) == [] and (second["sex"], second["age"]) == ("F", 81)
    assert list(third["diagnoses"]) == ["No Finding"] and (third["age"], third["sex"]) == (None, None)
    assert list(third["bbox_labels"]) == [] and third["bboxes"] is None
    # 16-bit (scaled by 1/257), 8-bit grayscale and RGBA PNGs reach the model as the right RGB pixels
    for row, expected in ((first, (200, 200, 200)), (second, (77, 77, 77)), (third, (30, 60, 90))):
        pixels = cached_pixels(out, row["id"])
        assert np.abs(pixels - np.array(expected)).max() <= 2, (row["path"], pixels.mean(axis=(0, 1)))


def test_chestxray14_bad_index_files(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Patient ID\na.png,1\n")
    with pytest.raises(BuildError, match="lacks the column.s. Finding Labels"):
        parse_source(f"chestxray14:{tmp_path}")
    (tmp_path / "Data_Entry_2017.csv").write_text(CHEST_HEADER)
    (tmp_path / "BBox_List_2017.csv").write_text("Image Index,Finding Label\na.png,Mass\n")
    with pytest.raises(BuildError, match="four box columns"):
        parse_source(f"chestxray14:{tmp_path}")


def test_chestxray14_link_out_of_the_folder_needs_allow_outside(tmp_path):
    root, outside = tmp_path / "cxr", tmp_path / "elsewhere.png"
    image(outside, value=5, mode="L")
    (root / "images_001").mkdir(parents=True)
    (root / "images_001" / "a.png").symlink_to(outside)
    (root / "Data_Entry_2017.csv").write_text(CHEST_HEADER + "a.png,Mass,0,1,30,F,PA,1,1,0.1,0.1,\n")
    with pytest.raises(BuildError, match="outside"):
        parse_source(f"chestxray14:{root}")
    source = parse_source(f"chestxray14:{root}", SourceOptions(allow_outside=True))
    assert source.items[0].file == str(outside.resolve())


# ------------------------------------------------------------------------------------- COCO Camera Traps


def test_coco_cameratraps_messy_entries_are_counted(messy_coco):
    source = parse_source(f"coco-cameratraps:{messy_coco / 'index.json'}:{messy_coco / 'images'}")
    assert [item.path for item in source.items] == ["a.jpg", "b.jpg", "c.jpg"]
    assert dict(source.notes) == {"images entries that are not JSON objects": 1,
                                  "annotations entries that are not JSON objects": 1,
                                  "image entries without an id or file_name": 1, base.NOT_UTF8: 1}


def test_coco_cameratraps_messy_build_columns(coco_cache):
    out, manifest = coco_cache
    assert manifest.sources[0]["label_column"] == "species"
    types, rows = table(out)
    assert types["datetime"].startswith("TIMESTAMP") and types["species"] == "VARCHAR[]"
    a, b, c = rows["a.jpg"], rows["b.jpg"], rows["c.jpg"]
    assert str(a["datetime"]) == "2019-05-01 08:00:00"  # EXIF-style, not year 1
    assert str(b["datetime"]) == "2019-05-01 08:00:01" and c["datetime"] is None  # zone dropped; not a date
    assert [(r["location"], r["domain"], r["seq_id"]) for r in (a, b, c)] == [
        ("3", "in", "10"), ("3", "in", None), ("north", "out", None)]
    assert (list(a["species"]), a["bbox_count"]) == (["deer"], 1)
    assert (c["image_id"], list(c["species"]), c["bbox_count"]) == ("[3]", ["fox"], 1)


def test_coco_cameratraps_bad_files(messy_coco, tmp_path):
    for text, message in (('[1, 2]', 'no "images" list'), ('{"images": [], "annotations": {}}', "not a list"),
                          ("{not json", "not COCO Camera Traps JSON")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(BuildError, match=message):
            parse_source(f"coco-cameratraps:{tmp_path / 'bad.json'}")
    with pytest.raises(BuildError, match="image folder"):
        parse_source(f"coco-cameratraps:{messy_coco / 'index.json'}:{tmp_path / 'nowhere'}")


# ----------------------------------------------------------------------------------------------- ImageNet


def test_imagenet_labels_are_unique_class_names():
    labels = imagenet.imagenet_labels()
    assert len(labels) == 1000 and len(set(labels.values())) == 1000
    assert labels["n02012849"] == "crane (bird)" and labels["n01440764"] == "tench"


def test_imagenet_flat_or_loose_images(tmp_path):
    image(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(BuildError, match="no <wnid>/ class folders"):
        parse_source(f"imagenet:{tmp_path / 'flat'}")
    image(tmp_path / "flat" / "n01440764" / "a.JPEG")
    source = parse_source(f"imagenet:{tmp_path / 'flat'}@in")
    assert [i.metadata["label"] for i in source.items] == ["tench"]
    assert dict(source.notes) == {"images outside class folders": 1}
    assert source.describe()["label_column"] == "label"


def test_imagenet_files_named_by_wnid_carry_it_outside_class_folders(tmp_path):
    """A flattened copy (the shared real photos keep `images/n01443537_1.jpg`) silently got wnid "images"."""
    image(tmp_path / "flat" / "images" / "n01443537_10007.jpg")  # goldfish, in a folder that is no wnid
    image(tmp_path / "flat" / "n01440764_2.JPEG")  # tench, loose in the root
    image(tmp_path / "flat" / "n01440764" / "n09999999_3.JPEG")  # the class folder wins over the name
    image(tmp_path / "flat" / "misc" / "photo.jpg")  # no wnid anywhere: kept, unknown class, counted
    source = parse_source(f"imagenet:{tmp_path / 'flat'}")
    found = {item.path.rsplit("/", 1)[-1]: (item.metadata["wnid"], item.metadata["label"]) for item in source.items}
    assert found == {"n01443537_10007.jpg": ("n01443537", "goldfish"), "n01440764_2.JPEG": ("n01440764", "tench"),
                     "n09999999_3.JPEG": ("n01440764", "tench"), "photo.jpg": ("misc", None)}
    assert dict(source.notes) == {base.UNKNOWN_WNID: 1}


# --------------------------------------------------------------------------------------------- together


def test_label_column_of_every_source_kind(tmp_path):
    image(tmp_path / "cat" / "a.jpg")
    (tmp_path / "m.csv").write_text("path,label\ncat/a.jpg,cat\n")
    assert parse_source(f"folder:{tmp_path}").describe()["label_column"] == "label"
    assert parse_source("demo", SourceOptions(demo_size=2)).describe()["label_column"] == "species"
    assert parse_source(f"csv:{tmp_path / 'm.csv'}").describe()["label_column"] == "label"  # by its name


def test_cli_prints_one_note_per_reason_and_selects_splits(messy_iwildcam, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cache_builder", "build", "--source", f"iwildcam:{messy_iwildcam}", "--split", "val",
         "--split", "test", "--out", str(tmp_path / "c"), "--image-size", "64", "--batch-size", "4",
         "--workers", "0", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"note: iwildcam:{messy_iwildcam}: 1 {base.UNKNOWN_CATEGORY} (kept with an unknown class)" \
        in result.stderr
    assert f"1 {base.NOT_UTF8} (left out)" in result.stderr
    assert "(1 images," in result.stdout  # only c.jpg is in val/test
    _, rows = table(tmp_path / "c")
    assert list(rows) == ["train/c.jpg"]


def test_a_text_and_a_list_species_column_combine(messy_iwildcam, messy_coco, tmp_path):
    from cache_builder.metadata_table import metadata_frame

    sources = [parse_source(f"iwildcam:{messy_iwildcam}"),
               parse_source(f"coco-cameratraps:{messy_coco / 'index.json'}:{messy_coco / 'images'}")]
    frame = metadata_frame([(s, item) for s in sources for item in s.items])
    assert list(frame["species"].iloc[0]) == ["ocelot"]
