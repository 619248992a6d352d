#!/usr/bin/env python3
"""CLIP ViT-B/32 image encoding on the CPU, mmke (`mmke bench clip`) against PyTorch
(`tools/bench_clip_torch.py`), side by side: alternating runs, the median of each, their
ratio. Writes the record to docs/results/bench-clip-cpu.md (through a temporary file) and
prints it. Run with the Python that has torch and transformers:

    ~/.venvs/fixtures/bin/python tools/bench_compare.py --mmke target/release/mmke --runs 3
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(command):
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_simd():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(l for l in f if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(x for x in ["avx2", "fma", "avx512f"] if x in flags)


def commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_atomic(path, text):
    """Writes `text` to `path` through a temporary file in the same folder, then a rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mmke", default=os.path.join(ROOT, "target/release/mmke"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "docs/results/bench-clip-cpu.md"))
    p.add_argument("--candidate", action="append", default=[], metavar="LABEL=BINARY:BACKEND",
                   help="another mmke build and backend timed in the same alternation, e.g. "
                        "'ndarray + OpenBLAS=/tmp/mmke-ndarray:ndarray'")
    args = p.parse_args()

    sizes = ["--batch", str(args.batch), "--iters", str(args.iters)]
    candidates = []
    for spec in args.candidate:
        label, rest = spec.split("=", 1)
        binary, backend = rest.rsplit(":", 1)
        candidates.append((label, binary, backend, []))
    mmke, torch = [], []
    for _ in range(args.runs):
        mmke.append(run_json([args.mmke, "bench", "clip", *sizes]))
        for _, binary, backend, results in candidates:
            results.append(run_json([binary, "bench", "clip", "--backend", backend, *sizes]))
        torch.append(run_json([sys.executable, os.path.join(ROOT, "tools/bench_clip_torch.py"),
                               *sizes]))
    # The cores' multiply-add limit, measured on the same threads the runs use.
    fma = run_json([args.mmke, "bench", "fma", "--threads", str(mmke[0]["threads"])])
    limit = fma["gflops"]
    m = statistics.median(r["images_per_second"] for r in mmke)
    t = statistics.median(r["images_per_second"] for r in torch)
    gflop = mmke[0]["gflop_per_image"]
    rows = "\n".join(
        f"| {i + 1} | {a['images_per_second']:.2f} | {b['images_per_second']:.2f} |"
        for i, (a, b) in enumerate(zip(mmke, torch)))
    others = "".join(
        f"| mmke, {label} (`--backend {backend}`) | "
        + ", ".join(f"{r['images_per_second']:.2f}" for r in results)
        + f" | {statistics.median(r['images_per_second'] for r in results):.2f} | "
        + f"{statistics.median(r['images_per_second'] for r in results) * gflop:.0f} "
        + f"({statistics.median(r['images_per_second'] for r in results) * gflop / limit:.0%}) | "
        + f"{statistics.median(r['images_per_second'] for r in results) / t:.2f}x |\n"
        for label, _, backend, results in candidates)
    candidates_table = "" if not candidates else f"""
Other CPU candidates, timed in the same alternation:

| candidate | images/s per run | median | GFLOP/s (of the FMA limit) | vs PyTorch |
| --- | --- | --- | --- | --- |
{others}"""
    record = f"""# CLIP ViT-B/32 image encoding on the CPU: mmke vs PyTorch

`python tools/bench_compare.py --runs {args.runs}{''.join(f" --candidate '{c}'" for c in args.candidate)}`
(commit {commit()}): a random-weight CLIP vision tower plus projection encoding batches of
{args.batch} random 224 x 224 images, one untimed warm-up batch, then the median of {args.iters}
batches; `mmke bench clip` (flex) and `tools/bench_clip_torch.py` (PyTorch
{torch[0]['torch']}) alternate {args.runs} times, on the same threads ({mmke[0]['threads']} and
{torch[0]['threads']}).

| run | mmke images/s | PyTorch images/s |
| --- | --- | --- |
{rows}

| | mmke | PyTorch |
| --- | --- | --- |
| median images/s | {m:.2f} | {t:.2f} |
| GFLOP/s (matrix products, {gflop:.2f} GFLOP per image) | {m * gflop:.0f} | {t * gflop:.0f} |
| share of the FMA limit ({limit:.0f} GFLOP/s) | {m * gflop / limit:.0%} | {t * gflop / limit:.0%} |
| ratio | **{m / t:.2f}x** | 1.00x |
{candidates_table}
FMA limit: `mmke bench fma` measured {limit:.0f} GFLOP/s on {fma['threads']} threads
({fma['instructions']}, {fma['lanes']} f32 lanes; independent multiply-adds on registers,
best of {len(fma['runs'])} runs: {', '.join(f"{x:.0f}" for x in fma['runs'])}).

Machine: {cpu_model()}, {os.cpu_count()} threads, {cpu_simd()}. The matrix products are most
of the time (gemm's AVX-512 kernels where the CPU has them, chosen at run time; AVX2 and FMA
otherwise).
"""
    write_atomic(args.out, record)
    print(record)


if __name__ == "__main__":
    main()
