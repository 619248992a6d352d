pub mod batch;
pub mod check;
pub mod fgvedit;
pub mod image;
pub mod lm;
pub mod mmedit;
pub mod pairs;
pub mod reader;
pub mod record;
pub mod scenes;
pub mod template;
pub mod text;

pub use reader::{Dataset, Format, ImageCheck, ImageRoots};
pub use record::{EditRecord, Task};

/// An edit file of either benchmark, told apart by its first record's keys: FGVEdit's
/// `fg_gen_q` (the scenes benchmark writes that schema too), or MMEdit's `m_loc` (E-IC when
/// the file's or its directory's name says `caption`, else E-VQA). Images are relative to
/// `root` (MMEdit's rephrased images too).
pub fn read_edits(path: &std::path::Path, root: &std::path::Path) -> crate::Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| crate::Error::Json {
            path: path.to_path_buf(),
            error,
        })?;
    let first = json.as_array().and_then(|records| records.first());
    let has = |key: &str| first.is_some_and(|r| r.get(key).is_some());
    if has("fg_gen_q") || first.is_none() {
        return fgvedit::read(path, root);
    }
    if has("m_loc") {
        let named = |p: &std::path::Path| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().to_lowercase().contains("caption"))
        };
        let caption = named(path) || path.parent().is_some_and(named);
        let task = if caption { Task::Caption } else { Task::Vqa };
        return mmedit::read(path, task, root, Some(root));
    }
    Err(crate::Error::Config {
        path: path.to_path_buf(),
        reason: "record 0 is neither FGVEdit's (no `fg_gen_q`) nor MMEdit's (no `m_loc`)".into(),
    })
}
