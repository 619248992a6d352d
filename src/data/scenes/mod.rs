//! The synthetic fine-grained benchmark: multi-object scenes whose edit scope is exact.
//!
//! Each record is an edit `S -> S'` of one attribute of one object, asked through one
//! referring expression, with every well-posed question on the same image labelled in or out
//! of scope by comparing its answers under S and S' (see [`edit`]). Records are written in
//! the FGVEdit schema plus the MMEdit keys the generator can fill, a `scope` list, caption
//! fields for captioning edits, and the generating `scene` and `edit`. Same arguments, same
//! bytes: every record draws from its own ChaCha stream.

pub mod edit;
pub mod language;
pub mod render;
pub mod scene;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use self::edit::{EditCase, ScopeQuestion};
use self::language::{Query, Ref, RefKind, all_queries, caption};
use self::scene::{Attribute, Cell, Color, Scene, Shape, Size, Value};
use crate::data::check::ScopeCounts;
use crate::error::{Error, Result, write_atomic};

/// Bumped whenever the same arguments would produce different files.
pub const GENERATOR_VERSION: u32 = 3;

/// The prompt of the captioning task (E-IC style): the target is the caption.
pub const CAPTION_PROMPT: &str = "a photo of";

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenesConfig {
    pub train: usize,
    pub test: usize,
    pub seed: u64,
    pub image_size: u32,
}

/// One edit record: FGVEdit keys, MMEdit keys, and the exact scope.
#[derive(Clone, Debug, Serialize)]
pub struct SceneRecord {
    pub src: String,
    pub alt: String,
    pub rephrase: String,
    pub image: String,
    pub loc: String,
    pub loc_ans: String,
    pub fg_gen_q: String,
    pub fg_gen_a: String,
    pub fg_loc_q: String,
    pub fg_loc_a: String,
    pub pred: String,
    pub image_rephrase: String,
    pub m_loc: String,
    pub m_loc_q: String,
    pub m_loc_a: String,
    pub caption_src: String,
    pub caption_pred: String,
    pub caption_alt: String,
    pub scope: Vec<ScopeQuestion>,
    pub scene: Scene,
    pub edit: EditInfo,
}

#[derive(Clone, Debug, Serialize)]
pub struct EditInfo {
    pub object: usize,
    pub attribute: Attribute,
    pub from: String,
    pub to: String,
    pub ref_kind: RefKind,
}

/// A generated record with its images, before anything is written.
pub struct Generated {
    pub record: SceneRecord,
    pub case: EditCase,
    /// `(file name under images/, image)`: the edit image, its re-rendering, the M-Locality scene.
    pub images: Vec<(String, image::RgbImage)>,
}

/// The record `index` of `split`, from its own random stream.
pub fn generate(split: &str, index: usize, config: &ScenesConfig) -> Generated {
    let split_id: u64 = if split == "train" { 0 } else { 1 };
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream((split_id << 40) | index as u64);

    let scene = Scene::random(&mut rng);
    let case = EditCase::new(&scene, &mut rng);
    let other = Scene::random(&mut rng);
    let m_loc_query = *all_queries(&[&other])
        .choose(&mut rng)
        .expect("every scene has questions");
    let (loc, loc_ans) = text_fact(&mut rng);

    let fg_gen = case
        .hard_in_scope()
        .or_else(|| case.scope.iter().find(|q| q.in_scope));
    let fg_loc = case
        .hard_out_of_scope()
        .or_else(|| case.scope.iter().find(|q| q.near))
        .or_else(|| case.scope.iter().find(|q| !q.in_scope));
    let (fg_gen_q, fg_gen_a) = match fg_gen {
        Some(q) => (q.q.clone(), q.a_after.clone()),
        None => (case.rephrase.clone(), case.edit.to.name().to_string()),
    };
    let (fg_loc_q, fg_loc_a) = fg_loc
        .map(|q| (q.q.clone(), q.a_before.clone()))
        .expect("another object's attributes are always out of scope");

    let stem = format!("{split}_{index:05}");
    let images = vec![
        (
            format!("{stem}.png"),
            render::render(&scene, config.image_size, &mut rng),
        ),
        (
            format!("{stem}_r.png"),
            render::render(&scene, config.image_size, &mut rng),
        ),
        (
            format!("{stem}_loc.png"),
            render::render(&other, config.image_size, &mut rng),
        ),
    ];
    let record = SceneRecord {
        src: case.src.clone(),
        alt: case.edit.to.name().to_string(),
        rephrase: case.rephrase.clone(),
        image: format!("images/{}", images[0].0),
        loc,
        loc_ans,
        fg_gen_q,
        fg_gen_a,
        fg_loc_q,
        fg_loc_a,
        pred: case.edit.from.name().to_string(),
        image_rephrase: format!("images/{}", images[1].0),
        m_loc: format!("images/{}", images[2].0),
        m_loc_q: m_loc_query.random_text(&mut rng),
        m_loc_a: m_loc_query
            .answer(&other)
            .expect("asked of a well-posed query"),
        caption_src: CAPTION_PROMPT.to_string(),
        caption_pred: caption(&scene),
        caption_alt: caption(&case.after),
        scope: case.scope.clone(),
        scene: scene.clone(),
        edit: EditInfo {
            object: case.edit.object,
            attribute: case.edit.attribute,
            from: case.edit.from.name().to_string(),
            to: case.edit.to.name().to_string(),
            ref_kind: case.reference.kind(),
        },
    };
    Generated {
        record,
        case,
        images,
    }
}

