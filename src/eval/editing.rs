//! Knowledge-editing metrics (MSCKE eq. 12-17; UniKE's Reliability / Generality / Locality),
//! one implementation each, each reported as token accuracy and exact match.
//!
//! Two kinds of comparison underlie them all:
//! - [`target_accuracy`]: teacher-forced argmax predictions of a query's target tokens against
//!   the target (Reliability eq. 15, T-/M-Generality, M_in^v eq. 13);
//! - [`agreement`]: the post-edit model's top-k token predictions against the *pre-edit*
//!   model's on the same input, position by position (T-/M-Locality eq. 16, M_out^v eq. 14),
//!   so an unedited model scores 100.

use serde::{Deserialize, Serialize};

/// A score as both variants the literature reports: the share of correct target tokens
/// (`token_accuracy`) and the share of queries whose tokens are all correct (`exact_match`),
/// each averaged over queries, in [0, 1].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Score {
    pub n: usize,
    pub token_accuracy: f64,
    pub exact_match: f64,
}

impl Score {
    /// The mean of per-query `(token share, all correct)` pairs.
    fn mean(per_query: impl IntoIterator<Item = (f64, bool)>) -> Self {
        let (mut n, mut tokens, mut exact) = (0usize, 0f64, 0f64);
        for (share, all) in per_query {
            n += 1;
            tokens += share;
            exact += all as u8 as f64;
        }
        let mean = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
        Self {
            n,
            token_accuracy: mean(tokens),
            exact_match: mean(exact),
        }
    }

    /// The mean of two scores, component by component (Specificity, eq. 12).
    pub fn average(a: Score, b: Score) -> Score {
        Score {
            n: a.n + b.n,
            token_accuracy: (a.token_accuracy + b.token_accuracy) / 2.0,
            exact_match: (a.exact_match + b.exact_match) / 2.0,
        }
    }
}

/// One query's teacher-forced argmax predictions at its target positions, and the target.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetPrediction {
    pub predicted: Vec<u32>,
    pub target: Vec<u32>,
}

/// One query's top-k token ids at each compared position (`[positions][k]`, best first), for
/// the pre-edit and the post-edit model.
#[derive(Clone, Debug, PartialEq)]
pub struct TopK {
    pub pre_edit: Vec<Vec<u32>>,
    pub post_edit: Vec<Vec<u32>>,
}

/// Teacher-forced accuracy on target tokens (Reliability eq. 15, Generality, M_in^v eq. 13).
pub fn target_accuracy(queries: &[TargetPrediction]) -> Score {
    Score::mean(queries.iter().map(|q| {
        assert_eq!(
            q.predicted.len(),
            q.target.len(),
            "one prediction per target token"
        );
        let correct = q
            .predicted
            .iter()
            .zip(&q.target)
            .filter(|(p, t)| p == t)
            .count();
        let total = q.target.len().max(1);
        (correct as f64 / total as f64, correct == q.target.len())
    }))
}

/// Agreement of the post-edit with the pre-edit model (Locality eq. 16, M_out^v eq. 14): per
/// query, the share of (position, rank) slots whose top-k ids are equal; exact when all are.
pub fn agreement(queries: &[TopK]) -> Score {
    Score::mean(queries.iter().map(|q| {
        assert_eq!(
            q.pre_edit.len(),
            q.post_edit.len(),
            "same positions compared"
        );
        let (mut same, mut total) = (0usize, 0usize);
        for (pre, post) in q.pre_edit.iter().zip(&q.post_edit) {
            assert_eq!(pre.len(), post.len(), "same k before and after");
            total += pre.len();
            same += pre.iter().zip(post).filter(|(a, b)| a == b).count();
        }
        let share = if total == 0 {
            1.0
        } else {
            same as f64 / total as f64
        };
        (share, same == total)
    }))
}

/// k of the top-k locality comparison (eq. 16): a locality probe counts as unchanged where the
/// edited model's top-k tokens equal the unedited model's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityK {
    /// For probes with an image.
    pub image: usize,
    /// For text-only probes.
    pub text: usize,
}

impl Default for LocalityK {
    /// 10 with an image, 1 for text alone, as the reference code compares them.
    fn default() -> Self {
        Self { image: 10, text: 1 }
    }
}

impl LocalityK {
    pub fn of(self, has_image: bool) -> usize {
        if has_image { self.image } else { self.text }
    }
}

