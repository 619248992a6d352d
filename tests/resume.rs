//! Exact resume, as a user meets it: `mmke train vlm` killed (SIGKILL) in the middle of the
//! run, then restarted with `--resume`, ends with the same weights, bit for bit, as a run
//! that went straight through.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use burn::store::ModuleSnapshot;

fn mmke() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mmke"))
}

fn run(args: &[&str]) {
    let out = mmke().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The step of the checkpoint in `dir`, if one is complete.
fn checkpoint_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("checkpoint/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

#[test]
fn a_killed_training_run_resumed_ends_bit_for_bit_like_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let data = path("data");
    run(&[
        "data",
        "scenes",
        "--out",
        &data,
        "--train",
        "24",
        "--test",
        "4",
        "--seed",
        "5",
        "--image-size",
        "32",
    ]);
    // A checkpoint every step: the kills land anywhere.
    let config = path("vlm.toml");
    std::fs::write(
        &config,
        "preset = \"vlm-tiny\"\nimage_size = 32\n[train]\nsteps = 60\nbatch_size = 4\n\
         lr = 1e-3\ntext_every = 8\ncheckpoint_every = 1\nseed = 3\n",
    )
    .unwrap();
    let train = |out: &str| -> Vec<String> {
        [
            "train", "vlm", "--config", &config, "--data", &data, "--out", out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let straight = path("straight");
    let args = train(&straight);
    run(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let killed = path("killed");
    let mut args = train(&killed);
    let mut kills = Vec::new();
    // Killed twice, at steps 5+ and 25+ (wherever the process is then: maybe mid-checkpoint).
    for after in [5, 25] {
        let mut child = mmke().args(&args).spawn().unwrap();
        let start = Instant::now();
        while checkpoint_step(Path::new(&killed)).is_none_or(|s| s < after) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no checkpoint past step {after}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills.push(checkpoint_step(Path::new(&killed)).unwrap());
        assert!(
            !Path::new(&killed).join("model.bpk").exists(),
            "the run finished before the kill ({kills:?}): the test needs more steps"
        );
        if !args.iter().any(|a| a == "--resume") {
            args.push("--resume".into());
        }
    }
    run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(checkpoint_step(Path::new(&killed)), Some(60));

    // Compared tensor by tensor (the files also hold random parameter ids).
    let weights = |dir: &str| {
        let (model, _, _) =
            mmke::model::vlm::load(Path::new(dir), &burn::tensor::Device::flex()).unwrap();
        model
            .collect(None, None, false)
            .into_iter()
            .map(|t| (t.name.clone(), t.to_bytes().unwrap().to_vec()))
            .collect::<Vec<_>>()
    };
    let (a, b) = (weights(&straight), weights(&killed));
    assert!(a.len() > 10);
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            x == y,
            "killed at steps {kills:?} and resumed, {name} differs from the straight run's"
        );
    }
}
