"""Builder throughput vs the model's forward pass alone, same machine, same batch size, one run.

    .venv/bin/python benchmarks/build.py [--images 1500] [--batch-size 32] [--workers 1]

The builder figure is the whole pipeline on the demo source (render/decode, crop, JPEG for display,
normalise, forward, bfloat16 conversion, memmap and state writes), timed from the start of `build_cache`
to the complete manifest, model loading included. The forward-only figure runs the same `FeatureExtractor`
on already-preprocessed batches held in memory. Target: builder >= 80% of forward-only on CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_builder.build import BuildOptions, build_cache, resolve_device  # noqa: E402
from cache_builder.models import FeatureExtractor, load_model  # noqa: E402
from cache_builder.sources import SourceOptions, demo, parse_source  # noqa: E402


def forward_only(model_name: str, images: int, batch_size: int, device: torch.device) -> float:
    """images/s of the extractor alone on preprocessed demo frames already in memory."""
    model = load_model(model_name)
    extractor = FeatureExtractor(model, model.default_layer).to(device).eval()
    prep = model.preprocessing
    frames = demo.demo_frames(batch_size)
    batch = torch.stack([prep.normalize(np.asarray(prep.crop(demo.render_demo_image(f)))) for f in frames])
    batch = batch.to(device)
    with torch.inference_mode():
        extractor(batch)  # warm-up (oneDNN picks its kernels on the first call)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = 0
        while done < images:
            extractor(batch).cpu()
            done += batch_size
    return done / (time.perf_counter() - start)


def decode_per_worker(images: int, spec: str = "demo") -> float:
    """images/s one decode worker delivers: what a DataLoader worker (or a Ray decode task) does per image, i.e.
    render/decode, frame, JPEG-encode the display copy and normalise, in this process on one core."""
    from cache_builder.build import _CropDataset

    torch.set_num_threads(1)
    source = parse_source(spec, SourceOptions(demo_size=images))
    model = load_model("efficientnet_lite0")
    items = source.items[:images]
    dataset = _CropDataset([(i, 0, item) for i, item in enumerate(items)], [source], model.preprocessing)
    dataset[0]  # warm-up
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    rate = len(dataset) / (time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    return rate


def whole_builder(model_name: str, images: int, batch_size: int, workers: int, device: str) -> tuple[float, dict]:
    """images/s of `build_cache` on the demo source into a fresh folder."""
    source = parse_source("demo", SourceOptions(demo_size=images))
    with tempfile.TemporaryDirectory(prefix="vfs-bench-build-") as out:
        start = time.perf_counter()
        manifest = build_cache([source], Path(out), BuildOptions(model=model_name, batch_size=batch_size,
                                                                 workers=workers, device=device))
        elapsed = time.perf_counter() - start
    return manifest.image_count / elapsed, manifest.timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode-source", default="demo", help="source whose images the decode figure reads, "
                        "e.g. folder:../shared/realdata/imagenet200 for real photos (default: demo)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, device {device}")
    print(f"model {args.model}, default layer, batch size {args.batch_size}, {args.images} demo images, "
          f"{args.workers} DataLoader worker(s)")

    forward = forward_only(args.model, args.images, args.batch_size, device)
    builder, timings = whole_builder(args.model, args.images, args.batch_size, args.workers, args.device)
    print(f"forward pass alone : {forward:8.1f} images/s")
    print(f"whole builder      : {builder:8.1f} images/s  (main thread: waiting for data "
          f"{timings.get('read_s', 0):.1f} s, model {timings.get('model_s', 0):.1f} s; writer thread, overlapping "
          f"them: {timings.get('write_s', 0):.1f} s; finalize {timings.get('finalize_s', 0):.1f} s)")
    ratio = builder / forward
    verdict = "PASS" if ratio >= 0.8 else "FAIL"
    print(f"builder / forward  : {ratio:8.1%}  target >= 80%: {verdict}")
    decode = decode_per_worker(min(args.images, 300), args.decode_source)
    print(f"decode + preprocess: {decode:8.1f} images/s per worker ({args.decode_source}; one core: read and "
          "decode, frame, display JPEG, normalise)")
    print(f"  so a model running at F images/s needs about F / {decode:.0f} decode workers; this device's "
          f"{forward:.0f} images/s needs {max(1, -(-int(forward) // max(1, int(decode))))}")


if __name__ == "__main__":
    main()
