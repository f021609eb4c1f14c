"""Extraction: reader (DataLoader workers decode and crop) -> mapper (the model up to its last cached layer) -> writer.

Resumable by construction: rows are written at their item's index into preallocated ``*.partial`` arrays and a
small state file records how many batches are done, so a build killed at any point continues on rerun. Batch
boundaries are a function of the item index and batch size only, so a resumed build computes every batch on
exactly the same images as an uninterrupted one and writes byte-identical arrays.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache_builder import __version__
from cache_builder.errors import BuildError
from cache_builder.framing import Framing, choose_framing
from cache_builder.index import ensure_index, remove_index
from cache_builder.metadata_table import write_metadata
from cache_builder.pipeline import BackgroundWriter
from cache_builder.models import FeatureExtractor, LoadedModel, Preprocessing, load_model
from cache_builder.sources import Source, SourceItem, open_item
from cache_builder import cache_format as fmt

STATE_FILE = "build_state.json"
PARTIAL_FEATURES = "features.partial.npy"
PARTIAL_SQNORMS = "sqnorms.partial.npy"
PARTIAL_FRAMES = "frames.partial.npy"
PARTIAL_IMAGES = "images.partial"
JPEG_QUALITY = 95

ProgressCallback = Callable[[int, int], None]


@dataclass
class BuildOptions:
    model: str
    layers: Sequence[str] = ()  # one or more layers of the model, stored in one cache; () = the model's default
    weights: str | None = None
    image_size: int | None = None
    batch_size: int = 32
    device: str = "auto"
    workers: int | None = None  # DataLoader processes; None = default_workers()
    overwrite: bool = False
    limit: int | None = None
    frame: str = "auto"  # "auto" | "crop" | "fit" (see cache_builder.framing)
    index: bool = True  # also build the first-stage index of two-tier search (cache_builder.index)


@dataclass
class BuildPlan:
    """What a build will produce; its fingerprint decides between resume, 'already built' and refusal."""

    items: list[tuple[int, SourceItem]]  # (source index, item) in cache order
    sources: list[Source]
    model: LoadedModel
    layers: tuple[str, ...]  # the first is stored where a single-layer cache stores its features
    grids: tuple[tuple[int, int, int], ...]  # (H, W, C) of each layer
    batch_size: int
    weights_arg: str | None = None
    framing: Framing = Framing("crop", 1.0, "")
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256()
        for part in (
            fmt.FORMAT_VERSION,
            self.model.name,
            self.model.weights_sha256 or self.model.weights_source,
            self.layer if len(self.layers) == 1 else self.layers,  # a single layer as before: old caches resume
            json.dumps(self.model.preprocessing.to_dict(), sort_keys=True),
            self.batch_size,
        ):
            digest.update(repr(part).encode())
        for source_index, item in self.items:
            digest.update(repr((source_index, item.path, self.sources[source_index].demo_seed)).encode())
        self.fingerprint = digest.hexdigest()

    @property
    def layer(self) -> str:
        return self.layers[0]

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.grids[0]

    def layer_folders(self, out: Path) -> list[Path]:
        """Where each layer's arrays go in `out` (the first in `out` itself)."""
        return [out / fmt.layer_dir_name(number) for number in range(len(self.layers))]

    def manifest_layers(self) -> list[dict[str, Any]]:
        """The manifest's `layers`: [] for one layer, so a single-layer cache is written exactly as before."""
        if len(self.layers) == 1:
            return []
        return [{"name": layer, "grid": list(grid), "dir": fmt.layer_dir_name(number)}
                for number, (layer, grid) in enumerate(zip(self.layers, self.grids))]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BuildError("--device cuda: no CUDA GPU is visible to torch; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BuildError("--device mps: Apple's Metal backend is not available here; use --device auto or cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise BuildError(f"--device {name}: use auto, cpu, cuda or mps")
    return torch.device(name)


class _CropDataset(Dataset):
    """Decodes, crops and normalises one item; failures come back as values so one bad file never kills a build."""

    def __init__(self, items: list[tuple[int, int, SourceItem]], sources: list[Source], prep: Preprocessing):
        self.items = items  # (cache-order index, source index, item)
        self.demo_seeds = [s.demo_seed for s in sources]
        self.prep = prep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, source_index, item = self.items[i]
        try:
            image = open_item(item, self.demo_seeds[source_index])
            framed, content = self.prep.frame_image(image)
            pixels = np.asarray(framed, dtype=np.uint8)
            buffer = io.BytesIO()
            framed.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            return {"index": index, "tensor": self.prep.normalize(pixels), "jpeg": buffer.getvalue(),
                    "content": content, "error": None}
        except Exception as exc:  # noqa: BLE001 - any decoding failure is reported, not fatal
            return {"index": index, "tensor": None, "jpeg": None, "content": None,
                    "error": f"{type(exc).__name__}: {exc}"[:300]}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if s["error"] is None]
    return {
        "indices": [s["index"] for s in good],
        "tensor": torch.stack([s["tensor"] for s in good]) if good else None,
        "jpegs": [s["jpeg"] for s in good],
        "content": [s["content"] for s in good],
        "failed": [(s["index"], s["error"]) for s in samples if s["error"] is not None],
    }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def prepare_output(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """Return the saved state to resume from, None for a fresh build; refuse to clobber another cache."""
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    manifest_path = out / fmt.MANIFEST_FILE
    if not any(out.iterdir()):
        return None
    if not state_path.is_file() and not manifest_path.is_file():
        raise BuildError(f"output folder {out} is not empty and holds no feature cache; choose an empty folder")
    if overwrite:
        remove_cache_files(out)
        return None
    state = _read_json(state_path)
    fingerprint_on_disk = (state or _read_json(manifest_path) or {}).get("fingerprint")
    if fingerprint_on_disk != fingerprint:
        raise BuildError(
            f"output folder {out} holds a different cache (other sources, model, layer or options); "
            "pass --overwrite to replace it"
        )
    return state


def _read_json(path: Path) -> dict[str, Any] | None:
    """A state or manifest file, None when absent; a damaged one is an error that says how to start over."""
    if not path.is_file():
        return None
    try:
        return fmt.read_json_object(path)
    except ValueError as exc:
        raise BuildError(f"{path} is damaged ({exc}); pass --overwrite to rebuild this cache") from None


def remove_cache_files(out: Path) -> None:
    for name in (fmt.MANIFEST_FILE, STATE_FILE, fmt.FEATURES_FILE, fmt.SQNORMS_FILE, fmt.FRAMES_FILE,
                 fmt.METADATA_FILE, fmt.METADATA_FILE + ".wal", PARTIAL_FEATURES, PARTIAL_SQNORMS, PARTIAL_FRAMES):
        (out / name).unlink(missing_ok=True)
    for name in (fmt.IMAGES_DIR, PARTIAL_IMAGES, fmt.SHARDS_DIR, fmt.LAYERS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    remove_index(out)


def _save_state(out: Path, state: dict[str, Any]) -> None:
    fmt.write_json_atomic(out / STATE_FILE, json.dumps(state))


def plan_build(sources: list[Source], options: BuildOptions) -> BuildPlan:
    items = [(si, item) for si, source in enumerate(sources) for item in source.items]
    if options.limit is not None:
        if options.limit <= 0:
            raise BuildError("--limit must be a positive number of images")
        items = items[: options.limit]
    if options.batch_size <= 0:
        raise BuildError("--batch-size must be positive")
    framing = choose_framing(options.frame, sources, [item for _, item in items])
    model = load_model(options.model, weights=options.weights, image_size=options.image_size)
    if framing.mode == "fit":
        model = replace(model, preprocessing=model.preprocessing.fitted(framing.aspect))
    layers = tuple(options.layers) or (model.default_layer,)
    extractor = FeatureExtractor(model, layers)
    grids = tuple((h, w, c) for c, h, w in extractor.output_shapes)
    return BuildPlan(items=items, sources=sources, model=model, layers=layers, grids=grids,
                     batch_size=options.batch_size, weights_arg=options.weights, framing=framing)


def build_cache(
    sources: list[Source],
    out: Path,
    options: BuildOptions,
    on_progress: ProgressCallback | None = None,
    on_index_progress: ProgressCallback | None = None,
) -> fmt.Manifest:
    """Build (or finish, or confirm) the cache in `out`; returns its complete manifest. `on_progress` reports
    images extracted, `on_index_progress` the images the first-stage index has projected."""
    started = time.perf_counter()
    out = Path(out)
    plan = plan_build(sources, options)
    state = prepare_output(out, plan.fingerprint, options.overwrite)
    if state is None and (out / fmt.MANIFEST_FILE).is_file():
        manifest = fmt.read_manifest(out)
        if manifest.status == fmt.STATUS_COMPLETE:  # same fingerprint, already complete: at most an index to finish
            if options.index:
                ensure_index(out, on_progress=on_index_progress)
            return manifest
    n = len(plan.items)
    if state is None:
        remove_cache_files(out)
        state = {"fingerprint": plan.fingerprint, "items": n, "done": 0, "skipped": [], "timings": {}}
        _save_state(out, state)  # first: whatever fails next, a rerun recognises the folder and resumes
    fmt.write_manifest(out, _manifest_for(plan, state, fmt.STATUS_BUILDING))
    if state["done"] == 0:  # nothing extracted yet: (re)create the partial arrays
        for folder, (h, w, c) in zip(plan.layer_folders(out), plan.grids):
            folder.mkdir(parents=True, exist_ok=True)
            fmt.allocate_array(folder / PARTIAL_FEATURES, np.uint16, (n, h, w, c))
            fmt.allocate_array(folder / PARTIAL_SQNORMS, np.float32, (n, h, w))
        if plan.framing.mode == "fit":
            fmt.allocate_array(out / PARTIAL_FRAMES, np.int32, (n, 4))
        (out / PARTIAL_IMAGES).mkdir(exist_ok=True)

    if state["done"] < n:
        _extract(plan, out, state, options, on_progress)
    _finalize(plan, out, state)
    state["timings"]["total_s"] = state["timings"].get("total_s", 0.0) + time.perf_counter() - started
    manifest = _manifest_for(plan, state, fmt.STATUS_COMPLETE)
    fmt.write_manifest(out, manifest)
    (out / STATE_FILE).unlink(missing_ok=True)
    if options.index:  # after `complete`: an interrupted index build leaves a searchable cache
        ensure_index(out, on_progress=on_index_progress)
    return manifest


def default_workers() -> int:
    """DataLoader processes decoding images: every core but the one driving the model, at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


def _extract(plan: BuildPlan, out: Path, state: dict[str, Any], options: BuildOptions,
             on_progress: ProgressCallback | None) -> None:
    """The main thread decodes (through the DataLoader's workers) and runs the model; a `BackgroundWriter` encodes
    and writes each batch meanwhile. On CUDA the input is pinned and channels-last, the model runs in bfloat16,
    and its output is copied to pinned host memory without blocking, so the copy overlaps the next batch too."""
    device = resolve_device(options.device)
    cuda = device.type == "cuda"
    extractor = FeatureExtractor(plan.model, plan.layers).to(device).eval()
    if cuda:
        extractor = extractor.to(memory_format=torch.channels_last)
    workers = default_workers() if options.workers is None else options.workers
    pending = [(i, si, item) for i, (si, item) in enumerate(plan.items)][state["done"]:]
    loader = DataLoader(
        _CropDataset(pending, plan.sources, plan.model.preprocessing),
        batch_size=plan.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=cuda,
    )
    arrays = _PartialArrays(out, plan)
    timings = state["timings"]
    for key in ("read_s", "model_s", "write_s"):  # created here: the writer thread saves this dict meanwhile
        timings.setdefault(key, 0.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else nullcontext()

    def write(batch: dict[str, Any], outputs: list[torch.Tensor] | None, ready) -> None:
        t_write = time.perf_counter()
        if outputs is not None:
            if ready is not None:
                ready.synchronize()  # the device-to-host copies have landed
            arrays.write(batch, [output.float().permute(0, 2, 3, 1).numpy() for output in outputs])
        for index, error in batch["failed"]:
            state["skipped"].append({"path": plan.items[index][1].path, "reason": error})
        state["done"] = min(len(plan.items), state["done"] + plan.batch_size)
        timings["write_s"] += time.perf_counter() - t_write
        _save_state(out, state)  # after the rows are flushed: a resumed build never skips unwritten rows
        committed[0] = state["done"]

    committed, reported = [state["done"]], state["done"]

    def report() -> None:  # in the caller's thread (a Streamlit progress bar needs its script's thread)
        nonlocal reported
        if on_progress is not None and committed[0] != reported:
            reported = committed[0]
            on_progress(reported, len(plan.items))

    with BackgroundWriter() as writer:
        t_wait = time.perf_counter()
        for batch in loader:
            t_model = time.perf_counter()
            timings["read_s"] += t_model - t_wait
            outputs = ready = None
            if batch["indices"]:
                inputs = batch["tensor"].to(device, non_blocking=True,
                                            memory_format=torch.channels_last if cuda else torch.preserve_format)
                with torch.inference_mode(), autocast:
                    outputs = extractor.forward_layers(inputs)
                outputs, ready = _to_host(outputs)
            timings["model_s"] += time.perf_counter() - t_model
            writer.submit(functools.partial(write, batch, outputs, ready))
            report()
            t_wait = time.perf_counter()
    arrays.close()
    report()


def _to_host(outputs: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], Any]:
    """(host tensors, event to wait on before reading them): CUDA outputs are copied into pinned memory without
    blocking the main thread."""
    if outputs[0].device.type != "cuda":
        return [output.cpu() for output in outputs], None
    hosts = []
    for output in outputs:
        hosts.append(torch.empty(output.shape, dtype=output.dtype, pin_memory=True))
        hosts[-1].copy_(output, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return hosts, ready


class _PartialArrays:
    """The build's partial arrays (one pair per layer) and images folder, written batch by batch (from the writer
    thread)."""

    def __init__(self, out: Path, plan: BuildPlan) -> None:
        self.out, self.plan = out, plan
        self.layers = [(np.load(folder / PARTIAL_FEATURES, mmap_mode="r+"),
                        np.load(folder / PARTIAL_SQNORMS, mmap_mode="r+")) for folder in plan.layer_folders(out)]
        whole_frames = plan.framing.mode == "fit"
        self.frames = np.load(out / PARTIAL_FRAMES, mmap_mode="r+") if whole_frames else None

    def write(self, batch: dict[str, Any], maps: list[np.ndarray]) -> None:
        indices = batch["indices"]
        lo, hi = indices[0], indices[-1] + 1
        for (features, sqnorms), layer_maps, grid in zip(self.layers, maps, self.plan.grids):
            if self.frames is not None:  # padding is no picture: its cells hold zeros and are never matched
                cells = fmt.content_cells(np.asarray(batch["content"]), grid[:2],
                                          self.plan.model.preprocessing.input_shape)
                layer_maps *= fmt.content_mask(cells, grid[:2])[..., None]
            bits, norms = fmt.encode_features(layer_maps)
            if hi - lo == len(indices):  # contiguous rows: one slice write
                features[lo:hi], sqnorms[lo:hi] = bits, norms
            else:
                features[indices], sqnorms[indices] = bits, norms
        if self.frames is not None:
            self.frames[indices] = np.asarray(batch["content"], dtype=np.int32)
            self.frames.flush()
        for index, jpeg in zip(indices, batch["jpegs"]):
            (self.out / PARTIAL_IMAGES / f"{index:07d}{fmt.IMAGE_SUFFIX}").write_bytes(jpeg)
        for features, sqnorms in self.layers:
            features.flush()
            sqnorms.flush()

    def close(self) -> None:
        del self.layers, self.frames


def _finalize(plan: BuildPlan, out: Path, state: dict[str, Any]) -> None:
    """Drop skipped rows, move images to their final ids, write metadata. Each step can be redone after a kill."""
    t0 = time.perf_counter()
    skipped_paths = {s["path"] for s in state["skipped"]}
    keep = [i for i, (_, item) in enumerate(plan.items) if item.path not in skipped_paths]
    if not keep:
        raise BuildError("every image failed to load; nothing to cache (see the reasons listed above)")
    arrays = [(out, PARTIAL_FRAMES, fmt.FRAMES_FILE)] + [
        (folder, partial, final) for folder in plan.layer_folders(out)
        for partial, final in ((PARTIAL_FEATURES, fmt.FEATURES_FILE), (PARTIAL_SQNORMS, fmt.SQNORMS_FILE))]
    for folder, partial, final in arrays:
        if not (folder / partial).exists():
            continue  # already finalised by an earlier, interrupted run
        if len(keep) == len(plan.items):
            os.replace(folder / partial, folder / final)
            continue
        source = np.load(folder / partial, mmap_mode="r")
        tmp = folder / f".{final}.tmp"
        fmt.allocate_array(tmp, source.dtype, (len(keep),) + source.shape[1:])
        target = np.load(tmp, mmap_mode="r+")
        step = 4096
        for start in range(0, len(keep), step):
            target[start:start + step] = source[keep[start:start + step]]
        target.flush()
        del target, source
        os.replace(tmp, folder / final)
        (folder / partial).unlink()
    partial_images = out / PARTIAL_IMAGES
    if partial_images.exists():
        for new_id, index in enumerate(keep):
            src = partial_images / f"{index:07d}{fmt.IMAGE_SUFFIX}"
            if src.exists():
                dst = out / fmt.image_relpath(new_id)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        shutil.rmtree(partial_images)
    write_metadata(out / fmt.METADATA_FILE, [(plan.sources[si], item) for si, item in (plan.items[i] for i in keep)])
    state["timings"]["finalize_s"] = state["timings"].get("finalize_s", 0.0) + time.perf_counter() - t0


def _manifest_for(plan: BuildPlan, state: dict[str, Any], status: str) -> fmt.Manifest:
    skipped = list(state["skipped"])
    return fmt.Manifest(
        model=plan.model.name,
        layer=plan.layer,
        weights_source=plan.model.weights_source,
        weights_sha256=plan.model.weights_sha256,
        preprocessing=plan.model.preprocessing.to_dict(),
        input_size=plan.model.preprocessing.input_size,
        frame=plan.framing.mode,
        framing=plan.framing.reason,
        input_shape=plan.model.preprocessing.input_shape if plan.framing.mode == "fit" else None,
        grid=plan.grid,
        layers=plan.manifest_layers(),
        image_count=len(plan.items) - len(skipped),
        sources=[s.describe() for s in plan.sources],
        skipped=skipped,
        timings={k: round(v, 3) for k, v in state["timings"].items()},
        builder_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        status=status,
        weights_arg=plan.weights_arg,
        fingerprint=plan.fingerprint,
        batch_size=plan.batch_size,
    )
