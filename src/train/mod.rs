//! Training loops, one per objective, sharing checkpointing.

pub mod checkpoint;
pub mod clip;
pub mod knowledge;
pub mod meta;
pub mod scope;
pub mod vlm;

/// Every live progress bar: training loops on parallel threads stack their bars here.
static PROGRESS: std::sync::LazyLock<indicatif::MultiProgress> =
    std::sync::LazyLock::new(indicatif::MultiProgress::new);

/// The progress display of a training loop: `steps` in all, `done` already.
pub fn progress_bar(steps: usize, done: usize) -> indicatif::ProgressBar {
    let bar = PROGRESS.add(indicatif::ProgressBar::new(steps as u64).with_position(done as u64));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
            .expect("a valid template"),
    );
    bar
}
