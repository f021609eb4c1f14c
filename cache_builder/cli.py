"""`python -m cache_builder`: a thin argparse layer over `build_cache`, `list_layers` and the manifest reader."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from cache_builder.errors import BuildError
from cache_builder.cache_format import CacheError

EPILOG = """\
sources (repeat --source to combine them into one cache; @DOMAIN tags each image's `domain` column):
  demo                  the built-in synthetic camera-trap dataset (1,500 images)
  folder:PATH           every image under PATH; the first-level subfolder becomes `label`
  csv:PATH              a CSV or Parquet manifest with a `path` column relative to its folder;
                        every other column is kept as typed metadata
  iwildcam:ROOT         WILDS iWildCam v2.0 (metadata.csv, categories.csv, train/)
  chestxray14:ROOT      NIH ChestX-ray14 (Data_Entry_2017*.csv, images*/, BBox_List_2017.csv)
  coco-cameratraps:JSON[:IMAGE_ROOT]   a LILA COCO Camera Traps JSON file
  imagenet:ROOT         ImageNet-style <wnid>/ class folders (val, -A, -R, -Sketch)
  --split SPLIT (iwildcam) and --domain-locations FILE (coco-cameratraps) select splits and domains
examples:
  python -m cache_builder build --source demo --out caches/demo
  python -m cache_builder build --source folder:val@in --source folder:sketch@out --out caches/shift
"""


def make_parser() -> argparse.ArgumentParser:
    from cache_builder.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="python -m cache_builder",
        description="Build a feature cache (features.npy + metadata.duckdb) from image datasets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build", help="extract one or more layers' features for every image into a cache folder",
        description="Extract one or more layers' feature maps for every image of the sources into --out, in one "
        "forward pass. Rerunning the same command resumes an interrupted build.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    build.add_argument("--source", action="append", required=True, metavar="SOURCE",
                       help="demo | folder:PATH | csv:PATH | iwildcam:ROOT | chestxray14:ROOT | "
                       "coco-cameratraps:JSON[:IMAGE_ROOT] | imagenet:ROOT, each optionally suffixed @DOMAIN "
                       "(repeatable; see the list below)")
    build.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model name (torchvision or timm) or TorchScript file (default: {DEFAULT_MODEL})")
    build.add_argument("--layer", action="append", dest="layers", metavar="LAYER",
                       help="module name whose output is cached (default: the model's default layer; see the "
                       "`layers` command); repeat it to cache several layers of the model in one cache, e.g. an "
                       "early one and the last, for the dashboard's layer sweep")
    build.add_argument("--out", required=True, type=Path, help="cache folder to create (or resume)")
    build.add_argument("--weights", help="weights file (state dict), or 'none' for random weights; default: the "
                       "model's pretrained weights from local files only")
    build.add_argument("--image-size", type=int, help="input side in pixels (default: the model's own)")
    build.add_argument("--frame", default="auto", choices=["auto", "crop", "fit"],
                       help="crop: the model's square centre crop; fit: whole frames at the dataset's dominant "
                       "aspect ratio, other shapes letterboxed; auto (default): per source (camera traps fit)")
    build.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    build.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                       help="where the model runs (default: auto = cuda, then mps, then cpu)")
    build.add_argument("--workers", type=int, help="DataLoader processes decoding images (default: the machine's "
                       "cores minus one, at least 1; 0 decodes in the main process)")
    build.add_argument("--overwrite", action="store_true", help="replace a different cache already in --out")
    build.add_argument("--limit", type=int, help="only the first N images (for a quick trial)")
    build.add_argument("--multilabel", action="append", default=[], metavar="COLUMN",
                       help="csv sources: store COLUMN as a list of labels (repeatable)")
    build.add_argument("--sep", default="|", help="separator of --multilabel values (default: |)")
    build.add_argument("--allow-outside", action="store_true",
                       help="let manifest paths and links point outside the source's folder")
    build.add_argument("--demo-size", type=int, help="number of images of the demo source (default: 1500)")
    build.add_argument("--split", action="append", default=[], metavar="SPLIT",
                       help="iwildcam sources: only this split (repeatable; train, id_val, id_test, val, test)")
    build.add_argument("--domain-locations", metavar="FILE",
                       help="coco-cameratraps sources: file of in-domain locations, one per line; others are out")
    build.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="extract on a Ray cluster (host:port; no address: a local one) and write the cache as "
                       "shards; --out must be on storage every node mounts")
    build.add_argument("--shard-size", type=int, help="--ray: images per shard (default: 50,000)")
    build.add_argument("--actors", type=int, help="--ray: model actors (default: one per GPU, else one per node)")
    build.add_argument("--no-index", action="store_true",
                       help="skip the first-stage index of two-tier search (add it later with `index`)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")

    index = commands.add_parser(
        "index", help="add (or rebuild) a cache's first-stage index for two-tier search",
        description="Project every cell of a complete cache onto its top principal directions: the first stage "
        "of `--mode approx` searches, whose candidates are then reranked exactly. Rerunning an interrupted "
        "command resumes it; the cache stays searchable meanwhile.",
    )
    index.add_argument("cache", type=Path, help="cache folder")
    index.add_argument("--dims", type=int, help="dimensions kept per cell, 4 bits each, a multiple of 32 "
                       "(default: 128, or half the channels rounded up to 32)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")

    shard = commands.add_parser(
        "shard", help="copy a cache into shards that separate machines can serve",
        description="Copy a complete cache into --out as shards of --shard-size images: the same ids, metadata "
        "and features, each shard with its own arrays, images and first-stage index. Searches of the copy give "
        "the same hits; `--ray` (or VFS_RAY_ADDRESS) serves its shards from Ray actors. Rerunning an "
        "interrupted command keeps the shards already written.",
    )
    shard.add_argument("cache", type=Path, help="the complete cache to split")
    shard.add_argument("--out", required=True, type=Path, help="folder of the sharded copy (new or resumed)")
    shard.add_argument("--shard-size", type=int, default=None,
                       help="images per shard (default: 50,000)")
    shard.add_argument("--no-index", action="store_true", help="skip the shards' first-stage indexes")
    shard.add_argument("--quiet", action="store_true", help="no progress bar")

    layers = commands.add_parser(
        "layers", help="list a model's modules with their output shapes",
        description="List every named module with its output shape (C, H, W) at the model's input size, "
        "to choose --layer. The default layer is marked with *.",
    )
    layers.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or TorchScript file (default: "
                        f"{DEFAULT_MODEL})")
    layers.add_argument("--weights", default="none",
                        help="weights do not change shapes, so none are loaded unless you pass a file")
    layers.add_argument("--image-size", type=int, help="input side in pixels (default: the model's own)")
    layers.add_argument("--all", action="store_true", help="also list modules whose output is not a feature map")

    info = commands.add_parser("info", help="print a cache's manifest and counts",
                               description="Print the manifest of a cache folder and its image counts.")
    info.add_argument("cache", type=Path, help="cache folder")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return parser


def run_build(args: argparse.Namespace) -> int:
    from cache_builder.build import BuildOptions, build_cache
    from cache_builder.sources import KEPT_REASONS, SourceOptions, parse_source

    source_options = SourceOptions(multilabel=tuple(args.multilabel), sep=args.sep,
                                   allow_outside=args.allow_outside, demo_size=args.demo_size,
                                   splits=tuple(args.split), domain_locations=args.domain_locations)
    sources = [parse_source(spec, source_options) for spec in args.source]
    for source in sources:
        for reason, count in source.notes.items():
            fate = "kept with an unknown class" if reason in KEPT_REASONS else "left out"
            print(f"note: {source.spec}: {count} {reason} ({fate})", file=sys.stderr)
        for remark in source.remarks:
            print(f"note: {source.spec}: {remark}", file=sys.stderr)
    options = BuildOptions(model=args.model, layers=tuple(args.layers or ()), weights=args.weights,
                           image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                           workers=args.workers, overwrite=args.overwrite, limit=args.limit, frame=args.frame, index=not args.no_index)
    progress = None if args.quiet else _TqdmProgress()
    index_progress = None if args.quiet else _TqdmProgress("indexing", follows=progress)
    try:
        if args.ray is not None:
            from cache_builder.ray_build import build_cache_on_ray
            from cache_builder.sharding import DEFAULT_SHARD_SIZE

            manifest = build_cache_on_ray(sources, args.out, options, address=args.ray,
                                          shard_size=DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size,
                                          actors=args.actors,
                                          on_progress=progress)
        else:
            manifest = build_cache(sources, args.out, options, on_progress=progress,
                                   on_index_progress=index_progress)
    finally:
        for bar in (progress, index_progress):
            if bar is not None:
                bar.close()
    height, width = manifest.image_size
    shards = f", {len(manifest.shards)} shards" if manifest.shards else ""
    grids = ", ".join(f"{layer.layer} grid {layer.grid}" for layer in map(manifest.at_layer, manifest.layer_names))
    print(f"cache complete: {args.out} ({manifest.image_count} images{shards}, {grids}, "
          f"{len(manifest.skipped)} skipped; {manifest.frame} {width}x{height}: {manifest.framing})")
    for skipped in manifest.skipped[:20]:
        print(f"  skipped {skipped['path']}: {skipped['reason']}")
    return 0


def run_index(args: argparse.Namespace) -> int:
    from cache_builder.index import build_index

    progress = None if args.quiet else _TqdmProgress("indexing")
    try:
        indexes = build_index(args.cache, args.dims, on_progress=progress)
    finally:
        if progress is not None:
            progress.close()
    where = args.cache / "index" if len(indexes) == 1 else f"{args.cache}, one per shard ({len(indexes)})"
    energy = sum(index.energy for index in indexes) / len(indexes)
    print(f"index complete: {where} ({indexes[0].dims} dimensions per cell in 4 bits, {energy:.0%} of the "
          f"features' energy, {sum(index.nbytes for index in indexes) / 2**20:,.1f} MiB, built in "
          f"{sum(index.built_s for index in indexes):.1f} s)")
    return 0


def run_shard(args: argparse.Namespace) -> int:
    from cache_builder.sharding import DEFAULT_SHARD_SIZE, split_cache

    progress = None if args.quiet else _TqdmProgress("sharding")
    try:
        manifest = split_cache(args.cache, args.out, DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size,
                               index=not args.no_index, on_progress=progress)
    finally:
        if progress is not None:
            progress.close()
    print(f"sharded cache complete: {args.out} ({manifest.image_count} images in {len(manifest.shards)} shards)")
    return 0


class _TqdmProgress:
    """tqdm shows images/s and the ETA; created lazily so a finished cache prints no empty bar. A bar that
    `follows` another closes it when it starts, so the phases print one after the other."""

    def __init__(self, desc: str = "extracting", follows: "_TqdmProgress | None" = None) -> None:
        self.bar = None
        self.desc = desc
        self.follows = follows

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            if self.follows is not None:
                self.follows.close()
            self.bar = tqdm(total=total, initial=0, unit="img", desc=self.desc, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_layers(args: argparse.Namespace) -> int:
    from cache_builder.models import list_layers, load_model

    model = load_model(args.model, weights=args.weights, image_size=args.image_size)
    print(f"{args.model}: input {model.preprocessing.input_size}x{model.preprocessing.input_size}; "
          "* marks the default layer")
    for layer in list_layers(model):
        if len(layer.shape) != 3 and not args.all:
            continue
        mark = "*" if layer.name == model.default_layer else " "
        shape = "x".join(str(d) for d in layer.shape)
        print(f"{mark} {layer.name:<40} {layer.kind:<28} {shape}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from cache_builder import cache_format as fmt
    from cache_builder.metadata_table import column_summaries

    manifest = fmt.read_manifest(args.cache)
    fmt.check_manifest(manifest, args.cache)
    locations = fmt.shard_locations(args.cache, manifest)
    layers = [manifest.at_layer(name) for name in manifest.layer_names]
    for layer in layers:  # the same checks the dashboard makes before it opens a cache
        for location in fmt.shard_locations(args.cache, layer):
            fmt.open_arrays(location.arrays, layer, location.count)
    if args.json:
        print(manifest.to_json())
        return 0
    print(f"cache       {args.cache}")
    print(f"status      {manifest.status} (format v{manifest.format_version}, built {manifest.created})")
    print(f"model       {manifest.model} ({manifest.weights_source})")
    for layer in layers:
        h, w, c = layer.grid
        print(f"layer       {layer.layer}: grid {h}x{w}, {c} channels, {manifest.dtype}")
    height, width = manifest.image_size
    print(f"frame       {manifest.frame}, {width}x{height} pixels ({manifest.framing or 'square centre crop'})")
    print(f"images      {manifest.image_count} cached, {len(manifest.skipped)} skipped")
    if manifest.shards:
        print(f"shards      {len(locations)}: " + ", ".join(f"{loc.count:,}" for loc in locations[:8])
              + (" ..." if len(locations) > 8 else ""))
    for source in manifest.sources:
        print(f"source      {source.get('spec')} (domain {source.get('domain') or '-'}): {source.get('images')} images")
    for layer in layers:
        named = f" ({layer.layer})" if len(layers) > 1 else ""
        try:
            indexes = [fmt.open_index(location.arrays, layer, location.count)
                       for location in fmt.shard_locations(args.cache, layer) if location.count]
            print(f"index       {indexes[0].dims} dimensions per cell in 4 bits ({indexes[0].energy:.0%} of the "
                  f"energy), {sum(index.nbytes for index in indexes) / 2**20:,.1f} MiB{named}: `--mode approx` "
                  "searches")
        except fmt.IndexUnusable as exc:
            print(f"index       none usable{named} ({exc.problem}): searches are exact")
    for column, counts in column_summaries(args.cache / fmt.METADATA_FILE).items():
        print(f"column      {column}: {counts}")
    return 0


def closed_pipe_exit() -> int:
    """The reader of our output went away (`| head`): end quietly, as Unix tools do, with nothing left to say.

    stdout is pointed at /dev/null so the interpreter's final flush does not fail a second time.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    handlers = {"build": run_build, "index": run_index, "shard": run_shard, "layers": run_layers, "info": run_info}
    try:
        return handlers[args.command](args)
    except BrokenPipeError:
        return closed_pipe_exit()
    except (BuildError, CacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permissions...: what the system said, and that nothing is lost
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; fix it and rerun the same command to resume",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
