"""Writes tests/fixtures/opt-tiny: a tiny random OPTForCausalLM (transformers) and the logits
and hidden states it computes, for mmke's OPT-style decoder parity test.

    python tools/make_opt_fixture.py [--out tests/fixtures/opt-tiny]
"""
import argparse
import json
import pathlib

import torch
from transformers import OPTConfig, OPTForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tests/fixtures/opt-tiny")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=61,
        hidden_size=24,
        ffn_dim=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=20,
        word_embed_proj_dim=24,
        do_layer_norm_before=True,
        activation_function="relu",
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        enable_bias=True,
    )
    model = OPTForCausalLM(config).eval()
    # Random, not the init's near-zero values, so every term matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "layer_norm" not in name else 0.1)
                    + (1.0 if name.endswith("layer_norm.weight") else 0.0))
    model.save_pretrained(out, safe_serialization=True)

    # Right padding (positions follow the mask; padded positions are not compared).
    ids = [[2, 17, 5, 33, 8, 41, 12, 9], [2, 7, 19, 60, 3, 1, 1, 1]]
    mask = [[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]]
    with torch.no_grad():
        result = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            output_hidden_states=True,
        )
    reference = {
        "input_ids": ids,
        "attention_mask": mask,
        "logits": result.logits.tolist(),
        # hidden_states[0] = embeddings + positions; the last has the final layer norm.
        "hidden_states": [h.tolist() for h in result.hidden_states],
    }
    (out / "reference.json").write_text(json.dumps(reference))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
