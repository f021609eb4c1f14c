"""Each public dataset format, from fixtures written in its exact on-disk layout (tiny images, messy rows)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from cache_builder.build import BuildOptions, build_cache
from cache_builder.errors import BuildError
from cache_builder.sources import SourceOptions, parse_source
from cache_builder import cache_format as fmt

SMALL = dict(model="efficientnet_lite0", image_size=64, batch_size=4, workers=0)
RNG = np.random.default_rng(0)


def noise_image(path: Path, size=(24, 20), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(RNG.integers(0, 65535, size=size[::-1], dtype=np.uint16)).save(path)
    elif mode == "L":
        Image.fromarray(RNG.integers(0, 255, size=size[::-1], dtype=np.uint8)).save(path)
    else:
        Image.fromarray(RNG.integers(0, 255, size=(*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def table(cache: Path) -> tuple[dict[str, str], list[dict]]:
    con = duckdb.connect(str(cache / fmt.METADATA_FILE), read_only=True)
    types = {name: kind for name, kind, *_ in con.execute("DESCRIBE images").fetchall()}
    result = con.execute("SELECT * FROM images ORDER BY id")
    names = [d[0] for d in result.description]
    return types, [dict(zip(names, row)) for row in result.fetchall()]  # NULL stays None


# --------------------------------------------------------------------------------------------- iWildCam


@pytest.fixture(scope="module")
def iwildcam(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("iwildcam")
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        noise_image(root / "train" / name)
    (root / "categories.csv").write_text("y,category_id,name\n0,0,empty\n1,3,ocelot\n2,7,tapir\n")
    (root / "metadata.csv").write_text(
        ",split,location_remapped,location,sequence,datetime,y,filename,image_id,extra\n"
        "0,train,12,120,s1,2013-06-05 10:00:00.000,1,a.jpg,i1,x\n"
        "1,val,3,30,s2,2014-01-01 23:59:00.000,2,b.jpg,i2,x\n"
        "2,id_test,12,120,s1,2013-06-05 10:00:01.000,9,c.jpg,i3,x\n"  # unknown category id
        "3,test,4,40,s3,not a date,0,missing.jpg,i4,x\n"  # no image file
        "4,train,12,120,s1,2013-06-05 10:00:02.000,1,a.jpg,i5,x\n"  # duplicated image
        "5,test,4,40,s4,2015-02-02 02:02:02.000,0,d.jpg,i6,x\n"
    )
    return root


def test_iwildcam_columns_types_and_counts(iwildcam, tmp_path):
    source = parse_source(f"iwildcam:{iwildcam}")
    assert dict(source.notes) == {"unknown category ids": 1, "rows without an image file": 1,
                                  "duplicated image ids": 1}
    manifest = build_cache([source], tmp_path, BuildOptions(**SMALL))
    assert manifest.sources[0]["dropped"]["rows without an image file"] == 1
    types, rows = table(tmp_path)
    assert types["datetime"].startswith("TIMESTAMP") and types["species"] == "VARCHAR"
    assert [(r["location"], r["species"], r["split"], r["domain"]) for r in rows] == [
        ("loc0012", "ocelot", "train", "in"), ("loc0003", "tapir", "val", "out"),
        ("loc0012", None, "id_test", "in"), ("loc0004", "empty", "test", "out"),
    ]
    assert rows[0]["sequence"] == "s1" and str(rows[1]["datetime"]) == "2014-01-01 23:59:00"


def test_iwildcam_split_selection(iwildcam):
    source = parse_source(f"iwildcam:{iwildcam}", SourceOptions(splits=("val", "test")))
    assert [i.metadata["split"] for i in source.items] == ["val", "test"]
    with pytest.raises(BuildError, match="iWildCam splits"):
        parse_source(f"iwildcam:{iwildcam}", SourceOptions(splits=("dev",)))


def test_iwildcam_missing_columns(tmp_path):
    (tmp_path / "metadata.csv").write_text("split,filename\ntrain,a.jpg\n")
    (tmp_path / "categories.csv").write_text("y,name\n0,empty\n")
    with pytest.raises(BuildError, match="location_remapped, y"):
        parse_source(f"iwildcam:{tmp_path}")


# ------------------------------------------------------------------------------------------ ChestX-ray14


@pytest.fixture(scope="module")
def chestxray(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chestxray")
    noise_image(root / "images_001" / "images" / "00000001_000.png", mode="I;16")
    noise_image(root / "images_002" / "images" / "00000002_000.png", mode="L")
    noise_image(root / "images_002" / "images" / "00000003_001.png", mode="L")
    (root / "Data_Entry_2017_v2020.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
        "00000002_000.png,No Finding,0,2,81,F,AP,2500,2048,0.168,0.168,\n"
        "00000003_001.png,Mass,1,3,41,M,PA,2500,2048,0.168,0.168,\n"
        "00000004_000.png,Nodule,0,4,30,F,PA,2500,2048,0.168,0.168,\n"  # image not downloaded
        "00000002_000.png,No Finding,0,2,81,F,AP,2500,2048,0.168,0.168,\n"  # duplicated
    )
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Cardiomegaly,225.08,547.01,86.78,79.19,,,\n"
    )
    return root


def test_chestxray14_columns_lists_and_grayscale(chestxray, tmp_path):
    source = parse_source(f"chestxray14:{chestxray}")
    assert dict(source.notes) == {"rows without an image file": 1, "duplicated image ids": 1}
    build_cache([source], tmp_path, BuildOptions(**SMALL))
    types, rows = table(tmp_path)
    assert types["diagnoses"] == "VARCHAR[]" and types["bbox_labels"] == "VARCHAR[]"
    assert types["age"] == "BIGINT" and types["patient_id"] == "BIGINT" and types["follow_up"] == "BIGINT"
    first, second, third = rows
    assert list(first["diagnoses"]) == ["Cardiomegaly", "Effusion"] and list(second["diagnoses"]) == ["No Finding"]
    assert (first["patient_id"], first["age"], first["sex"], first["view_position"]) == (1, 58, "M", "PA")
    assert third["follow_up"] == 1
    assert list(first["bbox_labels"]) == ["Cardiomegaly"]
    assert json.loads(first["bboxes"]) == [["Cardiomegaly", 225.1, 547.0, 86.8, 79.2]]
    assert second["bboxes"] is None
    # the 16-bit and 8-bit grayscale X-rays become gray RGB images the model can read
    for image_id in range(3):
        pixels = np.asarray(Image.open(tmp_path / fmt.image_relpath(image_id)).convert("RGB"), dtype=int)
        assert np.ptp(pixels, axis=2).max() <= 8 and pixels.std() > 10


def test_chestxray14_without_index(tmp_path):
    with pytest.raises(BuildError, match="Data_Entry_2017"):
        parse_source(f"chestxray14:{tmp_path}")


# ------------------------------------------------------------------------------------- COCO Camera Traps


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    for name in ("loc1/a.jpg", "loc1/b.jpg", "loc2/c.jpg"):
        noise_image(root / "images" / name)
    index = {
        "images": [
            {"id": "a", "file_name": "loc1/a.jpg", "location": "loc1", "datetime": "2019-05-01 08:00:00",
             "seq_id": "s1", "width": 24, "height": 20},
            {"id": "b", "file_name": "loc1/b.jpg", "location": "loc1", "datetime": "2019-05-01 08:00:01",
             "seq_id": "s1"},
            {"id": "c", "file_name": "loc2/c.jpg", "location": "loc2", "datetime": "2019-06-01 22:00:00",
             "seq_id": "s2"},
            {"id": "gone", "file_name": "loc3/x.jpg", "location": "loc3"},
            {"id": "a", "file_name": "loc1/a.jpg", "location": "loc1"},
        ],
        "annotations": [
            {"id": 1, "image_id": "a", "category_id": 1, "bbox": [1, 2, 3, 4]},
            {"id": 2, "image_id": "a", "category_id": 2, "bbox": [5, 6, 7, 8]},
            {"id": 3, "image_id": "a", "category_id": 1},
            {"id": 4, "image_id": "c", "category_id": 99},
        ],
        "categories": [{"id": 0, "name": "empty"}, {"id": 1, "name": "deer"}, {"id": 2, "name": "coyote"}],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "in_locations.txt").write_text("loc1\n")
    return root


def test_coco_cameratraps_species_lists_and_domains(coco, tmp_path):
    options = SourceOptions(domain_locations=str(coco / "in_locations.txt"))
    source = parse_source(f"coco-cameratraps:{coco / 'index.json'}:{coco / 'images'}", options)
    assert dict(source.notes) == {"unknown category ids": 1, "rows without an image file": 1,
                                  "duplicated image ids": 1}
    build_cache([source], tmp_path, BuildOptions(**SMALL))
    types, rows = table(tmp_path)
    assert types["species"] == "VARCHAR[]" and types["datetime"].startswith("TIMESTAMP")
    assert types["bbox_count"] == "BIGINT"
    assert [(list(r["species"]), r["domain"], r["bbox_count"]) for r in rows] == [
        (["coyote", "deer"], "in", 2), ([], "in", 0), (["unknown"], "out", 0),
    ]
    assert rows[0]["seq_id"] == "s1" and rows[2]["location"] == "loc2"


def test_coco_cameratraps_bad_inputs(coco, tmp_path):
    with pytest.raises(BuildError, match="not a JSON file"):
        parse_source(f"coco-cameratraps:{tmp_path / 'none.json'}")
    (tmp_path / "bad.json").write_text('{"annotations": []}')
    with pytest.raises(BuildError, match="not COCO Camera Traps"):
        parse_source(f"coco-cameratraps:{tmp_path / 'bad.json'}")
    with pytest.raises(BuildError, match="--domain-locations"):
        parse_source(f"coco-cameratraps:{coco / 'index.json'}:{coco / 'images'}",
                     SourceOptions(domain_locations=str(tmp_path / "nope.txt")))
    escape = {"images": [{"id": 1, "file_name": "../../etc/passwd"}], "annotations": [], "categories": []}
    (tmp_path / "escape.json").write_text(json.dumps(escape))
    with pytest.raises(BuildError, match="escapes"):
        parse_source(f"coco-cameratraps:{tmp_path / 'escape.json'}")


# ----------------------------------------------------------------------------------------------- ImageNet


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for domain in ("val", "sketch"):
        for wnid in ("n02124075", "n01440764"):
            for i in range(3):
                noise_image(root / domain / wnid / f"{domain}_{i}.JPEG")
    noise_image(root / "val" / "n99999999" / "odd.JPEG")
    weird = os.fsencode(str(root / "sketch" / "n01440764")) + b"/caf\xe9.png"  # a Latin-1 file name
    noise_image(Path(os.fsdecode(weird)))
    return root


def test_imagenet_domains_line_up_by_wnid(imagenet, tmp_path):
    val = parse_source(f"imagenet:{imagenet / 'val'}@in")
    sketch = parse_source(f"imagenet:{imagenet / 'sketch'}@out")
    assert dict(val.notes) == {"images of unknown wnids": 1}
    labels = {i.metadata["wnid"]: i.metadata["label"] for i in val.items}
    assert labels == {"n01440764": "tench", "n02124075": "Egyptian cat", "n99999999": None}
    assert any("\ufffd" in i.path for i in sketch.items)  # a non-UTF-8 name is kept, shown readably
    build_cache([val, sketch], tmp_path / "shift", BuildOptions(**SMALL))
    types, rows = table(tmp_path / "shift")
    assert types["wnid"] == "VARCHAR" and types["label"] == "VARCHAR"
    assert {r["domain"] for r in rows} == {"in", "out"} and len(rows) == 14


def test_a_multi_source_cache_shows_the_in_out_split_in_the_dashboard(imagenet, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dashboard.settings import CACHES_DIR_ENV
    from dashboard.ui.widgets import REGION_OVERRIDE_KEY

    build_cache([parse_source(f"imagenet:{imagenet / 'val'}@in"),
                 parse_source(f"imagenet:{imagenet / 'sketch'}@out")],
                tmp_path / "shift", BuildOptions(**SMALL))
    monkeypatch.setenv(CACHES_DIR_ENV, str(tmp_path))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
    at.switch_page("pages/search.py")
    at.query_params["k"] = "50"
    at.session_state[REGION_OVERRIDE_KEY] = np.ones((2, 2), dtype=np.float32)
    at.run()
    assert not at.exception
    assert any("Searched 13 of 14 images" in c.value for c in at.caption)
    assert set(at.dataframe[0].value["domain"]) == {"in", "out"}
    assert at.selectbox(key="chart-column").value == "domain"
    assert len(at.get("plotly_chart")) >= 3


def test_unknown_kind_and_missing_root(tmp_path):
    with pytest.raises(BuildError, match="imagenet:PATH"):
        parse_source("imagenette:/x")
    with pytest.raises(BuildError, match="not a folder"):
        parse_source(f"imagenet:{tmp_path / 'none'}")
    shutil.rmtree(tmp_path)
