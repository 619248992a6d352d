//! Reading released dataset files into [`EditRecord`]s, with errors that name the file, the
//! record and the key. FGVEdit and MMEdit share this machinery; each format is a list of the
//! keys it requires and how they map onto a record.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::record::{CaptionPair, EditRecord, ImageQuery, ScopeQuery, Task, TextQuery};
use crate::error::{Error, Result};

/// How thoroughly referenced images are checked while reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageCheck {
    /// Only that the file exists.
    Exists,
    /// That it exists and its header names a known format and size (cheap; the default).
    Header,
    /// That it decodes completely (what `mmke data check` does).
    Decode,
}

/// Where relative image paths resolve.
#[derive(Clone, Debug)]
pub struct ImageRoots {
    pub images: PathBuf,
    /// MMEdit's `image_rephrase` root; defaults to `images`.
    pub rephrase: Option<PathBuf>,
}

impl ImageRoots {
    pub fn new(images: impl Into<PathBuf>) -> Self {
        Self {
            images: images.into(),
            rephrase: None,
        }
    }
}

/// A record left out on purpose, as the reference implementations do (an empty `alt`).
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub index: usize,
    pub reason: String,
}

/// What reading a file produced: the records, the skipped ones, and every invalid record's
/// error (so that `mmke data check` can report them all).
#[derive(Debug)]
pub struct ReadReport {
    pub path: PathBuf,
    pub records: Vec<EditRecord>,
    pub skipped: Vec<Skipped>,
    pub errors: Vec<Error>,
}

impl ReadReport {
    /// The records, or the first invalid record's error.
    pub fn into_result(self) -> Result<Dataset> {
        match self.errors.into_iter().next() {
            Some(error) => Err(error),
            None => Ok(Dataset {
                path: self.path,
                records: self.records,
                skipped: self.skipped,
            }),
        }
    }
}

/// A dataset file read without errors.
#[derive(Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub records: Vec<EditRecord>,
    pub skipped: Vec<Skipped>,
}

/// The two released formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    FgvEdit,
    MmEdit(Task),
}

/// Reads a whole file; malformed JSON is an error, invalid records are collected.
pub fn read_report(
    path: &Path,
    format: Format,
    roots: &ImageRoots,
    check: ImageCheck,
) -> Result<ReadReport> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        error: e,
    })?;
    let Value::Array(items) = value else {
        return Err(Error::Config {
            path: path.to_path_buf(),
            reason: format!("expected a JSON list of records, found {}", kind(&value)),
        });
    };
    let mut report = ReadReport {
        path: path.to_path_buf(),
        records: Vec::new(),
        skipped: Vec::new(),
        errors: Vec::new(),
    };
    for (index, item) in items.iter().enumerate() {
        let fields = Fields {
            path,
            index,
            roots,
            check,
        };
        match fields.record(item, format) {
            Ok(Some(record)) => report.records.push(record),
            Ok(None) => report.skipped.push(Skipped {
                index,
                reason: "empty alt".into(),
            }),
            Err(error) => report.errors.push(error),
        }
    }
    Ok(report)
}

/// Reads a file, failing on the first invalid record.
pub fn read(path: &Path, format: Format, roots: &ImageRoots, check: ImageCheck) -> Result<Dataset> {
    read_report(path, format, roots, check)?.into_result()
}

struct Fields<'a> {
    path: &'a Path,
    index: usize,
    roots: &'a ImageRoots,
    check: ImageCheck,
}

impl Fields<'_> {
    fn error(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Record {
            path: self.path.to_path_buf(),
            index: self.index,
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn record(&self, item: &Value, format: Format) -> Result<Option<EditRecord>> {
        let Value::Object(map) = item else {
            return Err(self.error("", format!("expected an object, found {}", kind(item))));
        };
        let r = Record { fields: self, map };
        let target = r.string("alt")?;
        if target.trim().is_empty() {
            return Ok(None);
        }
        let task = match format {
            Format::FgvEdit => Task::Vqa,
            Format::MmEdit(task) => task,
        };
        let image = r.image("image", &self.roots.images)?;
        let same_image = |q: String, a: String| ImageQuery {
            image: image.clone(),
            prompt: task.prompt(&q),
            answer: a,
        };
        let loc = Some(TextQuery {
            prompt: r.string("loc")?,
            answer: r.string("loc_ans")?,
        });
        let record = match format {
            Format::FgvEdit => EditRecord {
                index: self.index,
                task,
                prompt: task.prompt(&r.string("src")?),
                target,
                original: r.optional("pred")?,
                rephrase: Some(task.prompt(&r.string("rephrase")?)),
                image_rephrase: r.optional_image("image_rephrase", self.rephrase_root())?,
                loc,
                m_loc: r.optional_image_query("m_loc", "m_loc_q", "m_loc_a", task)?,
                fg_gen: Some(same_image(r.string("fg_gen_q")?, r.string("fg_gen_a")?)),
                fg_loc: Some(same_image(r.string("fg_loc_q")?, r.string("fg_loc_a")?)),
                scope: r.scope(task)?,
                caption: r.caption()?,
                edit_cell: r.edit_cell()?,
                moved_to: r.moved_to()?,
                image,
            },
            Format::MmEdit(_) => EditRecord {
                index: self.index,
                task,
                prompt: task.prompt(&r.string("src")?),
                target,
                original: Some(r.string("pred")?),
                rephrase: Some(task.prompt(&r.string("rephrase")?)),
                image_rephrase: Some(r.image("image_rephrase", self.rephrase_root())?),
                loc,
                m_loc: Some(ImageQuery {
                    image: r.image("m_loc", &self.roots.images)?,
                    prompt: task.prompt(&r.string("m_loc_q")?),
                    answer: r.string("m_loc_a")?,
                }),
                fg_gen: None,
                fg_loc: None,
                scope: r.scope(task)?,
                caption: None,
                edit_cell: None,
                moved_to: None,
                image,
            },
        };
        Ok(Some(record))
    }

    fn rephrase_root(&self) -> &Path {
        self.roots.rephrase.as_deref().unwrap_or(&self.roots.images)
    }
}

struct Record<'a> {
    fields: &'a Fields<'a>,
    map: &'a Map<String, Value>,
}

