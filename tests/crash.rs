//! Crash safety: a process killed (SIGKILL) at random moments while it writes, over and over,
//! an edit memory, a training checkpoint or a dataset never leaves a damaged file: what is on
//! disk is always complete (one of the versions written) and loads.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use burn::module::{Module, Param};
use burn::optim::AdamConfig;
use burn::tensor::{Device, Tensor};
use mmke::edit::memory::EditMemory;
use mmke::model::scope::Similarity;
use mmke::train::checkpoint::{self, TrainState};
use rand::{Rng, SeedableRng};

const CHILD: &str = "MMKE_CRASH_CHILD";

/// Runs the test `name` of this binary as a child (with `CHILD` set to `dir`) and kills it
/// after a random delay, `rounds` times, calling `check` after each kill. Returns how many
/// kills landed in the middle of a write (a temporary file was left behind).
fn kill_repeatedly(name: &str, dir: &Path, rounds: usize, check: impl Fn(usize)) -> usize {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut interrupted = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture"])
            .env(CHILD, dir)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if leftovers(dir) > 0 {
            interrupted += 1;
        }
        check(round);
    }
    interrupted
}

/// Temporary files (`.NAME.tmp-PID`) under `dir`.
fn leftovers(dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            n += leftovers(&entry.path());
        } else if entry.file_name().to_string_lossy().contains(".tmp-") {
            n += 1;
        }
    }
    n
}

const EDITS: usize = 20_000;
const DIM: usize = 128;

/// Version `v` of the memory: every value is `v`.
fn memory(v: usize, device: &Device) -> EditMemory {
    let mut m = EditMemory::new(Similarity::SquaredL2 { scale: 1.0 }, device);
    m.insert(Tensor::<2>::full([EDITS, DIM], v as f32, device));
    m
}

#[test]
fn a_memory_save_killed_at_random_moments_leaves_the_previous_file_intact() {
    let device = Device::flex();
    let name = "a_memory_save_killed_at_random_moments_leaves_the_previous_file_intact";
    if let Ok(dir) = std::env::var(CHILD) {
        // The child: save versions 1, 2, 3, ... until killed.
        let path = Path::new(&dir).join("memory.bin");
        let versions: Vec<EditMemory> = (1..=4).map(|v| memory(v, &device)).collect();
        for v in 0.. {
            versions[v % 4].save(&path).unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.bin");
    memory(0, &device).save(&path).unwrap();
    let interrupted = kill_repeatedly(name, dir.path(), 12, |round| {
        let loaded = EditMemory::load(&path, &device)
            .unwrap_or_else(|e| panic!("round {round}: the memory does not load: {e}"));
        assert_eq!(loaded.len(), EDITS, "round {round}");
    });
    assert!(interrupted > 0, "no kill landed in the middle of a save");
}

/// A module whose every weight is the step it was saved at.
#[derive(Module, Debug)]
struct Weights {
    w: Param<Tensor<2>>,
}

impl Weights {
    fn at(step: usize, device: &Device) -> Self {
        Self {
            w: Param::from_tensor(Tensor::full([1024, 512], step as f32, device)),
        }
    }
}

#[test]
fn a_checkpoint_killed_at_random_moments_names_complete_weights_of_its_step() {
    let device = Device::flex();
    let name = "a_checkpoint_killed_at_random_moments_names_complete_weights_of_its_step";
    let optim = || AdamConfig::new().init();
    if let Ok(dir) = std::env::var(CHILD) {
        // The child: checkpoint steps 1, 2, 3, ... (resuming the count) until killed.
        let dir = Path::new(&dir);
        let start = checkpoint::load(dir, Weights::at(0, &device), optim())
            .unwrap()
            .map_or(0, |(_, _, s)| s.step);
        for step in start + 1.. {
            checkpoint::save(
                dir,
                &Weights::at(step, &device),
                &optim(),
                &TrainState { step },
            )
            .unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let last = std::cell::Cell::new(0);
    let interrupted = kill_repeatedly(name, dir.path(), 12, |round| {
        let (weights, _, state) = checkpoint::load(dir.path(), Weights::at(0, &device), optim())
            .unwrap_or_else(|e| panic!("round {round}: the checkpoint does not load: {e}"))
            .unwrap_or_else(|| panic!("round {round}: no checkpoint"));
        let values: Vec<f32> = weights.w.val().into_data().try_to_vec().unwrap();
        assert!(
            values.iter().all(|&v| v == state.step as f32),
            "round {round}: state.json names step {} but the weights are of another",
            state.step
        );
        assert!(state.step > last.get(), "round {round}: no progress");
        last.set(state.step);
    });
    assert!(
        interrupted > 0,
        "no kill landed in the middle of a checkpoint"
    );
}

#[test]
fn a_dataset_write_killed_at_random_moments_leaves_only_complete_files() {
    use mmke::data::scenes::{self, ScenesConfig};
    let name = "a_dataset_write_killed_at_random_moments_leaves_only_complete_files";
    let config = ScenesConfig {
        train: 60,
        test: 20,
        seed: 3,
        image_size: 64,
    };
    if let Ok(dir) = std::env::var(CHILD) {
        loop {
            scenes::write(Path::new(&dir), &config).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let interrupted = kill_repeatedly(name, dir.path(), 8, |round| {
        // Every file there (temporary ones aside) is whole: the JSON parses, the PNGs decode.
        for entry in walk(dir.path()) {
            let file = entry.file_name().unwrap().to_string_lossy().into_owned();
            if file.contains(".tmp-") {
                continue;
            }
            let bytes = std::fs::read(&entry).unwrap();
            if file.ends_with(".json") {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or_else(|e| panic!("round {round}: {file}: {e}"));
            } else {
                image::load_from_memory(&bytes)
                    .unwrap_or_else(|e| panic!("round {round}: {file}: {e}"));
            }
        }
    });
    assert!(interrupted > 0, "no kill landed in the middle of a write");
    // Finished once, the dataset reads in full.
    scenes::write(dir.path(), &config).unwrap();
    let set = mmke::data::fgvedit::read(&dir.path().join("train.json"), dir.path()).unwrap();
    assert_eq!(set.records.len(), 60);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
