//! FGVEdit and MMEdit readers on hand-written files in the released schemas, and on broken
//! files: each failure names the file, the record and the key.

use std::path::{Path, PathBuf};
use std::process::Command;

use mmke::data::reader::{self, Format, ImageCheck, ImageRoots};
use mmke::data::{Task, fgvedit, mmedit};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn coco() -> PathBuf {
    data().join("coco")
}

#[test]
fn reads_fgvedit_with_the_vqa_template() {
    let dataset = fgvedit::read(&data().join("fgvedit_test_data.json"), &coco()).unwrap();
    assert_eq!(dataset.records.len(), 2);
    assert!(dataset.skipped.is_empty());
    let r = &dataset.records[0];
    assert_eq!(r.task, Task::Vqa);
    assert_eq!(
        r.prompt,
        "Question: What color is the cat on the left? Short answer:"
    );
    assert_eq!(r.target, "orange");
    assert_eq!(
        r.rephrase.as_deref(),
        Some("Question: Which color does the left cat have? Short answer:")
    );
    assert_eq!(
        r.image,
        coco().join("val2014/COCO_val2014_000000000042.png")
    );
    // The text-only locality question is used raw.
    let loc = r.loc.as_ref().unwrap();
    assert_eq!(loc.prompt, "who wrote the declaration of independence");
    assert_eq!(loc.answer, "Thomas Jefferson");
    let (fg_gen, fg_loc) = (r.fg_gen.as_ref().unwrap(), r.fg_loc.as_ref().unwrap());
    assert_eq!(fg_gen.image, r.image);
    assert_eq!(
        fg_gen.prompt,
        "Question: What is the color of the animal sitting on the sofa? Short answer:"
    );
    assert_eq!(fg_gen.answer, "orange");
    assert_eq!(
        (fg_loc.image.clone(), fg_loc.answer.as_str()),
        (r.image.clone(), "brown")
    );
    // FGVEdit has no pred, image_rephrase or m_loc.
    assert!(r.original.is_none() && r.image_rephrase.is_none() && r.m_loc.is_none());
    assert_eq!(dataset.records[1].index, 1);
}

#[test]
fn reads_mmedit_vqa_keeping_the_nq_prefix_and_skipping_empty_alt() {
    let path = data().join("vqa_eval.json");
    assert_eq!(mmedit::task_of(&path), Task::Vqa);
    let dataset = mmedit::read(&path, Task::Vqa, &coco(), Some(&data().join("rephrase"))).unwrap();
    assert_eq!(dataset.records.len(), 1);
    assert_eq!(dataset.skipped.len(), 1);
    assert_eq!(
        (dataset.skipped[0].index, dataset.skipped[0].reason.as_str()),
        (1, "empty alt")
    );
    let r = &dataset.records[0];
    assert_eq!(
        r.prompt,
        "Question: What is the cat sitting on? Short answer:"
    );
    assert_eq!(r.original.as_deref(), Some("sofa"));
    assert_eq!(
        r.loc.as_ref().unwrap().prompt,
        "nq question: who sings the song let it be"
    );
    assert_eq!(
        r.image_rephrase.as_ref().unwrap(),
        &data().join("rephrase/COCO_val2014_000000000042_rephrase.png")
    );
    let m_loc = r.m_loc.as_ref().unwrap();
    assert_eq!(
        m_loc.image,
        coco().join("val2014/COCO_val2014_000000000073.png")
    );
    assert_eq!(
        m_loc.prompt,
        "Question: What vehicle is this? Short answer:"
    );
    assert_eq!(m_loc.answer, "bus");
}

#[test]
fn reads_mmedit_captions_without_a_template() {
    let path = data().join("caption_eval_edit.json");
    assert_eq!(mmedit::task_of(&path), Task::Caption);
    let dataset = mmedit::read(
        &path,
        Task::Caption,
        &coco(),
        Some(&data().join("rephrase")),
    )
    .unwrap();
    let r = &dataset.records[0];
    assert_eq!(r.task, Task::Caption);
    assert_eq!(
        (r.prompt.as_str(), r.target.as_str()),
        ("a photo of", "a dog sitting on a sofa")
    );
    assert_eq!(r.m_loc.as_ref().unwrap().prompt, "a photo of");
}

/// Writes `json` as `name` next to a copy of the fixture images, returning (dir, file).
fn broken(name: &str, json: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("val2014")).unwrap();
    for f in [
        "COCO_val2014_000000000042.png",
        "COCO_val2014_000000000073.png",
    ] {
        std::fs::copy(
            coco().join("val2014").join(f),
            dir.path().join("val2014").join(f),
        )
        .unwrap();
    }
    let path = dir.path().join(name);
    std::fs::write(&path, json).unwrap();
    (dir, path)
}

fn fgvedit_text() -> String {
    std::fs::read_to_string(data().join("fgvedit_test_data.json")).unwrap()
}

fn fgvedit_error(name: &str, json: &str) -> String {
    let (dir, path) = broken(name, json);
    let err = fgvedit::read(&path, dir.path()).unwrap_err().to_string();
    assert!(err.contains(name), "the error names the file: {err}");
    err
}

