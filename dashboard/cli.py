"""`python -m dashboard search`: region search for scripts and batch studies, without the UI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cache_builder.cache_format import CacheError
from cache_builder.cli import closed_pipe_exit
from dashboard import distributed, export
from dashboard.feature_cache import FeatureCache
from dashboard.geometry import QueryError, box_mask, display_mask_to_grid
from dashboard.metadata import FilterError, MetadataFilter
from dashboard.query_encoder import encode_image
from dashboard.search import SEARCH_MODES, SearchRequest, search_regions
from dashboard.two_tier import mode_summary
from dashboard.uploads import UploadError, read_upload


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dashboard", description="Search a feature cache by region.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    search = commands.add_parser(
        "search", help="rank the cache's images by their best match to a region of a query image",
        description="Rank the images of CACHE_DIR by their best-matching window for a region of a query image. "
        "Box and mask are in the display pixels of the cached image (the model's input size).",
    )
    search.add_argument("cache", type=Path, metavar="CACHE_DIR", help="cache folder")
    search.add_argument("--layer", help="the layer to search, in a cache of several (default: its first)")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image-id", type=int, help="query with a cached image (no model run)")
    query.add_argument("--image", type=Path, help="query with an image file (encoded with the cache's model)")
    region = search.add_mutually_exclusive_group(required=True)
    region.add_argument("--box", help="X0,Y0,X1,Y1 in display pixels")
    region.add_argument("--mask", type=Path, help="PNG at display size: alpha > 0 (RGBA) or brightness = weight")
    search.add_argument("-k", type=int, default=20, help="number of hits (default: 20)")
    search.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                        help="only search images whose COLUMN equals VALUE (list columns: contains VALUE); "
                        "repeat a column to allow several values")
    search.add_argument("--exclude-query", action="store_true", help="leave the query image out of the hits")
    search.add_argument("--per", metavar="GROUP_COLUMN", help="keep only the best image per value of this column")
    search.add_argument("--mode", choices=SEARCH_MODES, default="auto",
                        help="exact: score every image; approx: two-tier (first-stage index, then an exact rerank "
                        "of its best candidates); auto (default): exact while the cache fits in RAM")
    search.add_argument("--rerank", type=int, metavar="N", help="two-tier: candidates reranked exactly "
                        "(default: 0.5%% of the searched images, at least 1,000)")
    search.add_argument("--format", choices=["csv", "json"], default="csv", help="output format (default: csv)")
    search.add_argument("--ray", nargs="?", const=distributed.LOCAL, metavar="ADDRESS",
                        help="score the shards on Ray actors: the cluster at ADDRESS (host:port), or with no "
                        f"address a local one (default: ${distributed.RAY_ADDRESS_ENV} if set, else this process)")
    return parser


def parse_filters(pairs: Sequence[str], store) -> MetadataFilter:
    equals: dict[str, list[str]] = {}
    contains: dict[str, list[str]] = {}
    for pair in pairs:
        column, sep, value = pair.partition("=")
        if not sep or not column:
            raise FilterError(f"--filter {pair!r}: expected COLUMN=VALUE")
        if column not in store.column_types:
            raise FilterError(f"--filter {pair!r}: no column '{column}'; columns: {', '.join(store.columns)}")
        (contains if store.is_list(column) else equals).setdefault(column, []).append(value)
    return MetadataFilter(equals=equals, contains_any=contains)


def read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA", "PA"):
                return np.asarray(image.convert("RGBA"))[..., 3] > 0
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise QueryError(f"--mask {path}: not a readable image ({exc})") from None


def run_search(args: argparse.Namespace) -> int:
    address = args.ray or distributed.ray_address()
    distributed.check_address(address)  # before any work: an unreachable cluster is one clear error
    cache = FeatureCache.open(args.cache, args.layer)
    if address:
        cache = distributed.serve(cache, address)
    features = content = None
    if args.image is not None:
        encoded = encode_image(cache.manifest, read_upload(args.image.read_bytes(), name=str(args.image)))
        features, content = encoded.features, encoded.content
    if args.box:
        try:
            box = [float(v) for v in args.box.split(",")]
        except ValueError:
            raise QueryError(f"--box {args.box!r}: expected four numbers X0,Y0,X1,Y1") from None
        mask = box_mask(cache.image_size, box)
    else:
        mask = read_mask(args.mask)
    if args.exclude_query and args.image_id is None:
        raise QueryError("--exclude-query needs --image-id (an uploaded image is not in the cache)")
    request = SearchRequest(
        cache=cache, weights=display_mask_to_grid(mask, cache.image_size, cache.grid), image_id=args.image_id,
        features=features, content=content, k=args.k, flt=parse_filters(args.filter, cache.metadata),
        per_group=args.per, exclude_query=args.exclude_query, mode=args.mode, rerank=args.rerank,
    )
    try:
        result = search_regions(request)
    finally:
        cache.search.close()
    hits = result.hits
    if result.mode.warning:
        print(f"warning: {result.mode.warning}", file=sys.stderr)
    if "approx" in (args.mode, result.mode.mode):  # two-tier ran, or was asked for and why it did not
        print(f"note: {mode_summary(result.mode)}", file=sys.stderr)
    sys.stdout.write(export.to_csv(hits) if args.format == "csv" else export.to_json(hits) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return run_search(args)
    except BrokenPipeError:
        return closed_pipe_exit()
    except (CacheError, QueryError, FilterError, UploadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
