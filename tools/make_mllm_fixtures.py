"""Writes tests/fixtures/mllm: tiny random multimodal LLMs of each architecture mmke loads,
in both Hugging Face key layouts, with their inputs and reference outputs.

Two stages, two transformers versions (the hub's checkpoints were written by 4.x, a model
saved today by 5.x):

    # transformers 4.46 (e.g. pip install --target ~/.venvs/tf4 transformers==4.46.3)
    PYTHONPATH=~/.venvs/tf4 python tools/make_mllm_fixtures.py --stage hub
    # transformers 5.x
    python tools/make_mllm_fixtures.py --stage v5
    # a small causal LM on its own (SERAC's counterfactual LM), transformers 5.x
    python tools/make_mllm_fixtures.py --stage lm

Stage `hub` builds each model from a small config whose sizes all differ (odd widths,
grouped-query attention, an explicit head_dim, cross-attention every 2nd of 3 Q-Former
layers), re-randomises every parameter (the default init hides bugs: zero biases, unit
norms, zero query tokens) rounded to bf16 precision (so the f16 and bf16 copies hold the
same values), saves it in 4.x's layout (f32, one of them sharded), and writes
`reference.safetensors`: the inputs, the logits and the intermediate outputs, plus a greedy
generation. Stage `v5` loads that directory with transformers 5.x, checks that it computes
the same logits, and saves it again in 5.x's layout and in half precision. Both stages record
the version and the saved key names (`keys-*.txt`); the image processors' outputs on
tests/fixtures/images come from 5.x.
"""
import argparse
import json
import pathlib

import torch
import transformers
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path("tests/fixtures/mllm")
VOCAB = 72
IMAGE_TOKEN = 71
IMAGES = pathlib.Path("tests/fixtures/images")


def words():
    return [f"w{i}" for i in range(VOCAB)]


def tokenizer_json(specials, bos):
    """A word-level tokenizer: `specials` maps ids to special tokens; BOS is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(words())}
    for i, s in specials.items():
        del vocab[f"w{i}"]
        vocab[s] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials.get(0, "w0")))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials.values()))
    bos_text = specials[bos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_text} $A", pair=f"{bos_text} $A $B", special_tokens=[(bos_text, bos)]
    )
    return tok


def randomise(model):
    """Every parameter random and bf16-representable; norms near 1, the rest N(0, 0.3)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = ("norm" in name.lower()) and name.endswith("weight")
            value = 1.0 + 0.1 * noise if is_norm_weight else 0.3 * noise
            p.copy_(value.to(torch.bfloat16).to(torch.float32))


def opt_text():
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB, hidden_size=28, ffn_dim=44, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=28,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
    )


def llama_text(hidden, head_dim, theta):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=44, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-5,
        rope_theta=theta, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def blip2_config(text):
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(
            hidden_size=20, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
            image_size=16, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        ),
        qformer_config=dict(
            hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            cross_attention_frequency=2, hidden_act="gelu", layer_norm_eps=1e-12,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
        text_config=text.to_dict(),
        num_query_tokens=3,
        image_token_index=IMAGE_TOKEN,
    )


def llava_config():
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        image_size=16, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=16,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=llama_text(36, 6, 500.0).to_dict(),
        image_token_index=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=16,
    )


# name -> (config, image tokens per image, specials, bos, preprocessor config, sharded)
def models():
    blip_pre = {
        "image_processor_type": "BlipImageProcessor", "do_resize": True,
        "size": {"height": 16, "width": 16}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    }
    clip_pre = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": 16}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": 16, "width": 16}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    }
    opt_specials = {1: "<pad>", 2: "</s>", IMAGE_TOKEN: "<image>"}
    llama_specials = {0: "<unk>", 1: "<s>", 2: "</s>", IMAGE_TOKEN: "<image>"}
    return {
        "blip2-opt": (blip2_config(opt_text()), 3, opt_specials, 2, blip_pre, True, "float16"),
        "blip2-llama": (
            blip2_config(llama_text(32, None, 10000.0)), 3, llama_specials, 1, blip_pre, False,
            "bfloat16",
        ),
        "llava": (llava_config(), 16, llama_specials, 1, clip_pre, False, "bfloat16"),
    }


