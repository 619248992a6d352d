//! The OPT-style decoder against `transformers`' `OPTForCausalLM` on a tiny random config
//! (tests/fixtures/opt-tiny, written by tools/make_opt_fixture.py).

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use mmke::model::lm::{ExtraNeurons, Hooks, OptConfig, OptForCausalLM};

#[path = "common/env.rs"]
mod test_env;
use test_env::device;

fn fixture() -> PathBuf {
    test_env::root().join("tests/fixtures/opt-tiny")
}

struct Reference {
    ids: Vec<Vec<i64>>,
    mask: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f32>>>,
    hidden_states: Vec<Vec<Vec<Vec<f32>>>>,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    fn get<T: serde::de::DeserializeOwned>(json: &serde_json::Value, key: &str) -> T {
        serde_json::from_value(json[key].clone()).unwrap()
    }
    Reference {
        ids: get(&json, "input_ids"),
        mask: get(&json, "attention_mask"),
        logits: get(&json, "logits"),
        hidden_states: get(&json, "hidden_states"),
    }
}

fn int2(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let shape = [rows.len(), rows[0].len()];
    let flat: Vec<i64> = rows.concat();
    Tensor::from_data(TensorData::new(flat, shape), device)
}

fn load(device: &Device) -> (OptConfig, OptForCausalLM) {
    let config = OptConfig::from_file(&fixture().join("config.json")).unwrap();
    let model = OptForCausalLM::new(&config, device)
        .load_safetensors(&fixture().join("model.safetensors"))
        .unwrap();
    (config, model)
}

/// Max |a - b| over the positions the mask keeps.
fn max_diff(got: &Tensor<3>, want: &[Vec<Vec<f32>>], mask: &[Vec<i64>]) -> f32 {
    let [_, seq, width] = got.dims();
    let got: Vec<f32> = got.clone().into_data().try_to_vec().unwrap();
    let mut max = 0f32;
    for (b, rows) in want.iter().enumerate() {
        for (t, row) in rows.iter().enumerate() {
            if mask[b][t] == 0 {
                continue;
            }
            for (k, &w) in row.iter().enumerate() {
                max = max.max((got[(b * seq + t) * width + k] - w).abs());
            }
        }
    }
    max
}

#[test]
fn logits_and_hidden_states_match_transformers() {
    let device = device();
    let r = reference();
    let (config, model) = load(&device);
    assert_eq!(model.num_layers(), config.num_hidden_layers);
    let hooks = Hooks {
        capture: true,
        ..Hooks::default()
    };
    let out = model.forward_with(int2(&r.ids, &device), int2(&r.mask, &device), &hooks);
    assert_eq!(out.hidden_states.len(), r.hidden_states.len());
    // hidden_states[0] holds the position embeddings: the offset of 2 is checked here.
    for (i, (got, want)) in out.hidden_states.iter().zip(&r.hidden_states).enumerate() {
        let diff = max_diff(got, want, &r.mask);
        assert!(diff < 1e-4, "hidden state {i}: max |diff| {diff}");
    }
    let diff = max_diff(&out.logits, &r.logits, &r.mask);
    assert!(diff < 1e-4, "logits: max |diff| {diff}");
}

#[test]
fn zero_extra_neurons_and_a_zero_shift_leave_the_outputs_unchanged() {
    let device = device();
    let r = reference();
    let (config, model) = load(&device);
    let ids = int2(&r.ids, &device);
    let mask = int2(&r.mask, &device);
    let before: Vec<f32> = model
        .forward(ids.clone(), mask.clone())
        .logits
        .into_data()
        .try_to_vec()
        .unwrap();

    let mut edited = model.clone();
    let last = edited.num_layers() - 1;
    // Fresh extra neurons have zero values; a zero shift adds nothing.
    edited.model.decoder.layers[last].extra =
        vec![ExtraNeurons::new(config.hidden_size, 10, &device)];
    let hooks = Hooks {
        attention_shift: (0..edited.num_layers())
            .map(|_| Some(Tensor::zeros([1, 1, config.hidden_size], &device)))
            .collect(),
        ..Hooks::default()
    };
    let after: Vec<f32> = edited
        .forward_with(ids.clone(), mask.clone(), &hooks)
        .logits
        .into_data()
        .try_to_vec()
        .unwrap();
    assert_eq!(before, after);

    // A non-zero shift on the last layer does change them: the hook is live. (Not a uniform
    // one: the LayerNorms would remove it.)
    let d = config.hidden_size;
    let ramp: Vec<f32> = (0..d).map(|k| k as f32 / d as f32).collect();
    let shift = Tensor::<1>::from_floats(ramp.as_slice(), &device).reshape([1, 1, d]);
    let hooks = Hooks {
        attention_shift: (0..edited.num_layers())
            .map(|i| (i == last).then(|| shift.clone()))
            .collect(),
        ..Hooks::default()
    };
    let shifted: Vec<f32> = edited
        .forward_with(ids, mask, &hooks)
        .logits
        .into_data()
        .try_to_vec()
        .unwrap();
    assert!(
        before
            .iter()
            .zip(&shifted)
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
}

#[test]
fn training_can_be_restricted_to_chosen_layers() {
    let device = device().autodiff();
    let (_, model) = load(&device);
    let model = model.train_only_layers(&[2]);
    let r = reference();
    let out = model.forward(int2(&r.ids, &device), int2(&r.mask, &device));
    let grads = out.logits.sum().backward();
    let layers = &model.model.decoder.layers;
    assert!(layers[2].fc1.weight.grad(&grads).is_some());
    assert!(layers[1].fc1.weight.grad(&grads).is_none());
    assert!(
        model
            .model
            .decoder
            .embed_tokens
            .weight
            .grad(&grads)
            .is_none()
    );
}

#[test]
fn configs_that_are_not_implemented_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, text.replace("\"relu\"", "\"gelu\"")).unwrap();
    let err = OptConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("gelu"), "{err}");
}

#[test]
fn zero_sizes_are_refused_not_divided_by() {
    // Found by `mmke fuzz --target opt-config`: zero heads panicked (a remainder by zero).
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    config["num_attention_heads"] = 0.into();
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = OptConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("num_attention_heads must be positive"),
        "{err}"
    );
}
