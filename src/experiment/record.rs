//! A run's record in `docs/results/`: `{experiment}-{preset}.md` holds the tables and how they
//! were measured (the command, the commit, a checksum of the preset, which models the run
//! trained and which it reused, the wall time, the machine), beside the tables' CSV, JSON and
//! PNG. The command that measures the numbers writes the record, so README links to it and
//! copies nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{Experiment, Outcome, provenance};
use crate::error::{Error, Result, write_atomic};

/// One finished run of an experiment.
pub struct Measurement<'a> {
    pub experiment: Experiment,
    pub preset: &'a str,
    pub outcome: &'a Outcome,
    /// The output directory the run read and wrote.
    pub out: &'a Path,
    /// The user's data directory, if the run did not use the preset's scenes split.
    pub data: Option<&'a Path>,
    /// The command line, as typed.
    pub command: String,
    /// [`commit`] when the run started.
    pub commit: String,
    pub backend: &'a str,
    pub started: SystemTime,
    pub wall: Duration,
}

/// Writes the record of `run` into `dir` (created if missing) and returns the Markdown file.
pub fn write(dir: &Path, run: &Measurement) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let stem = format!("{}-{}", run.experiment.name(), run.preset);
    let mut md = format!(
        "# {} (preset `{}`)\n\n\
         Written by mmke; run the command below to measure it again.\n\n",
        run.experiment.name(),
        run.preset
    );
    md += &markdown_fields(run)?;
    for (table_stem, table) in &run.outcome.tables {
        let copy = format!("{table_stem}-{}", run.preset);
        md += &format!("\n## {}\n\n{}", table.title, table.markdown());
        md += &format!(
            "\n![{}]({copy}.png) ([CSV]({copy}.csv), [JSON]({copy}.json))\n",
            table.title
        );
        for ext in ["csv", "json", "png"] {
            copy_file(
                &run.out.join(format!("{table_stem}.{ext}")),
                &dir.join(format!("{copy}.{ext}")),
            )?;
        }
    }
    for figure in &run.outcome.figures {
        let path = Path::new(figure);
        let copy = format!(
            "{}-{}.{}",
            path.file_stem().and_then(|s| s.to_str()).unwrap_or(figure),
            run.preset,
            path.extension().and_then(|s| s.to_str()).unwrap_or("png")
        );
        copy_file(&run.out.join(figure), &dir.join(&copy))?;
        md += &format!("\n![{figure}]({copy})\n");
    }
    if !run.outcome.claims.is_empty() {
        md += "\n## What the papers claim, and whether it holds here\n\n\
               | table | claim | holds | the numbers |\n| --- | --- | --- | --- |\n";
        for (stem, c) in &run.outcome.claims {
            md += &format!(
                "| {stem} | {} | {} | {} |\n",
                c.says,
                if c.holds { "yes" } else { "**no**" },
                c.comparisons.join("; ")
            );
        }
    }
    if !run.outcome.notes.is_empty() {
        md += &format!("\n## Details\n\n{}", run.outcome.notes);
    }
    let path = dir.join(format!("{stem}.md"));
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// The table of how the run was measured.
fn markdown_fields(run: &Measurement) -> Result<String> {
    let preset = serde_json::to_vec(&run.outcome.preset).expect("JSON serializes");
    let (trained, reused) = artifacts(run.out, run.started)?;
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    let data = match run.data {
        Some(dir) => format!("`{}`", dir.display()),
        None => "the preset's scenes split".to_string(),
    };
    let fields = [
        ("command", format!("`{}`", run.command)),
        ("commit", run.commit.clone()),
        (
            "preset",
            format!(
                "`experiments/{}.toml` `[presets.{}]`, CRC-32 of its JSON `{:08x}` (in each table's JSON)",
                run.experiment.file(),
                run.preset,
                crc32fast::hash(&preset)
            ),
        ),
        ("data", data),
        ("output directory", format!("`{}`", run.out.display())),
        ("trained in this run", list(&trained)),
        ("reused (same provenance)", list(&reused)),
        ("wall time", duration(run.wall)),
        ("machine", machine()),
        ("backend", run.backend.to_string()),
        ("finished", date(run.started + run.wall)),
    ];
    let mut out = String::from("| | |\n| --- | --- |\n");
    for (name, value) in fields {
        out += &format!("| {name} | {value} |\n");
    }
    Ok(out)
}

