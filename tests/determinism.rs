//! Determinism: the same preset and seeds give the same numbers. In a test binary of its
//! own, because the device's random generator is shared by the tests of one process, and
//! tests running beside it would draw from it in between.

use burn::tensor::Device;
use mmke::experiment::load_preset;

const TINY_UNIKE: &str = r#"
description = "tiny UniKE experiments for tests"
[presets.tiny]
data = { train = 6, test = 2, seed = 3, image_size = 32 }
clip_preset = "clip-tiny"
clip_image_size = 32
clip = { steps = 2, batch_size = 4, lr = 1e-3, seed = 0, scene_size = 32, checkpoint_every = 2, grounding_weight = 1.0 }
scope_model = { mode = "text-only", fusion = "dot-product", dim = 16, attention_dim = 16 }
scope_train = { steps = 2, batch_size = 8, lr = 1e-3, validate_every = 2, checkpoint_every = 2, seed = 0 }
vlm_preset = "vlm-tiny"
vlm = { steps = 2, batch_size = 4, lr = 1e-3, text_every = 2, checkpoint_every = 2, seed = 0, freeze_vision = true }
counterfactual_preset = "vlm-tiny"
counterfactual = { steps = 2, batch_size = 4, lr = 1e-3, text_every = 2, checkpoint_every = 2, seed = 0 }
knowledge = { max_triplets = 4, truth_dim = 8, steps = 3, batch_size = 4, lr = 1e-4, temperature = 0.1, seed = 0 }
unike = { neurons = 2, layers = 2, steps = 2, lr = 1e-2, key_threshold = 0.5, in_context = "latent", top_k = 3, alpha = "dynamic", zeta = "truthfulness", beta = 0.1 }
finetune_steps = 1
finetune_lr = 1e-3
ike_demonstrations = 1
tpatcher = { neurons = 1, steps = 1, lr = 1e-2, activation_weight = 1.0, memory_weight = 1.0, margin = 0.5, memory_queries = 2 }
mend = { layers = 1, rank = 4, blocks = 1, edit_lr = 1e-4 }
mend_train = { steps = 2, lr = 1e-3, edit_weight = 0.1, locality_weight = 1.0, checkpoint_every = 2, seed = 0 }
ke = { layers = 1, hidden = 4, edit_lr = 1.0 }
ke_train = { steps = 2, lr = 1e-3, edit_weight = 0.1, locality_weight = 1.0, checkpoint_every = 2, seed = 0 }
eval_records = 2
sweep_records = 2
sequential = [2]
top_ks = [2]
alphas = [0.5]
"#;

#[test]
fn the_same_preset_and_seeds_give_identical_numbers_end_to_end() {
    use mmke::experiment::unike::{self, Preset, Which};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny.toml");
    std::fs::write(&file, TINY_UNIKE).unwrap();
    let preset: Preset = load_preset("unike", Some(&file), "tiny").unwrap();
    // Everything trained from scratch twice (CLIP, classifier, VLMs, knowledge, MEND, KE),
    // then every UniKE ablation: the same numbers.
    let run = |name: &str| {
        let out = dir.path().join(name);
        unike::run(Which::Table4, &preset, None, &out, &Device::flex()).unwrap()[0]
            .1
            .rows
            .iter()
            .map(|r| r.values.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(run("first"), run("second"));
}
