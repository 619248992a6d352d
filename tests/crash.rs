//! Crash safety: a process killed (SIGKILL) at random moments while it saves an edit memory
//! over and over never leaves a damaged file: the file on disk is always a complete memory
//! of one of the versions written, and loads.

use std::process::Command;
use std::time::Duration;

use burn::tensor::{Device, Tensor};
use mmke::edit::memory::EditMemory;
use mmke::model::scope::Similarity;
use rand::{Rng, SeedableRng};

const CHILD: &str = "MMKE_CRASH_CHILD";
const EDITS: usize = 20_000;
const DIM: usize = 128;

/// Version `v` of the memory: every value is `v`.
fn memory(v: usize, device: &Device) -> EditMemory {
    let mut m = EditMemory::new(Similarity::SquaredL2 { scale: 1.0 }, device);
    m.insert(Tensor::<2>::full([EDITS, DIM], v as f32, device));
    m
}

#[test]
fn a_save_killed_at_random_moments_leaves_the_previous_file_intact() {
    let device = Device::flex();
    if let Ok(path) = std::env::var(CHILD) {
        // The child: save versions 1, 2, 3, ... until killed.
        let versions: Vec<EditMemory> = (1..=4).map(|v| memory(v, &device)).collect();
        for v in 0.. {
            versions[v % 4].save(std::path::Path::new(&path)).unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.bin");
    memory(0, &device).save(&path).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut interrupted = 0;
    for round in 0..12 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_save_killed_at_random_moments_leaves_the_previous_file_intact",
                "--nocapture",
            ])
            .env(CHILD, &path)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // A leftover temporary file means the kill landed in the middle of a save.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "memory.bin" {
                interrupted += 1;
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        let loaded = EditMemory::load(&path, &device)
            .unwrap_or_else(|e| panic!("round {round}: the memory does not load: {e}"));
        assert_eq!(loaded.len(), EDITS, "round {round}");
    }
    assert!(interrupted > 0, "no kill landed in the middle of a save");
}
