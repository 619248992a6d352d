#!/usr/bin/env python3
"""Where a training step's time goes in mmke: samples `mmke bench train` with Linux perf
(`linux-perf`; software clock, so it works where hardware counters are not exposed), sorts
the samples by symbol into a few kinds of work and writes the shares to
docs/results/profile-train-cpu.md (through a temporary file). With many timed steps the
set-up the command also runs (data, a one-step CLIP, the evaluations) is a small part.

    python3 tools/profile_train.py --mmke target/release/mmke --iters 60
"""

import argparse
import os
import re
import subprocess
import tempfile
from collections import defaultdict

from bench_compare import ROOT, commit, cpu_model, write_atomic

# First match wins: (kind, pattern over "dso symbol").
KINDS = [
    ("matrix products (gemm)", r"gemm"),
    ("autodiff graph and gradients (burn-autodiff)", r"burn_autodiff"),
    ("memory: allocation, copies, zeroing", r"malloc|free|memcpy|memmove|memset|realloc|"
     r"cfree|_int_|alloc::|mmap|munmap|page_fault|clear_page|do_anonymous|\[k\] .*(mm_|page)"),
    ("element-wise ops and reductions (burn-flex)", r"burn_flex|burn_backend|macerator|"
     r"pulp|exp|log|tanh|expf|logf|libm"),
    ("threads: scheduling, waiting (rayon, kernel)", r"rayon|crossbeam|futex|sched|"
     r"\[k\]|syscall|spin"),
    ("batching and data (tokenizers, images)", r"tokenizers|image::|png|imageproc|serde"),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mmke", default=os.path.join(ROOT, "target/release/mmke"))
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--frequency", type=int, default=499)
    p.add_argument("--out", default=os.path.join(ROOT, "docs/results/profile-train-cpu.md"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", str(args.frequency),
                        "-o", data, "--", args.mmke, "bench", "train", "--iters",
                        str(args.iters)], check=True, capture_output=True)
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                                 "--sort", "dso,symbol", "--percent-limit", "0"],
                                check=True, capture_output=True, text=True).stdout
    shares = defaultdict(float)
    top = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(.*)$", line)
        if not m:
            continue
        share, dso, symbol = float(m.group(1)), m.group(2), m.group(3).strip()
        text = f"{dso} {symbol}"
        kind = next((k for k, pattern in KINDS if re.search(pattern, text)), "other")
        shares[kind] += share
        if len(top) < 12:
            top.append((share, dso, re.sub(r"\s+", " ", symbol)[:90], kind))
    rows = "\n".join(f"| {k} | {shares[k]:.1f}% |"
                     for k in [k for k, _ in KINDS] + ["other"] if shares[k] > 0)
    symbols = "\n".join(f"| {s:.1f}% | {d} | `{sym}` | {k} |" for s, d, sym, k in top)
    record = f"""# Where mmke's training step spends its time (CPU)

`python3 tools/profile_train.py --iters {args.iters}` (commit {commit()}): `perf record -e
cpu-clock -F {args.frequency}` over `mmke bench train --iters {args.iters}` (the scope classifier
and the VLM, {args.iters} timed steps each, plus the command's set-up), the samples sorted by
symbol into kinds of work. Machine: {cpu_model()}, {os.cpu_count()} threads.

| kind of work | share of samples |
| --- | --- |
{rows}

The heaviest symbols:

| share | object | symbol | kind |
| --- | --- | --- | --- |
{symbols}
"""
    write_atomic(args.out, record)
    print(record)


if __name__ == "__main__":
    main()
