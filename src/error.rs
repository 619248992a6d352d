//! The library's error type. Every variant that concerns a file names it, and where it makes
//! sense the record or tensor inside it, so a user can find and fix the bad input.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message (not a `source`), so that error chains print it once.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: invalid JSON: {error}", path.display())]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{}: invalid config: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Weights { path: PathBuf, reason: String },
    #[error("{}: record {index}{}: {reason}", path.display(), if key.is_empty() { String::new() } else { format!(": key '{key}'") })]
    Record {
        path: PathBuf,
        index: usize,
        key: String,
        reason: String,
    },
    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{}: image: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    #[error("{}: edit memory: {reason}", path.display())]
    Memory { path: PathBuf, reason: String },
    #[error("{}: chart: {reason}", path.display())]
    Chart { path: PathBuf, reason: String },
    /// Inputs that do not fit the model (a prompt's image tokens, the batch's images).
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
}

/// `Err` naming the first of `sizes` that is zero (a config check's first step).
pub fn check_positive(sizes: &[(&str, usize)]) -> std::result::Result<(), String> {
    match sizes.iter().find(|(_, size)| *size == 0) {
        Some((name, _)) => Err(format!("{name} must be positive")),
        None => Ok(()),
    }
}

/// Reads a JSON config file and checks it with `check`: unreadable files, malformed JSON and
/// failed checks are errors naming the file.
pub fn read_json_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    check: impl FnOnce(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let config: T = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        error: e,
    })?;
    check(&config).map_err(|reason| Error::Config {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(config)
}

impl Error {
    /// A record that names an image file that does not exist.
    pub fn is_missing_image(&self) -> bool {
        matches!(self, Error::Record { reason, .. } if reason.starts_with("image not found"))
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            error: source,
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, flushed to disk,
/// and a rename, so an interrupted write never leaves a truncated file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = temporary_sibling(path);
    std::fs::File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
}

/// Flushes a file written by someone else (Burn's recorders) to disk before it is renamed.
pub fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// `dir/.name.tmp-PID`: a sibling of `path`, so the final rename stays on one filesystem.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `module` as a burnpack file through a temporary sibling and a rename.
pub fn save_module<M: burn::module::Module>(module: &M, path: &Path) -> Result<()> {
    let tmp = temporary_sibling(path);
    module.clone().save_file(&tmp).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    sync(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
