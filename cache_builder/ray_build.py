"""`build --ray`: the same cache as `build_cache`, extracted on a Ray cluster and written as shards.

The driver lists the images, plans the shards (contiguous runs of `shard_size` images in cache order) and
writes the metadata and the manifest; everything per image runs on the cluster, as a Ray Data pipeline:

    item rows -> decode and frame (CPU tasks) -> the model (an actor pool: one actor per GPU, else CPU actors)
              -> part files (tasks writing each batch's encoded rows into its shard's `parts/`, on shared storage)

A shard whose rows have all arrived is assembled from its parts into a shard folder (`sharding.write_shard`,
renamed into place whole) by a task on the cluster, the skipped images dropped, so its local rows are its final
ids. Resumable: a rerun keeps every finished shard and every part written, and extracts only the images no part
holds; the manifest says `complete` only when every shard is written and the metadata with it. The features
are those of a single-process build within bfloat16 rounding (the same preprocessing and model, other batch
boundaries), with the same ids and metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cache_builder import cache_format as fmt
from cache_builder.build import (JPEG_QUALITY, STATE_FILE, BuildOptions, BuildPlan, _manifest_for, plan_build,
                                 prepare_output, remove_cache_files)
from cache_builder.cluster import ClusterError, connect, ray_module
from cache_builder.errors import BuildError
from cache_builder.metadata_table import write_metadata
from cache_builder.models import FeatureExtractor
from cache_builder.sharding import DEFAULT_SHARD_SIZE, read_shard_info, write_shard
from cache_builder.sources import Source, SourceItem, open_item

PARTS_DIR = "parts"
PROBE_PREFIX = ".vfs-shared-storage-probe-"

ProgressCallback = Callable[[int, int], None]


def build_cache_on_ray(sources: list[Source], out: Path, options: BuildOptions, address: str | None = None,
                       shard_size: int = DEFAULT_SHARD_SIZE, actors: int | None = None,
                       on_progress: ProgressCallback | None = None) -> fmt.Manifest:
    """Build (or finish, or confirm) the sharded cache in `out` on the Ray cluster at `address` (None: a local
    one); returns its complete manifest. `actors`: model actors (default: one per GPU, else one per node)."""
    started = time.perf_counter()
    out = Path(out)
    if shard_size <= 0:
        raise BuildError("--shard-size must be a positive number of images")
    connect(address)  # first: an unreachable cluster is one clear error before any work
    plan = plan_build(sources, options)
    fingerprint = _fingerprint(plan, shard_size)
    state = prepare_output(out, fingerprint, options.overwrite)
    if state is None and (out / fmt.MANIFEST_FILE).is_file():
        manifest = fmt.read_manifest(out)
        if manifest.status == fmt.STATUS_COMPLETE:
            _index_shards(out, options)
            return manifest
    check_shared_storage(out)
    if state is None:
        remove_cache_files(out)
        state = {"fingerprint": fingerprint, "items": len(plan.items), "ray": {"shard_size": shard_size},
                 "skipped": [], "timings": {}}
        fmt.write_json_atomic(out / STATE_FILE, json.dumps(state))
    fmt.write_manifest(out, _manifest_for(plan, state, fmt.STATUS_BUILDING))
    shards = _plan_shards(len(plan.items), shard_size)
    _extract(plan, out, shards, fingerprint, options, actors, on_progress)
    infos = [read_shard_info(out / fmt.shard_dir_name(number)) for number, _, _ in shards]
    skipped = [entry for info in infos for entry in info["skipped"]]
    state["skipped"] = skipped
    skipped_paths = {entry["path"] for entry in skipped}
    kept = [plan.items[i] for i in range(len(plan.items)) if plan.items[i][1].path not in skipped_paths]
    if not kept:
        raise BuildError("every image failed to load; nothing to cache (see the reasons listed above)")
    write_metadata(out / fmt.METADATA_FILE, [(plan.sources[si], item) for si, item in kept])
    state["timings"]["total_s"] = state["timings"].get("total_s", 0.0) + time.perf_counter() - started
    manifest = _manifest_for(plan, state, fmt.STATUS_COMPLETE)
    manifest.shards = [{"dir": fmt.shard_dir_name(number), "count": info["count"]}
                       for (number, _, _), info in zip(shards, infos)]
    fmt.write_manifest(out, manifest)
    (out / STATE_FILE).unlink(missing_ok=True)
    _index_shards(out, options)
    return manifest


def _fingerprint(plan: BuildPlan, shard_size: int) -> str:
    """The single-process plan's fingerprint and the shard size: a Ray build resumes only a Ray build of the
    same shards."""
    return hashlib.sha256(f"{plan.fingerprint} ray shards of {shard_size}".encode()).hexdigest()


def _plan_shards(n: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(number, first item, end item) of each shard, in cache order."""
    return [(number, start, min(n, start + shard_size)) for number, start in enumerate(range(0, n, shard_size))]


