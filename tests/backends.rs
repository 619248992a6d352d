//! The backend under test (`MMKE_TEST_BACKEND`: flex by default, `wgpu` in CI on Mesa's
//! lavapipe) against the committed references and against flex:
//! - the parity suites (CLIP, OPT, BLIP-2 / LLaVA) on that device, with their own tolerances;
//! - CLIP pre-training, a scope classifier and a VLM trained a few steps from one seed
//!   (`mmke train clip|scope|vlm --backend B`, each in a process of its own: a backend's
//!   generator is shared by everything in a process, and the tests beside would draw from
//!   it) give the weights, scores and losses they get on flex (their parameters draw their
//!   initial values as on flex, `train::draw_as_on_flex`), within [`TRAINED_TOL`];
//! - a model saved on one backend loads on the other and gives the same outputs.
//!
//! `MMKE_TEST_BACKEND=wgpu cargo test --profile gpu-ci --features wgpu --test backends`

#[path = "clip_parity.rs"]
mod clip_parity;
#[path = "mllm_parity.rs"]
mod mllm_parity;
#[path = "opt_parity.rs"]
mod opt_parity;

#[path = "common/env.rs"]
mod test_env;

use std::path::Path;
use std::process::Command;

use burn::module::{Module, ModuleVisitor};
use burn::tensor::{Device, Tensor};
use mmke::data::fgvedit;
use mmke::data::lm::{LmExample, pre_edit_examples};
use mmke::data::pairs::read_pairs;
use mmke::data::scenes::{self, ScenesConfig};
use mmke::model::scope::ScopeRun;
use test_env::device;

/// The scenes' size and the models' input size: small, so that lavapipe trains in seconds.
const IMAGE: usize = 32;

/// How far a model trained a few steps on the device under test may be from the one trained
/// on flex from the same seed: the largest difference of a weight, a score or a loss. Both
/// start from the same values and differ by the backends' rounding (their sums run in other
/// orders), which a few Adam steps carry into the weights: measured on lavapipe, 1.5e-5 in a
/// weight, 3e-7 in a score, 0 in the VLM's loss. Initial values drawn from another
/// generator differ by the weights' own scale (0.1 to 5: what this test caught before
/// `train::draw_as_on_flex`).
const TRAINED_TOL: f32 = 1e-3;

/// Every float parameter of a module with its path, in visiting order.
#[derive(Default)]
struct Values {
    path: Vec<String>,
    params: Vec<(String, Vec<f32>)>,
}

impl ModuleVisitor for Values {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        self.params
            .push((self.path.join("."), data.iter::<f32>().collect()));
    }
}

fn values(module: &impl Module) -> Values {
    let mut values = Values::default();
    module.visit(&mut values);
    values
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "as many values");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest difference between two modules' parameters, and the parameter it is in.
fn param_diff(a: &Values, b: &Values) -> (f32, String) {
    assert!(!a.params.is_empty(), "a module without parameters");
    assert_eq!(a.params.len(), b.params.len(), "as many parameters");
    a.params
        .iter()
        .zip(&b.params)
        .map(|((name, x), (_, y))| (max_diff(x, y), name.clone()))
        .fold(
            (0.0, String::new()),
            |worst, d| if d.0 > worst.0 { d } else { worst },
        )
}

/// The backend under test, as `--backend` names it.
fn backend() -> String {
    std::env::var("MMKE_TEST_BACKEND").unwrap_or_else(|_| "flex".into())
}