/// Writes `train.json`, `test.json`, `images/`, `tokenizer.json` and `meta.json` into `out`.
pub fn write(out: &Path, config: &ScenesConfig) -> Result<BTreeMap<String, ScopeCounts>> {
    let images = out.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let mut counts = BTreeMap::new();
    for (split, n) in [("train", config.train), ("test", config.test)] {
        let mut split_counts = ScopeCounts::default();
        let mut lines = Vec::with_capacity(n);
        for index in 0..n {
            let generated = generate(split, index, config);
            for (name, image) in &generated.images {
                write_png(&images.join(name), image)?;
            }
            split_counts.add(
                generated
                    .record
                    .scope
                    .iter()
                    .map(|q| (q.in_scope, q.hard, q.near)),
            );
            lines.push(serde_json::to_string(&generated.record).expect("records serialize"));
        }
        let json = format!("[\n{}\n]\n", lines.join(",\n"));
        write_atomic(&out.join(format!("{split}.json")), json.as_bytes())?;
        counts.insert(split.to_string(), split_counts);
    }
    let tokenizer = word_level_tokenizer()
        .to_string(false)
        .expect("a word-level tokenizer serializes");
    write_atomic(&out.join("tokenizer.json"), tokenizer.as_bytes())?;
    let meta = serde_json::json!({
        "generator": "mmke scenes",
        "version": GENERATOR_VERSION,
        "config": config,
        "counts": counts,
    });
    let meta = serde_json::to_string_pretty(&meta).expect("meta serializes");
    write_atomic(&out.join("meta.json"), meta.as_bytes())?;
    Ok(counts)
}

fn write_png(path: &Path, image: &image::RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    write_atomic(path, &bytes)
}

const CAPITALS: [(&str, &str); 12] = [
    ("france", "paris"),
    ("japan", "tokyo"),
    ("italy", "rome"),
    ("spain", "madrid"),
    ("germany", "berlin"),
    ("egypt", "cairo"),
    ("peru", "lima"),
    ("kenya", "nairobi"),
    ("norway", "oslo"),
    ("canada", "ottawa"),
    ("greece", "athens"),
    ("china", "beijing"),
];

const NUMBER_WORDS: [&str; 11] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// A text-only fact (T-Locality): a capital, or a small sum.
fn text_fact(rng: &mut impl Rng) -> (String, String) {
    if rng.random_bool(0.5) {
        let (country, capital) = *CAPITALS.choose(rng).expect("capitals");
        (
            format!("what is the capital of {country}?"),
            capital.to_string(),
        )
    } else {
        let a = rng.random_range(0..=5);
        let b = rng.random_range(0..=5);
        (
            format!("what is {} plus {}?", NUMBER_WORDS[a], NUMBER_WORDS[b]),
            NUMBER_WORDS[a + b].to_string(),
        )
    }
}

/// Special tokens of the benchmark's tokenizer, with their ids.
pub const SPECIAL_TOKENS: [&str; 4] = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"];

/// Every word the generator can emit, plus the prompt templates' words: the vocabulary of the
/// benchmark's word-level tokenizer. Independent of the dataset's size and seed.
pub fn vocabulary() -> BTreeSet<String> {
    let mut texts: Vec<String> = Vec::new();
    let values: Vec<Value> = Color::ALL
        .iter()
        .map(|&c| Value::Color(c))
        .chain(Shape::ALL.iter().map(|&s| Value::Shape(s)))
        .chain(Size::ALL.iter().map(|&s| Value::Size(s)))
        .chain(Cell::ALL.iter().map(|&c| Value::Position(c)))
        .collect();
    for &value in &values {
        texts.push(value.name().to_string());
        for attribute in Attribute::ALL {
            for template in 0..3 {
                texts.push(Query::Attribute(attribute, Ref(value)).text(template));
            }
        }
    }
    for template in 0..3 {
        texts.push(Query::Exists(Color::Red, Shape::Circle).text(template));
        texts.push(Query::CountColor(Color::Red).text(template));
        texts.push(Query::CountAll.text(template));
    }
    let scene = Scene {
        objects: vec![
            scene::Object {
                shape: Shape::Circle,
                color: Color::Red,
                size: Size::Small,
                cell: Cell(0),
            },
            scene::Object {
                shape: Shape::Square,
                color: Color::Blue,
                size: Size::Large,
                cell: Cell(4),
            },
        ],
    };
    texts.push(caption(&scene));
    texts.push(",".into()); // captions of three or more objects list them with commas
    texts.extend(["yes", "no", CAPTION_PROMPT].map(String::from));
    texts.extend(NUMBER_WORDS.map(String::from));
    for (country, capital) in CAPITALS {
        texts.push(format!("what is the capital of {country}? {capital}"));
    }
    texts.push("what is one plus two?".into());
    // The prompt templates of REFERENCE.md and the counterfactual model's edit context.
    texts.push("Question: q Short answer: nq question: >> ||".into());
    texts.iter().flat_map(|t| words(t)).collect()
}