def check_shared_storage(out: Path) -> None:
    """Refuse a cluster whose nodes cannot see the output folder: each node looks for a file the driver wrote."""
    ray = ray_module()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = out / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    _write_probe(probe)
    try:
        look = ray.remote(num_cpus=0)(_sees)
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        answers = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                           .remote(str(probe)) for node in nodes])
    finally:
        probe.unlink(missing_ok=True)
    blind = [f"{host} ({node['NodeManagerAddress']})" for node, (host, seen) in zip(nodes, answers) if not seen]
    if blind:
        raise ClusterError(f"the output folder {out} is not visible from {len(blind)} of {len(nodes)} Ray nodes "
                           f"({', '.join(blind)}): a Ray build writes shards from every node, so --out must be on "
                           "storage they all mount at the same path (NFS, a cluster file system)")


def _write_probe(probe: Path) -> None:
    probe.write_text("visual feature search: a Ray build checks that every node sees this folder\n")


def _sees(path: str) -> tuple[str, bool]:
    return socket.gethostname(), os.path.exists(path)


def _actor_count(actors: int | None) -> int:
    ray = ray_module()
    if actors is not None:
        if actors <= 0:
            raise BuildError("--actors must be a positive number of model actors")
        return actors
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus or max(1, len([node for node in ray.nodes() if node.get("Alive")]))


