"""Every instruction path of kernel.c against the float64 formula, through a small C harness
(tests/native/kernel_crosscheck.c), including the 64-bit ARM paths, cross-compiled and run under qemu-user.

The cases (query layouts from the real `KernelQuery.build`, stored features, expected scores) are written by
Python; the harness only reads them, runs the kernel and compares. So a path can be checked on a machine that
cannot load it into Python. The ARM check needs Debian's `gcc-aarch64-linux-gnu` and `qemu-user` (`.ci/run`
installs them); without them it skips and says so, except when VFS_REQUIRE_CROSS=1 (as in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cache_builder.cache_format import encode_features, from_bfloat16_bits, pack_codes
from conftest import reference_scores
from dashboard.region_query import RegionQuery
from dashboard.scoring.kernel import PATHS, KernelQuery, missing_cpu_flags

HARNESS = Path(__file__).with_name("native") / "kernel_crosscheck.c"
ISA = {"avx512-bf16": 2, "avx2": 1, "neon": 3, "portable": 0}
# (images, grid, channels, mask): channel counts around the 16-value steps, so every tail is exercised
SHAPES = [(7, (5, 6), 16, "cell"), (6, (4, 5), 37, "box"), (5, (3, 4), 24, "full"), (6, (5, 6), 40, "soft"),
          (4, (7, 7), 112, "box"), (5, (3, 3), 3, "soft"), (6, (6, 4), 48, "holes")]
# 4-bit first-stage codes: (images, grid, values per cell, mask), odd and even numbers of 16-byte groups per run
# ("largest": every level 15 and every query value +127 over one long run, the most any integer sum can hold)
# Single cells (AVX2 scores them in a pass of its own, `single_cell_numerators`): one 16-byte group, whole 32-byte
# chunks with a group left over, 7x7 cells of 128 values, and 5 chunks of the largest values (16-bit sums of at
# most 4 chunks, then one more), on grids of fewer and more than 8 cells.
CODE_SHAPES = [(7, (5, 6), 32, "cell"), (6, (4, 5), 64, "box"), (5, (3, 4), 96, "full"), (6, (7, 7), 128, "soft"),
               (5, (4, 4), 32, "holes"), (4, (5, 5), 160, "box"), (3, (5, 5), 160, "largest"),
               (5, (4, 5), 160, "cell"), (4, (7, 7), 128, "cell"), (3, (2, 3), 320, "largest cell"),
               (3, (3, 3), 320, "largest cell")]
CODE_CHUNKS = (16, 32, 64)  # packed bytes each path reads at a time: portable and NEON, AVX2, AVX-512


def case_mask(rng, grid_h: int, grid_w: int, kind: str) -> np.ndarray:
    mask = np.zeros((grid_h, grid_w), dtype=np.float32)
    if kind in ("cell", "largest cell"):
        mask[grid_h // 2, grid_w // 2] = 1
    elif kind in ("full", "largest"):
        mask[:] = 1
    elif kind == "holes":
        mask[1, [0, 3]] = 1
        mask[2, 1] = 0.5
    else:
        mask[1:grid_h - 1, 1:grid_w] = rng.uniform(0.05, 1, size=(grid_h - 2, grid_w - 1)) if kind == "soft" else 1
    return mask


def code_contract_scores(kq: KernelQuery, levels: np.ndarray, sqnorms: np.ndarray) -> np.ndarray:
    """(N, windows): the scores `vfs_score_codes` promises, in float64 and int64: per window, the integer dot
    product of each run's int8 values (laid out for 16-byte chunks: in value order) with the levels it covers,
    times numerator_scale plus numerator_offset, over the exact denominator."""
    n, grid_h, grid_w, d = levels.shape
    flat = levels.reshape(n, -1).astype(np.int64)
    out = np.zeros((n, kq.out_h * kq.out_w))
    for y in range(kq.out_h):
        for x in range(kq.out_w):
            base = y * grid_w + x
            dot = np.zeros(n, dtype=np.int64)
            for t in range(kq.n_runs):
                start, length = (base + kq.term_offsets[t]) * d, kq.term_lengths[t]
                values = kq.code_values[kq.term_starts[t]:kq.term_starts[t] + length].astype(np.int64)
                dot += flat[:, start:start + length] @ values
            numerator = dot * float(np.float32(kq.numerator_scale)) + float(np.float32(kq.numerator_offset))
            denominator = sum(float(w) * sqnorms.reshape(n, -1)[:, base + k].astype(np.float64)
                              for k, w in zip(kq.cell_offsets, kq.cell_weights))
            with np.errstate(invalid="ignore", divide="ignore"):
                score = np.where(denominator > 0, numerator / (np.sqrt(denominator) * kq.query_norm), 0.0)
            out[:, y * kq.out_w + x] = np.clip(score, -1, 1)
    return out


def write_header(out, n: int, channels: int, kq: KernelQuery, code_stride: int) -> None:
    header = [n, *kq.grid, channels, kq.out_h, kq.out_w, len(kq.term_offsets), len(kq.cell_offsets), kq.n_runs,
              len(kq.term_bits), len(kq.run_values), code_stride]
    np.array(header, dtype=np.int64).tofile(out)
    np.array([kq.query_norm, kq.numerator_scale, kq.numerator_offset], dtype=np.float32).tofile(out)
    for array, dtype in ((kq.term_offsets, np.int32), (kq.term_lengths, np.int32), (kq.term_starts, np.int64),
                         (kq.term_bits, np.uint16), (kq.cell_offsets, np.int32), (kq.cell_weights, np.float32),
                         (kq.cell_vectors, np.float32), (kq.run_values, np.float32)):
        np.ascontiguousarray(array, dtype=dtype).tofile(out)


def write_cases(path: Path, seed: int = 0, code_shapes=CODE_SHAPES) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as out:
        np.array([len(SHAPES) + len(code_shapes) * len(CODE_CHUNKS)], dtype=np.int64).tofile(out)
        for n, (grid_h, grid_w), channels, kind in SHAPES:
            features = np.maximum(rng.normal(size=(n, grid_h, grid_w, channels)), 0).astype(np.float32)
            bits, sqnorms = encode_features(features)
            mask = case_mask(rng, grid_h, grid_w, kind)
            query = RegionQuery.from_grid_mask(rng.random((grid_h, grid_w, channels)).astype(np.float32), mask)
            kq = KernelQuery.build(query.features, query.weights, query.grid, query.norm)
            expected = reference_scores(from_bfloat16_bits(bits).astype(np.float64),
                                        query.features.astype(np.float64), query.weights.astype(np.float64))
            write_header(out, n, channels, kq, 0)
            for array, dtype in ((bits, np.uint16), (sqnorms, np.float32), (expected, np.float32)):
                np.ascontiguousarray(array, dtype=dtype).tofile(out)
        for n, (grid_h, grid_w), dims, kind in code_shapes:
            stored = rng.integers(0, 16, size=(n, grid_h, grid_w, dims), dtype=np.uint8)
            sqnorms = rng.uniform(0.5, 4, size=(n, grid_h, grid_w)).astype(np.float32)
            mask = case_mask(rng, grid_h, grid_w, kind)
            values = rng.normal(size=(grid_h, grid_w, dims)).astype(np.float32)
            if kind in ("largest", "largest cell"):
                stored[:], values[:] = 15, 1.0
            query = RegionQuery.from_grid_mask(values, mask)
            share = float(rng.normal())
            natural = KernelQuery.for_codes(query.features, query.weights, query.grid, query.norm, share, 16)
            expected = code_contract_scores(natural, stored, sqnorms)  # 16-byte chunks: values in order
            for chunk in CODE_CHUNKS:
                kq = KernelQuery.for_codes(query.features, query.weights, query.grid, query.norm, share, chunk)
                write_header(out, n, dims, kq, chunk)
                for array, dtype in ((kq.code_values, np.int8), (pack_codes(stored), np.uint8),
                                     (sqnorms, np.float32), (expected, np.float32)):
                    np.ascontiguousarray(array, dtype=dtype).tofile(out)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cases") / "cases.bin"
    write_cases(path)
    return path


def build_and_run(compiler: str, flags: list[str], cases: Path, out: Path, runner: list[str] = ()) -> str:
    binary = out / ("harness-" + "-".join(f.strip("-") for f in flags if f.startswith("-m") or f.startswith("-D"))
                    or "harness")
    subprocess.run([compiler, "-O3", *flags, "-fno-math-errno", str(HARNESS), "-o", str(binary), "-lm"],
                   check=True, capture_output=True, text=True, timeout=300)
    done = subprocess.run([*runner, str(binary), str(cases)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("variant", [v for v in PATHS if v != "neon"])
def test_every_x86_path_this_cpu_runs_matches_the_formula(variant, cases, tmp_path):
    if missing_cpu_flags(variant) or shutil.which("cc") is None:
        pytest.skip(f"this machine cannot run the {variant} path ({', '.join(missing_cpu_flags(variant))})")
    output = build_and_run("cc", PATHS[variant][1], cases, tmp_path)
    assert output.startswith(f"ok isa={ISA[variant]} cases={len(SHAPES) + len(CODE_SHAPES)}")


@pytest.mark.parametrize("variant", ["neon", "portable"])
def test_the_arm_paths_match_the_formula_under_qemu(variant, cases, tmp_path):
    compiler, emulator = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (compiler and emulator):
        message = "needs gcc-aarch64-linux-gnu and qemu-user (`sudo apt-get install gcc-aarch64-linux-gnu qemu-user`)"
        if os.environ.get("VFS_REQUIRE_CROSS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    output = build_and_run(compiler, ["-static", *PATHS[variant][1]], cases, tmp_path, [emulator])
    assert output.startswith(f"ok isa={ISA[variant]} cases={len(SHAPES) + len(CODE_SHAPES)}")


def test_the_harness_fails_on_a_wrong_expectation(tmp_path):
    """The check can fail: one expected score changed by 0.01 is reported."""
    broken = tmp_path / "broken.bin"
    write_cases(broken, code_shapes=[])  # the last case, then, is one every path checks
    data = bytearray(broken.read_bytes())
    last = len(data) - 4
    value = np.frombuffer(bytes(data[last:]), dtype=np.float32)[0] + np.float32(0.01)
    data[last:] = np.array([value], dtype=np.float32).tobytes()
    broken.write_bytes(bytes(data))
    binary = tmp_path / "harness"
    subprocess.run(["cc", "-O3", "-DVFS_GENERIC", str(HARNESS), "-o", str(binary), "-lm"], check=True, timeout=300)
    done = subprocess.run([str(binary), str(broken)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "expected" in done.stderr