/// Splits like the `Whitespace` pre-tokenizer (`\w+|[^\w\s]+`), lowercased.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut current_is_word = false;
    for c in text.to_lowercase().chars() {
        let is_word = c.is_alphanumeric() || c == '_';
        if c.is_whitespace() || (!current.is_empty() && is_word != current_is_word) {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        }
        if !c.is_whitespace() {
            current.push(c);
            current_is_word = is_word;
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A word-level tokenizer over [`vocabulary`]: lowercase, whitespace/punctuation split,
/// `[BOS] ... [EOS]` around each sequence, `[PAD]` = 0, `[UNK]` = 1.
pub fn word_level_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::normalizers::Lowercase;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;

    let vocab = SPECIAL_TOKENS
        .iter()
        .map(|s| s.to_string())
        .chain(vocabulary())
        .enumerate()
        .map(|(id, word)| (word, id as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("[UNK]".to_string())
        .build()
        .expect("the vocabulary holds [UNK]");
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_normalizer(Some(Lowercase));
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[BOS] $A [EOS]")
            .expect("a valid template")
            .special_tokens(vec![("[BOS]", 2), ("[EOS]", 3)])
            .build()
            .expect("a valid post-processor"),
    ));
    tokenizer.add_special_tokens(&SPECIAL_TOKENS.map(|t| tokenizers::AddedToken::from(t, true)));
    tokenizer
}

/// The question family a scenes answer belongs to (`color`, `shape`, `size`, `position`,
/// `yes/no`, `count`), for per-family scores; `None` for other answers.
pub fn answer_family(answer: &str) -> Option<&'static str> {
    let is = |names: Vec<&str>| names.contains(&answer);
    if is(Color::ALL.iter().map(|c| c.name()).collect()) {
        Some("color")
    } else if is(Shape::ALL.iter().map(|s| s.name()).collect()) {
        Some("shape")
    } else if is(Size::ALL.iter().map(|s| s.name()).collect()) {
        Some("size")
    } else if is(Cell::ALL.iter().map(|c| c.name()).collect()) {
        Some("position")
    } else if answer == "yes" || answer == "no" {
        Some("yes/no")
    } else if is(NUMBER_WORDS.to_vec()) {
        Some("count")
    } else {
        None
    }
}

/// A fresh scene for CLIP pre-training: its caption, and a grounding question about one of
/// its objects (VQA prompt, half of the time followed by a candidate answer, as the edit side
/// of a scope pair reads) with the cell that object occupies.
pub struct PretrainScene {
    pub image: image::RgbImage,
    pub caption: String,
    pub question: String,
    pub cell: Cell,
    /// The scene graph, for dense supervision of the vision tower (never seen by an editor).
    pub scene: Scene,
}

/// Item `index` of the pre-training stream of `seed`.
pub fn pretrain_scene(seed: u64, index: u64, size: u32) -> PretrainScene {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((2 << 40) | index);
    let scene = Scene::random(&mut rng);
    let image = render::render(&scene, size, &mut rng);
    let object = rng.random_range(0..scene.objects.len());
    let kinds: Vec<RefKind> = RefKind::ALL
        .into_iter()
        .filter(|&k| Ref::of(k, &scene, object).resolve(&scene) == Some(object))
        .collect();
    let kind = *kinds
        .choose(&mut rng)
        .expect("shape and position expressions always resolve (objects keep them distinct)");
    let attribute = *Attribute::ALL
        .choose(&mut rng)
        .expect("attributes are not empty");
    let query = Query::Attribute(attribute, Ref::of(kind, &scene, object));
    let mut question = crate::data::record::vqa_prompt(&query.random_text(&mut rng));
    if rng.random_bool(0.5) {
        let values = scene.edit_values(object, attribute);
        if let Some(value) = values.choose(&mut rng) {
            question = format!("{question} {}", value.name());
        }
    }
    PretrainScene {
        caption: caption(&scene),
        image,
        question,
        cell: scene.objects[object].cell,
        scene,
    }
}