def _extract(plan: BuildPlan, out: Path, shards: list[tuple[int, int, int]], fingerprint: str,
             options: BuildOptions, actors: int | None, on_progress: ProgressCallback | None) -> None:
    """Every unfinished shard's missing rows through the pipeline, then each shard assembled on the cluster."""
    ray = ray_module()
    n = len(plan.items)
    done_rows = 0
    pending_rows: list[dict[str, Any]] = []
    missing: dict[int, int] = {}  # unfinished shard -> rows still to extract
    spans = {number: (lo, hi) for number, lo, hi in shards}
    for number, lo, hi in shards:
        folder = out / fmt.shard_dir_name(number)
        info = read_shard_info(folder)
        if info is not None and info.get("items") == [lo, hi] and info.get("fingerprint") == fingerprint:
            done_rows += hi - lo
            continue
        have = _rows_in_parts(folder.with_name(folder.name + "." + PARTS_DIR))
        done_rows += len(have)
        todo = [i for i in range(lo, hi) if i not in have]
        missing[number] = len(todo)
        pending_rows += [_item_row(plan, i, number) for i in todo]
    if on_progress is not None:
        on_progress(done_rows, n)
    remote_assemble = ray.remote(num_cpus=0, max_retries=2)(_assemble_shard)
    assembling = []

    def assemble(number: int) -> None:  # as soon as a shard's rows are all written, while the others extract
        lo, hi = spans[number]
        assembling.append(remote_assemble.remote(str(out), number, lo, hi, fingerprint, plan.grids,
                                                 plan.framing.mode == "fit",
                                                 [plan.items[i][1].path for i in range(lo, hi)]))

    for number in [number for number, rows in missing.items() if rows == 0]:
        assemble(number)
    if pending_rows:
        _quiet_ray_data(ray)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = _actor_count(actors)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        nodes = max(1, len([node for node in ray.nodes() if node.get("Alive")]))
        threads = max(1, cpus // nodes // max(1, math.ceil(count / nodes)))  # the cores an actor's node lends it
        ds = ray.data.from_items(pending_rows, override_num_blocks=max(1, len(pending_rows) // plan.batch_size))
        # Decode tasks ask half a CPU, a CPU model actor 0.4 (it sets its threads itself): never the same
        # resources, so Ray Data keeps decoding in tasks of their own, beside the model rather than before it in
        # the actor's process; an actor never takes every CPU from the decoding (a 1-CPU node runs both); and a
        # 2-core node starts 3 decode workers, not more (each imports torch: seconds of CPU at startup).
        ds = ds.map_batches(_decode, fn_kwargs={"preprocessing": plan.model.preprocessing},
                            batch_size=plan.batch_size, batch_format="numpy", num_cpus=0.5)
        ds = ds.map_batches(_Extract, fn_constructor_args=(plan.model, plan.layers, plan.grids,
                                                           plan.framing.mode == "fit", threads),
                            batch_size=plan.batch_size, batch_format="numpy",
                            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 0.4,
                            compute=ray.data.ActorPoolStrategy(size=count))
        ds = ds.map_batches(_write_parts, fn_kwargs={"out": str(out)}, batch_size=None, batch_format="numpy",
                            num_cpus=0)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for number, rows in zip(batch["shard"], batch["rows"]):
                done_rows += int(rows)
                missing[int(number)] -= int(rows)
                if missing[int(number)] == 0:
                    assemble(int(number))
            if on_progress is not None:
                on_progress(done_rows, n)
    ray.get(assembling)


def _quiet_ray_data(ray) -> None:
    """The builder reports progress itself; Ray Data's own progress lines and plans would bury it."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _item_row(plan: BuildPlan, index: int, shard: int) -> dict[str, Any]:
    """What a decode task needs of one item (plain values: rows cross processes)."""
    source_index, item = plan.items[index]
    demo = item.demo_index is not None
    return {"index": index, "shard": shard, "file": item.file or "",
            "demo_index": item.demo_index if demo else -1,
            "demo_seed": plan.sources[source_index].demo_seed or 0,
            "demo_metadata": json.dumps(item.metadata, default=str) if demo else ""}


def _decode(batch: dict[str, np.ndarray], preprocessing) -> dict[str, np.ndarray]:
    """Decode, frame and JPEG-encode each image of a batch (a Ray Data CPU task); failures become rows with an
    error, as in the single-process build."""
    h, w = preprocessing.input_shape
    count = len(batch["index"])
    pixels = np.zeros((count, h, w, 3), np.uint8)
    content = np.zeros((count, 4), np.int32)
    jpegs, errors = [], []
    for k in range(count):
        metadata = json.loads(batch["demo_metadata"][k]) if batch["demo_metadata"][k] else {}
        item = SourceItem(path="", metadata=metadata, file=str(batch["file"][k]) or None,
                          demo_index=int(batch["demo_index"][k]) if batch["demo_index"][k] >= 0 else None)
        try:
            framed, box = preprocessing.frame_image(open_item(item, int(batch["demo_seed"][k])))
            pixels[k] = np.asarray(framed, dtype=np.uint8)
            content[k] = box
            buffer = io.BytesIO()
            framed.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            jpegs.append(buffer.getvalue())
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - any decoding failure is reported, not fatal
            jpegs.append(b"")
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return {"index": batch["index"], "shard": batch["shard"], "pixels": pixels, "content": content,
            "jpeg": np.array(jpegs, dtype=object), "error": np.array(errors, dtype=object)}


def _layer_keys(number: int) -> tuple[str, str]:
    """The batch and part columns of layer `number`'s bits and norms ("bits", "norms" for the first, as a
    single-layer build has always written them)."""
    return ("bits", "norms") if number == 0 else (f"bits_{number}", f"norms_{number}")


class _Extract:
    """The model up to the last cached layer, loaded once per actor of the pool: on its GPU in bfloat16,
    channels-last (as the single-process build), else on the CPU with `threads` threads."""

    def __init__(self, model, layers: tuple[str, ...], grids: tuple[tuple[int, int, int], ...], whole_frames: bool,
                 threads: int) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        if not self.cuda:
            torch.set_num_threads(threads)
        self.prep = model.preprocessing
        self.extractor = FeatureExtractor(model, layers).to(self.device).eval()
        if self.cuda:
            self.extractor = self.extractor.to(memory_format=torch.channels_last)
        self.grids = grids
        self.whole_frames = whole_frames

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        good = np.nonzero(batch["error"] == "")[0]
        count = len(batch["index"])
        arrays = [(np.zeros((count, h, w, c), np.uint16), np.zeros((count, h, w), np.float32))
                  for h, w, c in self.grids]
        if len(good):
            inputs = torch.stack([self.prep.normalize(batch["pixels"][k]) for k in good]).to(self.device)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
            if self.cuda:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast:
                outputs = self.extractor.forward_layers(inputs)
            for output, (h, w, _), (bits, norms) in zip(outputs, self.grids, arrays):
                maps = output.float().permute(0, 2, 3, 1).cpu().numpy()
                if self.whole_frames:  # padding is no picture: its cells hold zeros and are never matched
                    cells = fmt.content_cells(batch["content"][good], (h, w), self.prep.input_shape)
                    maps *= fmt.content_mask(cells, (h, w))[..., None]
                bits[good], norms[good] = fmt.encode_features(maps)
        layers = {key: array for number, pair in enumerate(arrays) for key, array in zip(_layer_keys(number), pair)}
        return {"index": batch["index"], "shard": batch["shard"], **layers, "content": batch["content"],
                "jpeg": batch["jpeg"], "error": batch["error"]}


def _write_parts(batch: dict[str, np.ndarray], out: str) -> dict[str, np.ndarray]:
    """Each shard's rows of the batch as one part file (written, then renamed: whole or absent); returns the
    rows written per shard."""
    written = []
    for shard in np.unique(batch["shard"]):
        rows = np.nonzero(batch["shard"] == shard)[0]
        parts = Path(out) / (fmt.shard_dir_name(int(shard)) + "." + PARTS_DIR)
        parts.mkdir(parents=True, exist_ok=True)
        name = f"{int(batch['index'][rows[0]]):010d}-{uuid.uuid4().hex[:8]}.npz"
        jpegs = [bytes(batch["jpeg"][k]) for k in rows]
        tmp = parts / f".{name}.tmp"
        layers = {key: batch[key][rows] for key in batch if key.startswith(("bits", "norms"))}
        with open(tmp, "wb") as fh:
            np.savez(fh, index=batch["index"][rows].astype(np.int64), **layers,
                     content=batch["content"][rows].astype(np.int32),
                     jpeg_sizes=np.array([len(j) for j in jpegs], np.int64),
                     jpegs=np.frombuffer(b"".join(jpegs), np.uint8),
                     errors=np.frombuffer(json.dumps([str(e) for e in batch["error"][rows]]).encode(), np.uint8))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, parts / name)
        written.append((int(shard), len(rows)))
    return {"shard": np.array([s for s, _ in written], np.int64), "rows": np.array([r for _, r in written], np.int64)}


def _read_parts(parts: Path) -> list[dict[str, Any]]:
    loaded = []
    for path in sorted(parts.glob("*.npz")):
        with np.load(path) as part:
            sizes = part["jpeg_sizes"]
            blob = part["jpegs"].tobytes()
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            loaded.append({"index": part["index"], "content": part["content"],
                           **{key: part[key] for key in part.files if key.startswith(("bits", "norms"))},
                           "jpegs": [blob[offsets[k]:offsets[k + 1]] for k in range(len(sizes))],
                           "errors": json.loads(part["errors"].tobytes().decode())})
    return loaded


def _rows_in_parts(parts: Path) -> set[int]:
    """Items some part already holds (a rerun does not extract them again)."""
    if not parts.is_dir():
        return set()
    found: set[int] = set()
    for path in parts.glob("*.npz"):
        try:
            with np.load(path) as part:
                found.update(int(i) for i in part["index"])
        except (OSError, ValueError, KeyError):  # a part cut short by a crash: its rows are extracted again
            path.unlink(missing_ok=True)
    return found


def _assemble_shard(out: str, number: int, lo: int, hi: int, fingerprint: str,
                    grids: tuple[tuple[int, int, int], ...], whole_frames: bool, paths: list[str]) -> int:
    """Parts -> the shard folder: rows in cache order, the skipped ones dropped, images renumbered alike."""
    folder = Path(out) / fmt.shard_dir_name(number)
    parts = folder.with_name(folder.name + "." + PARTS_DIR)
    loaded = _read_parts(parts)
    by_index: dict[int, tuple[int, int]] = {}
    for p, part in enumerate(loaded):
        for k, index in enumerate(part["index"]):
            by_index.setdefault(int(index), (p, k))  # a row written twice (a retried task): either copy
    missing = [i for i in range(lo, hi) if i not in by_index]
    if missing:
        raise BuildError(f"shard {number}: {len(missing)} images have no extracted row (first: item {missing[0]}); "
                         "rerun the same command to resume")
    kept, skipped = [], []
    for index in range(lo, hi):
        p, k = by_index[index]
        error = loaded[p]["errors"][k]
        if error:
            skipped.append({"path": paths[index - lo], "reason": error})
        else:
            kept.append((p, k))
    layers = []  # (bits, norms) of each layer, in the shard's row order
    for layer, (h, w, c) in enumerate(grids):
        bits_key, norms_key = _layer_keys(layer)
        bits = np.zeros((len(kept), h, w, c), np.uint16)
        norms = np.zeros((len(kept), h, w), np.float32)
        for row, (p, k) in enumerate(kept):
            bits[row], norms[row] = loaded[p][bits_key][k], loaded[p][norms_key][k]
        layers.append((bits, norms))
    frames = np.array([loaded[p]["content"][k] for p, k in kept], np.int32).reshape(-1, 4) if whole_frames else None
    images = [(row, loaded[p]["jpegs"][k]) for row, (p, k) in enumerate(kept)]
    (bits, norms), *more = layers
    write_shard(folder, bits, norms, frames, images, {"items": [lo, hi], "fingerprint": fingerprint,
                                                      "skipped": skipped},
                [(fmt.layer_dir_name(layer), *arrays) for layer, arrays in enumerate(more, start=1)])
    shutil.rmtree(parts, ignore_errors=True)
    return len(kept)


def _index_shards(out: Path, options: BuildOptions) -> None:
    """Each shard's first-stage index, built on the cluster (a task per shard lacking a usable one)."""
    if not options.index:
        return
    ray = ray_module()
    from cache_builder.index import build_shard_index, indexed_locations

    todo = []
    for layer, location in indexed_locations(out, fmt.read_manifest(out)):
        try:
            fmt.open_index(location.arrays, layer, location.count)
        except fmt.IndexUnusable:
            todo.append((layer, location))
    build = ray.remote(num_cpus=1, max_retries=2)(lambda location, layer: build_shard_index(location, layer).dims)
    ray.get([build.remote(location, layer) for layer, location in todo])
