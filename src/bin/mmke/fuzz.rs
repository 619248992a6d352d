//! `mmke fuzz`: mutation-fuzz the readers of user files; reports accepted, rejected (error
//! values) and panics (there should be none).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct FuzzArgs {
    /// Targets (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    target: Vec<mmke::fuzz::Target>,
    #[arg(long, default_value_t = 10_000)]
    inputs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The seed inputs (the committed fixtures).
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let FuzzArgs {
        target,
        inputs,
        seed,
        fixtures,
    } = args;
    let targets = if target.is_empty() {
        mmke::fuzz::Target::ALL.to_vec()
    } else {
        target
    };
    let work = std::env::temp_dir().join(format!("mmke-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut panicked = false;
    for target in targets {
        let start = std::time::Instant::now();
        let report = mmke::fuzz::run(target, inputs, seed, &fixtures, &work)?;
        println!(
            "{target:?}: {} inputs, {} accepted, {} rejected, {} panics ({:.1} s)",
            report.inputs,
            report.accepted,
            report.rejected,
            report.panics.len(),
            start.elapsed().as_secs_f64()
        );
        for (i, message) in report.panics.iter().take(5) {
            println!("  input {i}: {message}");
        }
        panicked |= !report.panics.is_empty();
    }
    std::fs::remove_dir_all(&work)?;
    if panicked {
        anyhow::bail!("a reader panicked");
    }
    Ok(())
}
