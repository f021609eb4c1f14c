from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cache_builder.sources as sources_package
from cache_builder.errors import BuildError
from cache_builder.sources import SOURCES, SourceOptions, parse_source
from cache_builder.sources.base import split_domain


def save_image(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.mark.parametrize("spec, expected", [
    ("folder:/data/val@in", ("folder:/data/val", "in")),
    ("folder:/data/val", ("folder:/data/val", None)),
    ("csv:/data/a@b/manifest.csv", ("csv:/data/a@b/manifest.csv", None)),
    ("demo@out", ("demo", "out")),
])
def test_split_domain(spec, expected):
    assert split_domain(spec) == expected


def test_folder_source_labels_from_first_level(tmp_path):
    save_image(tmp_path / "cat" / "a.jpg")
    save_image(tmp_path / "cat" / "deep" / "b.png")
    save_image(tmp_path / "dog" / "c.webp")
    save_image(tmp_path / "loose.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    source = parse_source(f"folder:{tmp_path}@in")
    assert source.domain == "in"
    assert [(i.path, i.metadata["label"]) for i in source.items] == [
        ("loose.bmp", None), ("cat/a.jpg", "cat"), ("cat/deep/b.png", "cat"), ("dog/c.webp", "dog"),
    ]


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(BuildError, match="no images"):
        parse_source(f"folder:{tmp_path}")


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(BuildError, match="not a folder"):
        parse_source(f"folder:{tmp_path / 'nope'}")


def test_folder_symlink_outside_is_refused_unless_allowed(tmp_path):
    outside = save_image(tmp_path / "outside" / "secret.png")
    root = tmp_path / "root"
    save_image(root / "ok.png")
    (root / "link.png").symlink_to(outside)
    with pytest.raises(BuildError, match="outside"):
        parse_source(f"folder:{root}")
    items = parse_source(f"folder:{root}", SourceOptions(allow_outside=True)).items
    assert len(items) == 2


def test_csv_source_types_and_multilabel(tmp_path):
    save_image(tmp_path / "img" / "1.png")
    save_image(tmp_path / "img" / "2.png")
    (tmp_path / "m.csv").write_text(
        "path,age,score,taken,diagnoses,id\n"
        "img/1.png,61,0.5,2024-01-02,Effusion|Mass,a1\n"
        "img/2.png,,1.5,2024-03-04 10:00:00,No Finding,a2\n"
    )
    source = parse_source(f"csv:{tmp_path / 'm.csv'}@out", SourceOptions(multilabel=("diagnoses",)))
    first, second = source.items
    assert first.metadata["diagnoses"] == ["Effusion", "Mass"]
    assert second.metadata["diagnoses"] == ["No Finding"]
    assert second.metadata["age"] is None
    assert isinstance(first.metadata["taken"], pd.Timestamp)
    assert first.metadata["id_original"] == "a1"  # a user's `id` column may not clash with the row id
    assert Path(first.file) == (tmp_path / "img" / "1.png").resolve()


def test_parquet_manifest(tmp_path):
    save_image(tmp_path / "x.png")
    pd.DataFrame({"path": ["x.png"], "label": ["a"], "n": [3]}).to_parquet(tmp_path / "m.parquet")
    item = parse_source(f"csv:{tmp_path / 'm.parquet'}").items[0]
    assert item.metadata == {"label": "a", "n": 3}


def test_manifest_without_path_column(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(BuildError, match="no 'path' column"):
        parse_source(f"csv:{tmp_path / 'm.csv'}")


@pytest.mark.parametrize("bad, message", [("/etc/passwd", "absolute"), ("../outside.png", "escapes")])
def test_manifest_paths_may_not_leave_its_folder(tmp_path, bad, message):
    save_image(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.csv").write_text(f"path\n{bad}\n")
    with pytest.raises(BuildError, match=message):
        parse_source(f"csv:{tmp_path / 'data' / 'm.csv'}")


def test_manifest_symlink_leading_outside(tmp_path):
    outside = save_image(tmp_path / "outside.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "link.png").symlink_to(outside)
    (data / "m.csv").write_text("path\nlink.png\n")
    with pytest.raises(BuildError, match="outside"):
        parse_source(f"csv:{data / 'm.csv'}")
    assert parse_source(f"csv:{data / 'm.csv'}", SourceOptions(allow_outside=True)).items


def test_unknown_source_kind():
    with pytest.raises(BuildError, match="unknown source"):
        parse_source("s3:bucket/x")


def test_unknown_multilabel_column(tmp_path):
    save_image(tmp_path / "x.png")
    (tmp_path / "m.csv").write_text("path\nx.png\n")
    with pytest.raises(BuildError, match="--multilabel tags"):
        parse_source(f"csv:{tmp_path / 'm.csv'}", SourceOptions(multilabel=("tags",)))


def test_demo_source_is_deterministic():
    first = parse_source("demo", SourceOptions(demo_size=30))
    again = parse_source("demo", SourceOptions(demo_size=30))
    assert [i.metadata for i in first.items] == [i.metadata for i in again.items]
    assert len({i.metadata["location"] for i in first.items}) > 3
    assert np.all([i.demo_index == n for n, i in enumerate(first.items)])



def package_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each `from X import names` in a file of cache_builder/sources/, relative ones resolved."""
    imports = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = importlib.util.resolve_name("." * node.level + module, "cache_builder.sources")
            imports.append((module, [alias.name for alias in node.names]))
    return imports


def test_registry_holds_one_module_per_format_without_private_cross_imports():
    package = Path(sources_package.__file__).parent
    formats = {p.stem for p in package.glob("*.py")} - {"__init__", "base"}
    registered = set()
    for kind, lister in SOURCES.items():
        module = sys.modules[lister.__module__]
        assert module.__name__.startswith("cache_builder.sources."), kind
        assert callable(module.list_items) and module.list_items is lister, kind
        assert list(inspect.signature(lister).parameters) == ["arg", "options", "source"], kind
        registered.add(module.__name__.rpartition(".")[2])
    assert registered == formats  # every format module is registered, and nothing else

    with pytest.raises(BuildError, match="unknown source") as error:
        parse_source("s3:bucket/x")
    positions = [str(error.value).find(kind) for kind in SOURCES]
    assert -1 not in positions and positions == sorted(positions)  # all kinds, in registry order

    for path in package.glob("*.py"):
        for module, names in package_imports(path):
            if module.startswith("cache_builder.sources"):
                assert not [n for n in names if n.startswith("_")], f"{path.name} imports private names of {module}"
                if path.stem in formats:  # formats depend on base alone: no cycle, no format-to-format import
                    assert module == "cache_builder.sources.base", f"{path.name} imports {module}"


def manifest_with_own_columns(folder: Path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        save_image(folder / name)
    (folder / "m.csv").write_text("path,domain,source,hospital\na.png,in,nih,NIH\nb.png,out,padchest,San Juan\n"
                                  "c.png,,nih,NIH\n")
    return folder / "m.csv"


def test_a_manifests_domain_and_source_columns_are_its_own(tmp_path):
    source = parse_source(f"csv:{manifest_with_own_columns(tmp_path)}")
    assert [i.metadata["domain"] for i in source.items] == ["in", "out", None]
    assert [i.metadata["source"] for i in source.items] == ["nih", "padchest", "nih"]
    assert not any(k.endswith("_original") for i in source.items for k in i.metadata)
    assert source.remarks == []


def test_a_domain_tag_overrides_the_manifests_domain_and_says_so(tmp_path):
    source = parse_source(f"csv:{manifest_with_own_columns(tmp_path)}@out")
    assert source.domain == "out"
    assert source.remarks == ["@out overrides the manifest's own domain column for all 3 rows"]
    assert source.describe()["remarks"] == source.remarks


@pytest.mark.parametrize("columns, expected", [("path,label,wnid", "label"), ("path,species,site", "species"),
                                               ("path,category,class", "class"), ("path,site", None)])
def test_a_manifests_class_column_becomes_the_caches_label_column(tmp_path, columns, expected):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text(f"{columns}\na.png," + ",".join(["x"] * (columns.count(","))) + "\n")
    source = parse_source(f"csv:{tmp_path / 'm.csv'}")
    assert source.label_column == expected
    assert source.describe().get("label_column") == expected
