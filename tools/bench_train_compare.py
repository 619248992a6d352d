#!/usr/bin/env python3
"""Training throughput on the CPU, mmke (`mmke bench train`) against PyTorch
(`tools/bench_train_torch.py`, the same two architectures at the shapes mmke reports),
side by side: alternating runs, the median of each, their ratio. Writes the record to
docs/results/bench-train-cpu.md (through a temporary file) and prints it. Run with the
Python that has torch:

    ~/.venvs/fixtures/bin/python tools/bench_train_compare.py --mmke target/release/mmke --runs 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench_compare import ROOT, commit, cpu_model, cpu_simd, write_atomic


def json_lines(command):
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def torch_args(mmke_results, steps):
    scope = next(r for r in mmke_results if r["model"] == "scope-multimodal")
    vlm = next(r for r in mmke_results if r["model"] == "vlm")
    s, v = scope["shapes"], vlm["shapes"]
    return ["--vocab", str(v["vocab"]), "--scope-batch", str(scope["batch"]),
            "--scope-edit-tokens", str(s["edit_tokens"]),
            "--scope-query-tokens", str(s["query_tokens"]),
            "--vlm-batch", str(vlm["batch"]), "--vlm-tokens", str(v["tokens"]),
            "--vlm-prompt-tokens", str(v["prompt_tokens"]),
            "--vlm-text-tokens", str(v["text_tokens"]), "--steps", str(steps)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mmke", default=os.path.join(ROOT, "target/release/mmke"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="timed steps per model and run")
    p.add_argument("--out", default=os.path.join(ROOT, "docs/results/bench-train-cpu.md"))
    args = p.parse_args()

    mmke, torch = [], []
    for _ in range(args.runs):
        mmke.append(json_lines([args.mmke, "bench", "train", "--iters", str(args.iters)]))
        torch.append(json_lines([sys.executable, os.path.join(ROOT, "tools/bench_train_torch.py"),
                                 *torch_args(mmke[-1], args.iters)]))
    models = [r["model"] for r in mmke[0]]

    def per_run(results, model):
        return [next(r for r in run if r["model"] == model)["steps_per_second"] for run in results]

    rows, summary = [], []
    for model in models:
        m, t = per_run(mmke, model), per_run(torch, model)
        for i, (a, b) in enumerate(zip(m, t)):
            rows.append(f"| {model} | {i + 1} | {a:.2f} | {b:.2f} |")
        mm, tm = statistics.median(m), statistics.median(t)
        batch = mmke[0][models.index(model)]["batch"]
        summary.append(f"| {model} | {batch} | {mm:.2f} | {tm:.2f} | **{mm / tm:.2f}x** |")
    shapes = "; ".join(f"{r['model']}: " + ", ".join(f"{k} {v}" for k, v in r["shapes"].items())
                       for r in mmke[0])
    nl = "\n"
    record = f"""# Training throughput on the CPU: mmke vs PyTorch

`python tools/bench_train_compare.py --runs {args.runs} --iters {args.iters}` (commit {commit()}):
one optimizer step of MSCKE's multimodal scope classifier and of the base VLM
(vlm-tiny-objects) at the quick preset's sizes, batch and optimizer. `mmke bench train` (flex)
trains each through its real training loop, batches from the scenes data included;
`tools/bench_train_torch.py` (PyTorch {torch[0][0]['torch']}, eager) runs the same
architectures on random batches of the shapes mmke reports ({shapes}). They alternate
{args.runs} times on the same threads ({mmke[0][0]['threads']} and {torch[0][0]['threads']}),
{args.iters} timed steps per model and run.

| model | run | mmke steps/s | PyTorch steps/s |
| --- | --- | --- | --- |
{nl.join(rows)}

| model | batch | mmke (median) | PyTorch (median) | ratio |
| --- | --- | --- | --- | --- |
{nl.join(summary)}

Machine: {cpu_model()}, {os.cpu_count()} threads, {cpu_simd()}. docs/speed.md says where
each step's time goes.
"""
    write_atomic(args.out, record)
    print(record)


if __name__ == "__main__":
    main()
