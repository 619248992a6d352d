//! Evaluation protocols: one-step (the model is reset after each edit), sequential (K edits
//! accumulate, metrics after the K-th) and cross-task (VQA and caption edits mixed in one
//! sequence: the same as sequential over a mixed list). In every protocol the pre-edit
//! predictions that Locality and M_out^v compare with are computed before the first edit of
//! the sequence, so a model can never be compared with an already-edited version of itself.

use crate::data::record::EditRecord;
use crate::edit::Editor;
use crate::edit::speaker::Query;
use crate::error::Result;

use super::editing::{EditMetrics, LocalityK, TargetPrediction, TopK, agreement, target_accuracy};

/// What one edit record asks of the edited model.
#[derive(Clone, Debug, Default)]
pub struct Probes {
    /// (query, expected answer) for the accuracy metrics.
    pub reliability: Vec<(Query, String)>,
    pub t_generality: Vec<(Query, String)>,
    pub m_generality: Vec<(Query, String)>,
    pub m_in: Vec<(Query, String)>,
    /// (query, answer to teacher-force) for the agreement metrics.
    pub t_locality: Vec<(Query, String)>,
    pub m_locality: Vec<(Query, String)>,
    pub m_out: Vec<(Query, String)>,
}

impl Probes {
    pub fn of(record: &EditRecord) -> Self {
        let on = |image: &std::path::Path, prompt: &str, answer: &str| {
            (
                Query {
                    image: Some(image.to_path_buf()),
                    prompt: prompt.to_string(),
                },
                answer.to_string(),
            )
        };
        let mut probes = Probes {
            reliability: vec![on(&record.image, &record.prompt, &record.target)],
            ..Probes::default()
        };
        if let Some(r) = &record.rephrase {
            probes
                .t_generality
                .push(on(&record.image, r, &record.target));
        }
        if let Some(image) = &record.image_rephrase {
            probes
                .m_generality
                .push(on(image, &record.prompt, &record.target));
        }
        if let Some(q) = &record.loc {
            probes.t_locality.push((
                Query {
                    image: None,
                    prompt: q.prompt.clone(),
                },
                q.answer.clone(),
            ));
        }
        if let Some(q) = &record.m_loc {
            probes.m_locality.push(on(&q.image, &q.prompt, &q.answer));
        }
        if record.scope.is_empty() {
            if let Some(q) = &record.fg_gen {
                probes.m_in.push(on(&q.image, &q.prompt, &q.answer));
            }
            if let Some(q) = &record.fg_loc {
                probes.m_out.push(on(&q.image, &q.prompt, &q.answer));
            }
        }
        for q in &record.scope {
            if q.in_scope {
                probes
                    .m_in
                    .push(on(&record.image, &q.prompt, &q.answer_after));
            } else {
                probes
                    .m_out
                    .push(on(&record.image, &q.prompt, &q.answer_before));
            }
        }
        probes
    }
}

/// Predictions gathered over records, turned into metrics at the end.
#[derive(Default)]
struct Gathered {
    reliability: Vec<TargetPrediction>,
    t_generality: Vec<TargetPrediction>,
    m_generality: Vec<TargetPrediction>,
    m_in: Vec<TargetPrediction>,
    t_locality: Vec<TopK>,
    m_locality: Vec<TopK>,
    m_out: Vec<TopK>,
}

impl Gathered {
    fn metrics(&self) -> EditMetrics {
        EditMetrics {
            reliability: target_accuracy(&self.reliability),
            t_generality: target_accuracy(&self.t_generality),
            m_generality: target_accuracy(&self.m_generality),
            m_in: target_accuracy(&self.m_in),
            t_locality: agreement(&self.t_locality),
            m_locality: agreement(&self.m_locality),
            m_out: agreement(&self.m_out),
        }
    }
}

fn accuracy(
    editor: &mut dyn Editor,
    probes: &[(Query, String)],
    out: &mut Vec<TargetPrediction>,
) -> Result<()> {
    for (query, answer) in probes {
        let p = editor.predict(query, answer, 1)?;
        out.push(TargetPrediction {
            predicted: p.argmax,
            target: p.target,
        });
    }
    Ok(())
}

fn top_k(
    editor: &mut dyn Editor,
    probes: &[(Query, String)],
    locality: LocalityK,
) -> Result<Vec<Vec<Vec<u32>>>> {
    probes
        .iter()
        .map(|(query, answer)| {
            let k = locality.of(query.image.is_some());
            Ok(editor.predict(query, answer, k)?.top_k)
        })
        .collect()
}

/// One sequence: reset, cache the pre-edit top-k of every locality probe, apply every edit in
/// order, then measure every record's probes on the model as edited by all of them.
fn sequence(
    editor: &mut dyn Editor,
    records: &[EditRecord],
    locality: LocalityK,
    gathered: &mut Gathered,
) -> Result<()> {
    editor.reset();
    let probes: Vec<Probes> = records.iter().map(Probes::of).collect();
    // Before the first edit.
    let mut pre = Vec::with_capacity(probes.len());
    for p in &probes {
        pre.push([
            top_k(editor, &p.t_locality, locality)?,
            top_k(editor, &p.m_locality, locality)?,
            top_k(editor, &p.m_out, locality)?,
        ]);
    }
    for record in records {
        editor.edit(record)?;
    }
    for (p, [t_loc, m_loc, m_out]) in probes.iter().zip(pre) {
        accuracy(editor, &p.reliability, &mut gathered.reliability)?;
        accuracy(editor, &p.t_generality, &mut gathered.t_generality)?;
        accuracy(editor, &p.m_generality, &mut gathered.m_generality)?;
        accuracy(editor, &p.m_in, &mut gathered.m_in)?;
        for (probes, before, out) in [
            (&p.t_locality, t_loc, &mut gathered.t_locality),
            (&p.m_locality, m_loc, &mut gathered.m_locality),
            (&p.m_out, m_out, &mut gathered.m_out),
        ] {
            for (post, pre) in top_k(editor, probes, locality)?.into_iter().zip(before) {
                out.push(TopK {
                    pre_edit: pre,
                    post_edit: post,
                });
            }
        }
    }
    Ok(())
}