/// `mmke train KIND --config configs/CONFIG --backend BACKEND ARGS... --set SETS...`.
fn train(kind: &str, config: &str, backend: &str, args: &[&Path], sets: &[&str]) {
    let root = test_env::root();
    let mut command = Command::new(test_env::mmke_bin());
    command
        .args(["train", kind, "--config"])
        .arg(root.join("configs").join(config))
        .args(["--backend", backend]);
    let flags = match kind {
        "clip" => &["--out"][..],
        "scope" => &["--clip", "--data", "--out"],
        _ => &["--clip", "--data", "--out"],
    };
    for (flag, value) in flags.iter().zip(args) {
        command.arg(flag).arg(value);
    }
    for set in sets {
        command.args(["--set", set]);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "mmke train {kind} --backend {backend}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What each side trains: a CLIP, a scope classifier on it and a VLM starting from it, in
/// `out`, on `backend`.
fn train_all(data: &Path, out: &Path, backend: &str) {
    let size = format!("image_size={IMAGE}");
    let scene = format!("train.scene_size={IMAGE}");
    let clip = out.join("clip");
    train(
        "clip",
        "clip.toml",
        backend,
        &[&clip],
        &[
            &size,
            &scene,
            "train.steps=4",
            "train.batch_size=8",
            "train.optim.warmup=2",
        ],
    );
    train(
        "scope",
        "scope-cross.toml",
        backend,
        &[&clip, data, &out.join("scope")],
        &[
            "model.dim=32",
            "model.attention_dim=32",
            "train.steps=4",
            "train.batch_size=8",
        ],
    );
    train(
        "vlm",
        "vlm.toml",
        backend,
        &[&clip, data, &out.join("vlm")],
        &[
            &size,
            "train.steps=4",
            "train.batch_size=8",
            "train.text_every=2",
            "train.optim.warmup=2",
        ],
    );
}

/// The scores of the classifier saved in `run_dir` on `data`'s test pairs, loaded on `device`.
fn scores(run_dir: &Path, data: &Path, device: &Device) -> Vec<f32> {
    let pairs = read_pairs(&data.join("test.json"), data).unwrap();
    let mut run = ScopeRun::load(run_dir, device).unwrap();
    let batcher = run.batcher(&pairs).unwrap();
    mmke::eval::scope::scores(&run.model, &pairs, &batcher, device).unwrap()
}

/// The answer loss of the VLM saved in `dir` on the first visual pre-edit examples of
/// `data`, loaded on `device`.
fn vlm_loss(dir: &Path, data: &Path, device: &Device) -> f32 {
    let mut speaker = mmke::edit::speaker::Speaker::load(dir, device).unwrap();
    let records = fgvedit::read(&data.join("train.json"), data)
        .unwrap()
        .records;
    let examples: Vec<LmExample> = records.iter().flat_map(pre_edit_examples).collect();
    let visual: Vec<&LmExample> = examples
        .iter()
        .filter(|e| e.image.is_some())
        .take(8)
        .collect();
    let batch = speaker.batcher.batch(&visual, device).unwrap();
    let loss = mmke::model::answer::answer_loss(&speaker.model, &batch).0;
    loss.into_scalar::<f32>()
}

#[test]
fn models_trained_on_this_backend_match_flex_and_load_on_either() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("scenes");
    let config = ScenesConfig {
        train: 12,
        test: 4,
        seed: 8,
        image_size: IMAGE as u32,
    };
    scenes::write(&data, &config).unwrap();
    let (tested, flex) = (dir.path().join("tested"), dir.path().join("flex"));
    train_all(&data, &tested, &backend());
    train_all(&data, &flex, "flex");

    // Loaded on flex, side by side.
    let plain = Device::flex();
    let clip = |side: &Path| {
        values(
            &mmke::model::clip::Clip::load(&side.join("clip"), &plain)
                .unwrap()
                .model,
        )
    };
    let classifier =
        |side: &Path| values(&ScopeRun::load(&side.join("scope"), &plain).unwrap().model);
    let vlm = |side: &Path| values(&mmke::model::vlm::load(&side.join("vlm"), &plain).unwrap().0);
    let weights = [
        ("CLIP", param_diff(&clip(&tested), &clip(&flex))),
        (
            "classifier",
            param_diff(&classifier(&tested), &classifier(&flex)),
        ),
        ("VLM", param_diff(&vlm(&tested), &vlm(&flex))),
    ];
    let outputs = [
        (
            "classifier scores",
            max_diff(
                &scores(&tested.join("scope"), &data, &plain),
                &scores(&flex.join("scope"), &data, &plain),
            ),
        ),
        (
            "VLM answer loss",
            (vlm_loss(&tested.join("vlm"), &data, &plain)
                - vlm_loss(&flex.join("vlm"), &data, &plain))
            .abs(),
        ),
    ];
    eprintln!(
        "trained on {} vs flex: weights {weights:?}, outputs {outputs:?}",
        backend()
    );
    for (model, (diff, param)) in weights {
        assert!(
            diff <= TRAINED_TOL,
            "{model} weights differ by {diff} in {param}"
        );
    }
    for (what, diff) in outputs {
        assert!(diff <= TRAINED_TOL, "{what} differ by {diff}");
    }

    // Saved on one backend, loaded on the other: the same outputs.
    let device = device();
    for side in [&tested, &flex] {
        let here = scores(&side.join("scope"), &data, &plain);
        let there = scores(&side.join("scope"), &data, &device);
        let diff = max_diff(&here, &there);
        assert!(
            diff <= 1e-4,
            "{}: scores on flex and on the device differ by {diff}",
            side.display()
        );
        let (here, there) = (
            vlm_loss(&side.join("vlm"), &data, &plain),
            vlm_loss(&side.join("vlm"), &data, &device),
        );
        assert!(
            (here - there).abs() <= 1e-4,
            "{}: VLM loss {here} on flex, {there} on the device",
            side.display()
        );
    }
}