def inputs(image_tokens, bos, llava):
    """Two prompts, the second right-padded; image tokens placed as the processors place
    them (BLIP-2: before BOS; LLaVA: where `<image>` stood, after BOS and a word)."""
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn((2, 3, 16, 16), generator=g)
    texts = [[17, 5, 33, 8, 41, 12], [7, 19, 60]]
    rows = []
    for text in texts:
        if llava:
            rows.append([bos, text[0]] + [IMAGE_TOKEN] * image_tokens + text[1:])
        else:
            rows.append([IMAGE_TOKEN] * image_tokens + [bos] + text)
    width = max(len(r) for r in rows)
    pad = 1 if bos == 2 else 0
    ids = [r + [pad] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return pixel_values, torch.tensor(ids), torch.tensor(mask)


def intermediates(model, name, pixel_values):
    """The vision tower's, Q-Former's and projector's outputs."""
    out = {}
    with torch.no_grad():
        if name.startswith("blip2"):
            vision = model.vision_model(pixel_values=pixel_values).last_hidden_state
            queries = model.query_tokens.expand(vision.shape[0], -1, -1)
            qformer = model.qformer(
                query_embeds=queries, encoder_hidden_states=vision,
                encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long),
            ).last_hidden_state
            out["vision"] = vision
            out["qformer"] = qformer
            out["projected"] = model.language_projection(qformer)
        else:
            tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
            projector = (
                model.multi_modal_projector if hasattr(model, "multi_modal_projector")
                else model.model.multi_modal_projector
            )
            hidden = tower(pixel_values, output_hidden_states=True).hidden_states
            features = hidden[-2][:, 1:]
            out["vision"] = features
            out["projected"] = projector(features)
    return out


def processor_outputs(preprocessor):
    """What the model's image processor makes of the shipped test images."""
    from PIL import Image

    kind = preprocessor["image_processor_type"]
    cls = getattr(transformers, kind)
    args = {k: v for k, v in preprocessor.items() if k != "image_processor_type"}
    out = {}
    variants = [("", args)]
    if kind == "CLIPImageProcessor":
        # LLaVA-1.5's own preprocessing pads to a square with the mean colour first.
        variants.append(("pad-", args))
    for prefix, a in variants:
        processor = cls(**a)
        for path in sorted(IMAGES.glob("*.png")):
            image = Image.open(path)
            if prefix:
                image = expand_to_square(on_white(image), a["image_mean"])
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
            out[f"image-{prefix}{path.stem}"] = pixels[0]
    return out


def on_white(image):
    """RGB, with transparency composited on white (as transformers' `convert_to_rgb`)."""
    from PIL import Image

    if image.mode != "RGBA":
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255))
    white.paste(image, mask=image)
    return white.convert("RGB")