/// The artifact directories under `out` (those with a provenance, also in subdirectories such
/// as `transfer/`), split into the ones this run trained (their provenance is written when
/// training begins, so it is newer than `started`) and the ones it reused.
fn artifacts(out: &Path, started: SystemTime) -> Result<(Vec<String>, Vec<String>)> {
    let (mut trained, mut reused) = (Vec::new(), Vec::new());
    let mut pending = vec![(out.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            if !entry.path().is_dir() {
                continue;
            }
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let file = entry.path().join(provenance::FILE);
            match std::fs::metadata(&file) {
                Ok(meta) => {
                    let modified = meta.modified().map_err(|e| Error::io(&file, e))?;
                    if modified >= started {
                        trained.push(name);
                    } else {
                        reused.push(name);
                    }
                }
                // A directory of artifacts (not a scenes split, not an artifact's own files).
                Err(_) if !name.starts_with("scenes-") && prefix.is_empty() => {
                    pending.push((entry.path(), format!("{name}/")));
                }
                Err(_) => {}
            }
        }
    }
    trained.sort();
    reused.sort();
    Ok((trained, reused))
}

/// Copies `from` to `to` atomically.
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
    write_atomic(to, &bytes)
}

/// The commit of the working directory's git checkout (`+ uncommitted changes` when tracked
/// files differ from it), else mmke's version.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("`{hash}` + uncommitted changes")
            } else {
                format!("`{hash}`")
            }
        }
        None => format!("not a git checkout (mmke {})", env!("CARGO_PKG_VERSION")),
    }
}

/// CPU, core count, memory and operating system.
fn machine() -> String {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
    let system = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let cpu = system
        .cpus()
        .first()
        .map_or("unknown CPU".to_string(), |c| c.brand().trim().to_string());
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu}, {threads} threads, {:.1} GiB, {}",
        system.total_memory() as f64 / (1u64 << 30) as f64,
        System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_string())
    )
}

/// `7 min 29 s`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{:.1} s", d.as_secs_f64()),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// `2026-12-02 05:50 UTC`.
fn date(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_would_say_them() {
        assert_eq!(duration(Duration::from_millis(2500)), "2.5 s");
        assert_eq!(duration(Duration::from_secs(449)), "7 min 29 s");
        assert_eq!(duration(Duration::from_secs(3 * 3600 + 125)), "3 h 2 min");
    }

    #[test]
    fn a_record_holds_the_tables_and_what_was_trained_and_reused() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        for (name, age) in [("old", 0), ("transfer/new", 2)] {
            std::fs::create_dir_all(out.join(name)).unwrap();
            if age > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::fs::write(out.join(name).join(provenance::FILE), b"{}").unwrap();
        }
        let started = std::fs::metadata(out.join("transfer/new").join(provenance::FILE))
            .unwrap()
            .modified()
            .unwrap();
        let mut table = crate::report::Table::new("Table 9: demo", "method", &["a"]);
        table.push("x", vec![12.5]);
        table
            .write(&out, "mscke-table1", &serde_json::json!({}))
            .unwrap();
        let outcome = Outcome {
            tables: vec![("mscke-table1".into(), table)],
            notes: "per-run details\n".into(),
            figures: Vec::new(),
            claims: vec![(
                "mscke-table1".into(),
                crate::experiment::claims::Checked {
                    says: "x is high".into(),
                    holds: false,
                    comparisons: vec!["x a 12.50 >= 50.00: no".into()],
                },
            )],
            preset: serde_json::json!({"steps": 3}),
        };
        let run = Measurement {
            experiment: Experiment::Scenes("mscke-table1"),
            preset: "tiny",
            outcome: &outcome,
            out: &out,
            data: None,
            command: "mmke experiment mscke-table1 --preset tiny".into(),
            commit: "`0123abcd`".into(),
            backend: "flex",
            started,
            wall: Duration::from_secs(61),
        };
        let dir = root.path().join("results");
        let path = write(&dir, &run).unwrap();
        assert_eq!(path, dir.join("mscke-table1-tiny.md"));
        let md = std::fs::read_to_string(&path).unwrap();
        assert!(md.contains("| x | 12.50 |"), "{md}");
        assert!(
            md.contains("| mscke-table1 | x is high | **no** | x a 12.50 >= 50.00: no |"),
            "{md}"
        );
        assert!(
            md.contains("| trained in this run | transfer/new |"),
            "{md}"
        );
        assert!(md.contains("| reused (same provenance) | old |"), "{md}");
        assert!(md.contains("| wall time | 1 min 1 s |"), "{md}");
        assert!(md.contains("per-run details"));
        for ext in ["csv", "json", "png"] {
            assert!(dir.join(format!("mscke-table1-tiny.{ext}")).is_file());
        }
    }
}
