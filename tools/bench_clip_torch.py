#!/usr/bin/env python3
"""PyTorch side of `mmke bench clip`: the same work (a random-weight CLIP vision tower plus
projection encoding random image batches) timed the same way (one untimed warm-up batch,
then the median of --iters batches). Prints one JSON line like mmke's.

    python tools/bench_clip_torch.py --preset clip-vit-base-patch32 --batch 16 --iters 5
"""

import argparse
import json
import os
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

PRESETS = {
    "clip-vit-base-patch32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, patch_size=32, projection_dim=512),
    "clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, patch_size=14, projection_dim=768),
}


def gflop_per_image(c):
    """The matrix products' GFLOP per image, counted as mmke's bench::vision_gflop_per_image."""
    d, f = c.hidden_size, c.intermediate_size
    grid = c.image_size // c.patch_size
    t = grid * grid + 1
    embed = (t - 1) * c.num_channels * c.patch_size ** 2 * d
    layer = 4 * t * d * d + 2 * t * t * d + 2 * t * d * f
    return 2 * (embed + c.num_hidden_layers * layer + d * c.projection_dim) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="clip-vit-base-patch32", choices=PRESETS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()

    config = CLIPVisionConfig(image_size=224, hidden_act="quick_gelu", **PRESETS[args.preset])
    model = CLIPVisionModelWithProjection(config).eval()
    pixels = torch.randn(args.batch, 3, 224, 224)

    def run():
        with torch.inference_mode():
            model(pixel_values=pixels).image_embeds

    run()
    seconds = []
    for _ in range(max(args.iters, 1)):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    median = sorted(seconds)[len(seconds) // 2]
    gflop = gflop_per_image(config)
    print(json.dumps({
        "implementation": "pytorch",
        "model": args.preset,
        "backend": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "iters": len(seconds),
        "images_per_second": args.batch / median,
        "gflop_per_image": gflop,
        "gflops": args.batch / median * gflop,
        "seconds": seconds,
    }))


if __name__ == "__main__":
    main()