def expand_to_square(image, mean):
    """LLaVA-1.5's `expand2square`: pad the short side with the mean colour, centred."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    colour = tuple(int(m * 255) for m in mean)
    side = max(w, h)
    result = Image.new(image.mode, (side, side), colour)
    result.paste(image, ((side - w) // 2, (side - h) // 2))
    return result


def model_class(name):
    if name.startswith("blip2"):
        return transformers.Blip2ForConditionalGeneration
    return transformers.LlavaForConditionalGeneration


def forward(model, pixel_values, ids, mask):
    with torch.no_grad():
        return model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits


def write_keys(directory, stage):
    keys = []
    for f in sorted(directory.glob("*.safetensors")):
        keys += [f"{k} {list(v.shape)} {v.dtype}" for k, v in load_file(f).items()]
    (directory.parent / f"keys-{stage}.txt").write_text(
        f"# transformers {transformers.__version__}\n" + "\n".join(sorted(keys)) + "\n"
    )


def stage_hub():
    for name, (config, n_image, specials, bos, pre, sharded, _) in models().items():
        base = ROOT / name
        out = base / "hub"
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = model_class(name)._from_config(config, attn_implementation="eager").eval()
        randomise(model)
        kwargs = {"max_shard_size": "40KB"} if sharded else {}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
        tok = tokenizer_json(specials, bos)
        tok.save(str(out / "tokenizer.json"))
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))

        llava = name == "llava"
        pixel_values, ids, mask = inputs(n_image, bos, llava)
        reference = {
            "pixel_values": pixel_values,
            "input_ids": ids,
            "attention_mask": mask,
            "logits": forward(model, pixel_values, ids, mask),
        }
        reference.update(intermediates(model, name, pixel_values))
        # A greedy answer to one prompt about the first image.
        prompt, gen_ids = generation_prompt(tok, n_image, llava)
        with torch.no_grad():
            generated = model.generate(
                pixel_values=pixel_values[:1], input_ids=gen_ids,
                attention_mask=torch.ones_like(gen_ids), max_new_tokens=6, do_sample=False,
                min_new_tokens=6,
            )
        reference["generate_input_ids"] = gen_ids
        # 4.46 returns the prompt and the answer (BLIP-2's prompt without its query tokens).
        reference["generated"] = generated[:, -6:]
        save_file({k: v.contiguous() for k, v in reference.items()}, base / "reference.safetensors")
        (base / "prompt.txt").write_text(prompt + "\n")
        write_keys(out, "hub")
        print(f"{name}: hub layout, transformers {transformers.__version__}")


def generation_prompt(tok, n_image, llava):
    """The prompt text and the ids its processor builds: BLIP-2 puts the query tokens before
    BOS; LLaVA expands `<image>` where it stands."""
    if llava:
        prompt = "w9 <image> w21 w33"
        text = prompt.replace("<image>", "<image>" * n_image)
        ids = tok.encode(text).ids
    else:
        prompt = "w9 w21 w33"
        ids = [IMAGE_TOKEN] * n_image + tok.encode(prompt).ids
    return prompt, torch.tensor([ids])


def image16():
    """A 16 x 16 RGB test image (the tiny models' input size), made once."""
    import numpy as np
    from PIL import Image

    path = ROOT / "image16.png"
    if not path.exists():
        rng = np.random.default_rng(3)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def stage_v5():
    for name, (_, _, _, _, _, sharded, dtype) in models().items():
        base = ROOT / name
        reference = load_file(base / "reference.safetensors")
        model = model_class(name).from_pretrained(base / "hub", attn_implementation="eager").eval()
        logits = forward(model, reference["pixel_values"], reference["input_ids"],
                         reference["attention_mask"])
        keep = reference["attention_mask"].bool()
        diff = (logits - reference["logits"])[keep].abs().max().item()
        assert diff < 1e-5, f"{name}: transformers 5 differs from 4 by {diff}"
        gen_ids = reference["generate_input_ids"]
        with torch.no_grad():
            generated = model.generate(
                pixel_values=reference["pixel_values"][:1], input_ids=gen_ids,
                attention_mask=torch.ones_like(gen_ids), max_new_tokens=6, do_sample=False,
                min_new_tokens=6,
            )[:, -6:]
        assert torch.equal(generated, reference["generated"]), f"{name}: generate differs"
        out = base / "v5"
        # A model loaded from a checkpoint saves back in that checkpoint's layout; one built
        # from its config saves in 5.x's own.
        fresh = model_class(name)._from_config(model.config, attn_implementation="eager")
        fresh.load_state_dict(model.state_dict())
        model = fresh.eval().to(getattr(torch, dtype))
        kwargs = {"max_shard_size": "40KB"} if name == "llava" else {}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
        for f in ["tokenizer.json", "preprocessor_config.json"]:
            (out / f).write_bytes((base / "hub" / f).read_bytes())
        write_keys(out, "v5")
        # Preprocessing follows the newest processors (4.46's dropped an alpha channel; 5.x
        # composites it on white).
        pre = json.loads((base / "hub" / "preprocessor_config.json").read_text())
        reference.update(processor_outputs(pre))
        # The command line's answer about an image file at the model's size (no resampling),
        # preprocessed by the processor.
        from PIL import Image

        cls = getattr(transformers, pre["image_processor_type"])
        processor = cls(**{k: v for k, v in pre.items() if k != "image_processor_type"})
        pixels = processor(images=Image.open(image16()), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            answer = model.to(torch.float32).generate(
                pixel_values=pixels, input_ids=gen_ids, attention_mask=torch.ones_like(gen_ids),
                max_new_tokens=6, min_new_tokens=6, do_sample=False,
            )[:, -6:]
        reference["image16_generated"] = answer
        # transformers' own error in the stored half precision, the bound mmke's is held to.
        half = model_class(name).from_pretrained(
            out, dtype=getattr(torch, dtype), attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            half_logits = half(
                pixel_values=reference["pixel_values"].to(getattr(torch, dtype)),
                input_ids=reference["input_ids"], attention_mask=reference["attention_mask"],
            ).logits.float()
        error = (half_logits - reference["logits"])[keep].abs().max()
        reference["half_precision_error"] = error.reshape(1)
        print(f"{name}: transformers in {dtype} differs from f32 by {error.item():.3e}")
        save_file({k: v.contiguous() for k, v in reference.items()}, base / "reference.safetensors")
        print(f"{name}: v5 layout ({dtype}), transformers {transformers.__version__}, "
              f"max |5.x - 4.x| logits {diff:.2e}")


def stage_lm():
    """A small causal LM on its own (SERAC's counterfactual LM beside BLIP-2 OPT: the
    fixtures' vocabulary, a narrower width), saved as `OPTForCausalLM`, with reference logits."""
    from transformers import OPTConfig, OPTForCausalLM

    out = ROOT / "opt-lm"
    out.mkdir(parents=True, exist_ok=True)
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=20, ffn_dim=36, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=20,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = OPTForCausalLM._from_config(config, attn_implementation="eager").eval()
    randomise(model)
    model.save_pretrained(out, safe_serialization=True)
    keys = [f"{k} {list(v.shape)} {v.dtype}" for k, v in load_file(out / "model.safetensors").items()]
    (out / "keys.txt").write_text(
        f"# transformers {transformers.__version__}\n" + "\n".join(sorted(keys)) + "\n"
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB - 1, (2, 7), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()},
              out / "reference.safetensors")
    print(f"opt-lm: transformers {transformers.__version__}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["hub", "v5", "lm"], required=True)
    args = parser.parse_args()
    {"hub": stage_hub, "v5": stage_v5, "lm": stage_lm}[args.stage]()


if __name__ == "__main__":
    main()