#[test]
fn truncated_json_names_the_file_and_position() {
    let text = fgvedit_text();
    let err = fgvedit_error("truncated.json", &text[..text.len() / 2]);
    assert!(
        err.contains("invalid JSON") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn a_wrong_type_names_record_and_key() {
    let err = fgvedit_error(
        "wrong_type.json",
        &fgvedit_text().replace("\"alt\": \"three\"", "\"alt\": 3"),
    );
    assert!(
        err.contains("record 1: key 'alt': expected a string, found number 3"),
        "{err}"
    );
}

#[test]
fn a_missing_key_names_record_and_key() {
    let text = fgvedit_text().replacen("\"loc_ans\": \"Thomas Jefferson\",", "", 1);
    let err = fgvedit_error("missing_key.json", &text);
    assert!(err.contains("record 0: key 'loc_ans': missing"), "{err}");
}

#[test]
fn a_missing_image_names_record_key_and_path() {
    let text = fgvedit_text().replace("000000000073.png", "000000999999.png");
    let err = fgvedit_error("missing_image.json", &text);
    assert!(
        err.contains("record 1: key 'image': image not found"),
        "{err}"
    );
    assert!(err.contains("COCO_val2014_000000999999.png"), "{err}");
}

#[test]
fn a_corrupt_png_names_record_and_key() {
    let (dir, path) = broken("corrupt.json", &fgvedit_text());
    let png = dir.path().join("val2014/COCO_val2014_000000000073.png");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let err = fgvedit::read(&path, dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("record 1: key 'image': cannot decode image"),
        "{err}"
    );
    // A file whose header is intact but whose data is cut short fails the full decode.
    let good = std::fs::read(coco().join("val2014/COCO_val2014_000000000073.png")).unwrap();
    std::fs::write(&png, &good[..good.len() / 2]).unwrap();
    let roots = ImageRoots::new(dir.path());
    let report = reader::read_report(&path, Format::FgvEdit, &roots, ImageCheck::Decode).unwrap();
    assert_eq!((report.records.len(), report.errors.len()), (1, 1));
    assert!(
        report.errors[0]
            .to_string()
            .contains("record 1: key 'image'")
    );
}

#[test]
fn a_record_that_is_not_an_object_and_a_file_that_is_not_a_list() {
    let err = fgvedit_error("not_object.json", "[3]");
    assert!(
        err.contains("record 0: expected an object, found number 3"),
        "{err}"
    );
    let err = fgvedit_error("not_list.json", "{\"src\": \"x\"}");
    assert!(
        err.contains("expected a JSON list of records, found an object"),
        "{err}"
    );
}

fn mmke(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mmke"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn data_check_prints_counts_and_fails_on_invalid_files() {
    let file = data().join("vqa_eval.json");
    let rephrase = data().join("rephrase");
    let out = mmke(&[
        "data",
        "check",
        file.to_str().unwrap(),
        "--images",
        coco().to_str().unwrap(),
        "--format",
        "mmedit",
        "--rephrase-images",
        rephrase.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("records: 1 valid, 1 skipped, 0 invalid"),
        "{stdout}"
    );
    assert!(stdout.contains("skipped record 1: empty alt"), "{stdout}");

    let (dir, path) = broken(
        "two_bad.json",
        &fgvedit_text()
            .replace("000000000042.png", "gone.png")
            .replace("\"alt\": \"three\"", "\"alt\": []"),
    );
    let out = mmke(&[
        "data",
        "check",
        path.to_str().unwrap(),
        "--images",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("records: 0 valid, 0 skipped, 2 invalid"),
        "{stdout}"
    );
    assert!(stdout.contains("missing images: 1"), "{stdout}");
    assert!(
        stdout.contains("record 1: key 'alt': expected a string, found a list"),
        "{stdout}"
    );
}

#[test]
fn data_check_reports_scope_counts_of_generated_scenes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let generated = mmke(&[
        "data",
        "scenes",
        "--out",
        out,
        "--train",
        "4",
        "--test",
        "40",
        "--seed",
        "2",
        "--image-size",
        "32",
    ]);
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let test = dir.path().join("test.json");
    let check = mmke(&["data", "check", test.to_str().unwrap(), "--images", out]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{stdout}");
    assert!(
        stdout.contains("records: 40 valid, 0 skipped, 0 invalid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hard in-scope")
            && stdout.contains("edits with a hard out-of-scope question"),
        "{stdout}"
    );
}

/// `--data` directories hold either benchmark's files: `read_edits` tells them apart by their
/// keys (MMEdit's caption task by the name), and a file of neither is an error naming it.
#[test]
fn edit_files_of_either_benchmark_are_told_apart() {
    use mmke::data::read_edits;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.png");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mllm/image16.png"),
        &image,
    )
    .unwrap();
    let mmedit = serde_json::json!([{
        "src": "What is it?", "pred": "a cat", "alt": "a dog", "rephrase": "What is this?",
        "image": "a.png", "image_rephrase": "a.png", "loc": "who wrote it", "loc_ans": "me",
        "m_loc": "a.png", "m_loc_q": "What colour?", "m_loc_a": "red"
    }]);
    let write = |name: &str, json: &serde_json::Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, json.to_string()).unwrap();
        path
    };
    let vqa = read_edits(&write("train.json", &mmedit), dir.path()).unwrap();
    assert_eq!(vqa.records[0].task, Task::Vqa);
    assert_eq!(vqa.records[0].original.as_deref(), Some("a cat"));
    assert!(vqa.records[0].m_loc.is_some());
    let caption = read_edits(&write("caption_train.json", &mmedit), dir.path()).unwrap();
    assert_eq!(caption.records[0].task, Task::Caption);
    let fgv: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data().join("fgvedit_test_data.json")).unwrap(),
    )
    .unwrap();
    let fgv_read = read_edits(&data().join("fgvedit_test_data.json"), &coco()).unwrap();
    assert_eq!(fgv_read.records.len(), fgv.as_array().unwrap().len());
    assert!(
        fgv_read.records[0].fg_gen.is_some(),
        "FGVEdit's fine-grained query"
    );
    let neither = write("odd.json", &serde_json::json!([{"question": "q"}]));
    let error = read_edits(&neither, dir.path()).unwrap_err().to_string();
    assert!(
        error.contains("odd.json") && error.contains("neither"),
        "{error}"
    );
}
