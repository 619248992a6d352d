//! Metric definitions, one implementation each.

use serde::Serialize;

/// Accuracy, precision, recall and F1 of binary predictions (positive = in scope).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct BinaryMetrics {
    pub n: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl BinaryMetrics {
    pub fn new(predictions: &[bool], labels: &[bool]) -> Self {
        assert_eq!(predictions.len(), labels.len());
        let count = |p: bool, l: bool| {
            predictions
                .iter()
                .zip(labels)
                .filter(|&(&a, &b)| a == p && b == l)
                .count() as f64
        };
        let (tp, fp, fn_, tn) = (
            count(true, true),
            count(true, false),
            count(false, true),
            count(false, false),
        );
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        Self {
            n: predictions.len(),
            accuracy: ratio(tp + tn, predictions.len() as f64),
            precision,
            recall,
            f1: ratio(2.0 * precision * recall, precision + recall),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_small_confusion_matrix() {
        // tp = 2, fp = 1, fn = 1, tn = 1
        let m = BinaryMetrics::new(
            &[true, true, true, false, false],
            &[true, true, false, true, false],
        );
        assert_eq!(m.n, 5);
        assert!((m.accuracy - 0.6).abs() < 1e-12);
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.f1 - 2.0 / 3.0).abs() < 1e-12);
    }
}