/// Every metric of one evaluation, each as a [`Score`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct EditMetrics {
    /// The edit query itself (eq. 15).
    pub reliability: Score,
    /// Rephrased question on the edit image.
    pub t_generality: Score,
    /// The edit question on a rephrased image (MMEdit).
    pub m_generality: Score,
    /// A text-only question out of scope (eq. 16).
    pub t_locality: Score,
    /// A question on another image (MMEdit).
    pub m_locality: Score,
    /// In-visual-scope questions on the edit image (eq. 13).
    pub m_in: Score,
    /// Out-of-visual-scope questions on the edit image (eq. 14).
    pub m_out: Score,
}

impl EditMetrics {
    /// Specificity = (M_in^v + M_out^v) / 2 (eq. 12).
    pub fn specificity(&self) -> Score {
        Score::average(self.m_in, self.m_out)
    }
}

/// A column of an editing table: one score of [`EditMetrics`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    Reliability,
    TGenerality,
    MGenerality,
    TLocality,
    MLocality,
    /// (M_in^v + M_out^v) / 2 (eq. 12).
    Specificity,
}

impl Metric {
    pub fn of(self, m: &EditMetrics) -> Score {
        match self {
            Metric::Reliability => m.reliability,
            Metric::TGenerality => m.t_generality,
            Metric::MGenerality => m.m_generality,
            Metric::TLocality => m.t_locality,
            Metric::MLocality => m.m_locality,
            Metric::Specificity => m.specificity(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(predicted: &[u32], target: &[u32]) -> TargetPrediction {
        TargetPrediction {
            predicted: predicted.to_vec(),
            target: target.to_vec(),
        }
    }

    #[test]
    fn token_accuracy_and_exact_match_differ_where_they_should() {
        // Query 1: 2 of 3 tokens right; query 2: all right.
        let s = target_accuracy(&[pred(&[5, 6, 9], &[5, 6, 7]), pred(&[1], &[1])]);
        assert_eq!(s.n, 2);
        assert!((s.token_accuracy - (2.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
        assert!((s.exact_match - 0.5).abs() < 1e-12);
        // Both agree when every query is all right or all wrong.
        let s = target_accuracy(&[pred(&[1, 2], &[1, 2]), pred(&[0, 0], &[1, 2])]);
        assert_eq!((s.token_accuracy, s.exact_match), (0.5, 0.5));
    }

    #[test]
    fn locality_compares_with_the_pre_edit_model_not_the_label() {
        // The pre-edit model was "wrong" (whatever the label says); an unchanged model agrees.
        let unchanged = TopK {
            pre_edit: vec![vec![4], vec![8]],
            post_edit: vec![vec![4], vec![8]],
        };
        let s = agreement(&[unchanged.clone()]);
        assert_eq!((s.token_accuracy, s.exact_match), (1.0, 1.0));
        // One of two positions changed: half the tokens, not an exact match.
        let changed = TopK {
            pre_edit: vec![vec![4], vec![8]],
            post_edit: vec![vec![4], vec![9]],
        };
        let s = agreement(&[unchanged, changed]);
        assert!((s.token_accuracy - 0.75).abs() < 1e-12);
        assert!((s.exact_match - 0.5).abs() < 1e-12);
        // Top-10 comparisons count ranks: two swapped ids leave 8 of 10 equal.
        let pre: Vec<u32> = (0..10).collect();
        let mut post = pre.clone();
        post.swap(8, 9);
        let s = agreement(&[TopK {
            pre_edit: vec![pre],
            post_edit: vec![post],
        }]);
        assert!((s.token_accuracy - 0.8).abs() < 1e-12);
        assert_eq!(LocalityK::default().of(true), 10);
        assert_eq!(LocalityK::default().of(false), 1);
    }

    #[test]
    fn specificity_is_the_mean_of_in_and_out_of_visual_scope() {
        let metrics = EditMetrics {
            m_in: Score {
                n: 4,
                token_accuracy: 0.5,
                exact_match: 0.25,
            },
            m_out: Score {
                n: 4,
                token_accuracy: 1.0,
                exact_match: 0.75,
            },
            ..EditMetrics::default()
        };
        let s = metrics.specificity();
        assert_eq!((s.token_accuracy, s.exact_match), (0.75, 0.5));
    }
}