impl Record<'_> {
    fn string(&self, key: &str) -> Result<String> {
        self.optional(key)?
            .ok_or_else(|| self.fields.error(key, "missing"))
    }

    fn optional(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self
                .fields
                .error(key, format!("expected a string, found {}", kind(other)))),
        }
    }

    fn image(&self, key: &str, root: &Path) -> Result<PathBuf> {
        let relative = self.string(key)?;
        let path = root.join(&relative);
        if !path.is_file() {
            return Err(self
                .fields
                .error(key, format!("image not found: {}", path.display())));
        }
        let checked = match self.fields.check {
            ImageCheck::Exists => Ok(()),
            ImageCheck::Header => image::ImageReader::open(&path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_dimensions().map(|_| ()).map_err(|e| e.to_string())),
            ImageCheck::Decode => image::ImageReader::open(&path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| e.to_string())
                .and_then(|r| r.decode().map(|_| ()).map_err(|e| e.to_string())),
        };
        checked.map_err(|e| {
            self.fields
                .error(key, format!("cannot decode image {}: {e}", path.display()))
        })?;
        Ok(path)
    }

    fn optional_image(&self, key: &str, root: &Path) -> Result<Option<PathBuf>> {
        match self.optional(key)? {
            Some(_) => self.image(key, root).map(Some),
            None => Ok(None),
        }
    }

    fn optional_image_query(
        &self,
        image: &str,
        q: &str,
        a: &str,
        task: Task,
    ) -> Result<Option<ImageQuery>> {
        let Some(path) = self.optional_image(image, &self.fields.roots.images)? else {
            return Ok(None);
        };
        Ok(Some(ImageQuery {
            image: path,
            prompt: task.prompt(&self.string(q)?),
            answer: self.string(a)?,
        }))
    }

    /// The scenes benchmark's caption keys (`caption_src`, `caption_pred`, `caption_alt`),
    /// when present: all three or none.
    fn caption(&self) -> Result<Option<CaptionPair>> {
        let Some(prompt) = self.optional("caption_src")? else {
            return Ok(None);
        };
        Ok(Some(CaptionPair {
            prompt,
            before: self.string("caption_pred")?,
            after: self.string("caption_alt")?,
        }))
    }

    /// The edited object's cell from a scenes record's `scene` and `edit`, when present.
    fn edit_cell(&self) -> Result<Option<u8>> {
        #[derive(Deserialize)]
        struct Object {
            cell: u8,
        }
        #[derive(Deserialize)]
        struct Scene {
            objects: Vec<Object>,
        }
        #[derive(Deserialize)]
        struct Edit {
            object: usize,
        }
        let (Some(scene), Some(edit)) = (self.map.get("scene"), self.map.get("edit")) else {
            return Ok(None);
        };
        let scene: Scene = serde_json::from_value(scene.clone())
            .map_err(|e| self.fields.error("scene", e.to_string()))?;
        let edit: Edit = serde_json::from_value(edit.clone())
            .map_err(|e| self.fields.error("edit", e.to_string()))?;
        let object = scene.objects.get(edit.object).ok_or_else(|| {
            self.fields.error(
                "edit",
                format!("object {} is not in the scene", edit.object),
            )
        })?;
        Ok(Some(object.cell))
    }

    /// Where a scenes record's position edit (`edit.attribute` "position") moves the object:
    /// the cell named by `edit.to`.
    fn moved_to(&self) -> Result<Option<u8>> {
        #[derive(Deserialize)]
        struct Edit {
            attribute: String,
            to: String,
        }
        let Some(edit) = self.map.get("edit") else {
            return Ok(None);
        };
        let edit: Edit = serde_json::from_value(edit.clone())
            .map_err(|e| self.fields.error("edit", e.to_string()))?;
        if edit.attribute != "position" {
            return Ok(None);
        }
        use crate::data::scenes::scene::Cell;
        let cell = Cell::ALL
            .iter()
            .position(|c| c.name() == edit.to)
            .ok_or_else(|| {
                self.fields
                    .error("edit", format!("no cell is called {:?}", edit.to))
            })?;
        Ok(Some(cell as u8))
    }

    /// The scenes benchmark's `scope` list, when present.
    fn scope(&self, task: Task) -> Result<Vec<ScopeQuery>> {
        #[derive(Deserialize)]
        struct Raw {
            q: String,
            a_before: String,
            a_after: String,
            in_scope: bool,
            #[serde(default)]
            hard: bool,
            #[serde(default)]
            near: bool,
            #[serde(default)]
            cell: Option<u8>,
            #[serde(default)]
            matches: Option<Vec<u8>>,
        }
        let Some(value) = self.map.get("scope") else {
            return Ok(Vec::new());
        };
        let raw: Vec<Raw> = serde_json::from_value(value.clone())
            .map_err(|e| self.fields.error("scope", e.to_string()))?;
        Ok(raw
            .into_iter()
            .map(|r| ScopeQuery {
                prompt: task.prompt(&r.q),
                answer_before: r.a_before,
                answer_after: r.a_after,
                in_scope: r.in_scope,
                hard: r.hard,
                near: r.near,
                cell: r.cell,
                matches: r.matches,
            })
            .collect())
    }
}

/// "a string", "number 3", ... for error messages.
fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}