/// One-step editing: each record is edited alone on the unedited model (locality compared
/// by the reference code's top-k).
pub fn one_step(editor: &mut dyn Editor, records: &[EditRecord]) -> Result<EditMetrics> {
    sequential(editor, records, 1, LocalityK::default())
}

/// Sequential editing: consecutive groups of `k` records; within a group the edits accumulate
/// and every record of the group is measured after its `k`-th edit (`k` = 1: one-step).
/// Cross-task editing is this over a list that mixes VQA and caption records.
pub fn sequential(
    editor: &mut dyn Editor,
    records: &[EditRecord],
    k: usize,
    locality: LocalityK,
) -> Result<EditMetrics> {
    let mut gathered = Gathered::default();
    for group in records.chunks(k.max(1)) {
        sequence(editor, group, locality, &mut gathered)?;
    }
    editor.reset();
    Ok(gathered.metrics())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::speaker::Prediction;
    use std::path::PathBuf;

    /// A model that answers 1 everywhere until edited, then 7 for every prompt it was edited
    /// on; it records every call, so the tests can check what was asked when.
    #[derive(Default)]
    struct Toy {
        edited: Vec<String>,
        log: Vec<String>,
    }

    impl Editor for Toy {
        fn edit(&mut self, record: &EditRecord) -> Result<()> {
            self.log.push(format!("edit {}", record.prompt));
            self.edited.push(record.prompt.clone());
            Ok(())
        }

        fn predict(&mut self, query: &Query, _answer: &str, k: usize) -> Result<Prediction> {
            self.log.push(format!("predict {}", query.prompt));
            let id = if self.edited.contains(&query.prompt) {
                7
            } else {
                1
            };
            Ok(Prediction {
                target: vec![7],
                argmax: vec![id],
                top_k: vec![vec![id; k]],
            })
        }

        fn answer(&mut self, query: &Query, _max_new: usize) -> Result<String> {
            self.log.push(format!("answer {}", query.prompt));
            Ok(if self.edited.contains(&query.prompt) {
                "7"
            } else {
                "1"
            }
            .into())
        }

        fn reset(&mut self) {
            self.log.push("reset".into());
            self.edited.clear();
        }
    }

    fn record(prompt: &str) -> EditRecord {
        let mut r = EditRecord::vqa(PathBuf::from("x.png"), prompt, "seven");
        r.loc = Some(crate::data::record::TextQuery {
            prompt: "loc".into(),
            answer: "one".into(),
        });
        r.fg_loc = Some(crate::data::record::ImageQuery {
            image: PathBuf::from("x.png"),
            prompt: format!("{prompt} other"),
            answer: "one".into(),
        });
        r
    }

    #[test]
    fn pre_edit_outputs_are_cached_before_the_first_edit_of_a_sequence() {
        let records = [record("a"), record("b"), record("c")];
        let mut toy = Toy::default();
        let metrics = sequential(&mut toy, &records, 3, LocalityK::default()).unwrap();
        let first_edit = toy.log.iter().position(|l| l.starts_with("edit")).unwrap();
        let locality_before: Vec<&String> = toy.log[..first_edit]
            .iter()
            .filter(|l| l.starts_with("predict"))
            .collect();
        // Every locality and M_out probe of the three records, asked before any edit.
        assert_eq!(locality_before.len(), 3 * 2, "{:?}", toy.log);
        assert_eq!(toy.log[0], "reset");
        // All three edits land before any accuracy probe.
        let edits: Vec<usize> = (0..toy.log.len())
            .filter(|&i| toy.log[i].starts_with("edit"))
            .collect();
        assert_eq!(edits, [first_edit, first_edit + 1, first_edit + 2]);
        assert_eq!(metrics.reliability.exact_match, 1.0);
        // The toy's locality answers never change: agreement 1.
        assert_eq!(metrics.t_locality.exact_match, 1.0);
        assert_eq!(metrics.m_out.token_accuracy, 1.0);
    }

    #[test]
    fn one_step_resets_between_records() {
        let records = [record("a"), record("b")];
        let mut toy = Toy::default();
        let metrics = one_step(&mut toy, &records).unwrap();
        assert_eq!(toy.log.iter().filter(|l| *l == "reset").count(), 3);
        assert_eq!(metrics.reliability.n, 2);
        assert_eq!(metrics.reliability.token_accuracy, 1.0);
    }

    #[test]
    fn the_protocols_drive_the_memory_editor() {
        let (dir, _) = crate::edit::serac::tests::two_scenes(9);
        let device = burn::tensor::Device::flex();
        // Nothing is ever in scope: the base model answers before and after, so every
        // locality probe agrees with the pre-edit model.
        let (mut editor, records) = crate::edit::serac::tests::editor(dir.path(), 1e9, &device);
        let metrics = sequential(&mut editor, &records, 2, LocalityK::default()).unwrap();
        assert_eq!(metrics.t_locality.exact_match, 1.0);
        assert_eq!(metrics.m_locality.exact_match, 1.0);
        assert_eq!(metrics.m_out.exact_match, 1.0);
        assert!(metrics.m_out.n > 0 && metrics.m_in.n > 0);
        assert_eq!(metrics.reliability.n, 2);
        assert!(editor.is_empty(), "the protocol leaves the editor reset");
    }
}
