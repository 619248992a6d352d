#!/usr/bin/env python3
"""Writes the CLIP parity fixtures under tests/fixtures/ with PyTorch + transformers (CPU).

    python tools/make_clip_fixture.py                 # regenerate tests/fixtures/
    python tools/make_clip_fixture.py --check-export DIR --against tests/fixtures/clip-tiny

The first form writes two tiny random CLIPs in Hugging Face layout, which differ in every size
and in activation so that nothing in mmke can assume one of them:

  clip-tiny       quick_gelu, legacy pooling (eos_token_id = 2 -> argmax of ids), image 32,
                  patch 8, f32 weights
  clip-tiny-gelu  gelu, pooling at the first eos id, image 30, patch 6, f16 weights (the
                  reference is computed from the f16-rounded weights in f32), plus
                  model.bf16.safetensors and its own text reference

LayerNorm weights and biases are perturbed away from 1/0. Both share a small byte-level BPE
tokenizer.json with <|startoftext|> / <|endoftext|> (the largest ids, as in OpenAI's vocab).
PNG images in tests/fixtures/images/ come in the models' exact input sizes (no resize) and in
other sizes and modes (resize, crop, RGBA). expected.json holds the reference input ids,
pixel values, embeddings and logits computed by transformers' CLIPModel with the PIL image
processor (CLIPImageProcessorPil: PIL bicubic, as the classic CLIPImageProcessor).

The second form loads a directory mmke exported (`mmke clip export`) with
CLIPModel.from_pretrained and checks it reproduces the original directory's expected.json.

Needs: torch (CPU), transformers, tokenizers, safetensors, pillow, numpy.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

CORPUS = [
    "a photo of a cat", "a photo of a dog", "a red circle", "a blue square", "a green triangle",
    "the shape in the top left", "the large star", "is there a yellow cross", "how many shapes",
    "what color is the diamond", "a small purple circle next to an orange square",
    "the capital of france is paris", "two plus two is four",
] * 4

TEXTS = [
    "a photo of a cat",
    "what color is the circle in the top left?",
    "A Large RED star",
    # Longer than max_position_embeddings (16): truncated, keeping the end-of-text token.
    "a small purple circle next to an orange square and a green triangle below a yellow cross",
    "zebra",
]

# (file, width, height, mode)
IMAGES = [
    ("exact32.png", 32, 32, "RGB"),
    ("exact30.png", 30, 30, "RGB"),
    ("wide57x41.png", 57, 41, "RGB"),
    ("tall20x45_rgba.png", 20, 45, "RGBA"),
    ("big96x80.png", 96, 80, "RGB"),
]

MODELS = {
    "clip-tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=24, logit_scale=2.6592, dtype=torch.float32, exact="exact32.png", seed=1,
    ),
    "clip-tiny-gelu": dict(
        text=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
                  max_position_embeddings=16, hidden_act="gelu"),
        vision=dict(hidden_size=36, intermediate_size=50, num_hidden_layers=1, num_attention_heads=6,
                    image_size=30, patch_size=6, hidden_act="gelu"),
        projection_dim=20, logit_scale=3.1, dtype=torch.float16, exact="exact30.png", seed=2,
    ),
}


def make_tokenizer():
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # CLIP's pre-tokenization: its word regex, then byte-level symbols.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=320, end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    # Added last, so they get the largest ids, as in OpenAI's vocabulary.
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", eos), ("<|startoftext|>", bos), trim_offsets=False, add_prefix_space=False
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def encode(tok, texts, max_len):
    tok = Tokenizer.from_str(tok.to_str())
    eos = tok.token_to_id("<|endoftext|>")
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=eos, pad_token="<|endoftext|>")
    enc = tok.encode_batch(texts)
    return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


def make_images(dir):
    os.makedirs(dir, exist_ok=True)
    rng = np.random.default_rng(7)
    for name, w, h, mode in IMAGES:
        y, x = np.mgrid[0:h, 0:w]
        channels = [
            127 + 100 * np.sin(x / (2 + k) + y / (3 + k) + k) + rng.normal(0, 20, (h, w))
            for k in range(3 if mode == "RGB" else 4)
        ]
        array = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
        Image.fromarray(array, mode).save(os.path.join(dir, name))


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 16
                p.copy_(noise * (1.5 / fan_in) ** 0.5)


def build(name, spec, tok, image_dir):
    torch.manual_seed(spec["seed"])
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    text = dict(spec["text"], vocab_size=vocab, bos_token_id=tok.token_to_id("<|startoftext|>"),
                pad_token_id=eos, projection_dim=spec["projection_dim"])
    text.setdefault("eos_token_id", eos)
    vision = dict(spec["vision"], projection_dim=spec["projection_dim"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"],
                        logit_scale_init_value=spec["logit_scale"])
    model = CLIPModel(config).eval()
    perturb(model, spec["seed"])
    # The reference is computed from exactly the weights that are stored.
    model = model.to(spec["dtype"]).to(torch.float32)

    out = os.path.join(ROOT, name)
    os.makedirs(out, exist_ok=True)
    model.to(spec["dtype"]).save_pretrained(out, safe_serialization=True)
    model = model.to(torch.float32)
    tok.save(os.path.join(out, "tokenizer.json"))
    size = vision["image_size"]
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(out)

    expected = reference(model, tok, processor, image_dir, text["max_position_embeddings"])
    expected["exact_size_images"] = [spec["exact"]]
    if spec["dtype"] != torch.float32:
        bf16 = model.to(torch.bfloat16)
        bf16.save_pretrained(os.path.join(out, "bf16"), safe_serialization=True)
        os.replace(os.path.join(out, "bf16", "model.safetensors"), os.path.join(out, "model.bf16.safetensors"))
        for f in os.listdir(os.path.join(out, "bf16")):
            os.remove(os.path.join(out, "bf16", f))
        os.rmdir(os.path.join(out, "bf16"))
        ids, mask = encode(tok, TEXTS, text["max_position_embeddings"])
        with torch.no_grad():
            t = bf16.to(torch.float32).get_text_features(input_ids=ids, attention_mask=mask)
        expected["text_embeds_bf16"] = torch.nn.functional.normalize(features(t), dim=-1).tolist()
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters")


def features(x):
    # transformers 5 returns a model output from get_*_features; 4.x a tensor.
    return x if torch.is_tensor(x) else x.pooler_output


def reference(model, tok, processor, image_dir, max_len):
    names = [n for n, *_ in IMAGES]
    images = [Image.open(os.path.join(image_dir, n)) for n in names]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ids, mask = encode(tok, TEXTS, max_len)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    return {
        "images": names,
        "texts": TEXTS,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "pixel_values_sum": [float(p.double().sum()) for p in pixels],
        "pixel_values_first": pixels[0].flatten().tolist(),
        "image_embeds": out.image_embeds.tolist(),
        "text_embeds": out.text_embeds.tolist(),
        "logits_per_image": out.logits_per_image.tolist(),
    }


def check_export(exported, original):
    """Loads mmke's export with transformers and compares it with the original reference."""
    expected = json.load(open(os.path.join(original, "expected.json")))
    model = CLIPModel.from_pretrained(exported).eval()
    tok = Tokenizer.from_file(os.path.join(exported, "tokenizer.json"))
    processor = CLIPImageProcessorPil.from_pretrained(exported)
    image_dir = os.path.join(ROOT, "images")
    got = reference(model, tok, processor, image_dir, model.config.text_config.max_position_embeddings)
    worst = 0.0
    for key in ["image_embeds", "text_embeds", "logits_per_image"]:
        diff = float(np.abs(np.array(got[key]) - np.array(expected[key])).max())
        print(f"{key}: max |diff| = {diff:.2e}")
        worst = max(worst, diff if key != "logits_per_image" else diff / 100)
    if worst > 1e-5:
        sys.exit(f"export of {original} does not reproduce its reference")
    print("export loads in transformers and reproduces the reference")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-export", metavar="DIR")
    parser.add_argument("--against", metavar="DIR", default=os.path.join(ROOT, "clip-tiny"))
    args = parser.parse_args()
    if args.check_export:
        check_export(args.check_export, args.against)
        return
    image_dir = os.path.join(ROOT, "images")
    make_images(image_dir)
    tok = make_tokenizer()
    for name, spec in MODELS.items():
        build(name, spec, tok, image_dir)


if __name__ == "__main__":
    main()
