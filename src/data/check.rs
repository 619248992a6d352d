//! `mmke data check`: validate a dataset file and summarise it.

use std::fmt;

use serde::Serialize;

use super::reader::ReadReport;
use crate::error::Error;

#[derive(Debug, Serialize)]
pub struct CheckSummary {
    pub file: String,
    pub records: usize,
    pub skipped: Vec<(usize, String)>,
    pub invalid: usize,
    pub missing_images: usize,
    /// The first invalid records' errors.
    pub errors: Vec<String>,
    pub scope: Option<ScopeCounts>,
}

/// Counts of labelled scope questions over a set of edits.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ScopeCounts {
    pub records: usize,
    pub questions: usize,
    pub in_scope: usize,
    pub hard_in_scope: usize,
    pub hard_out_of_scope: usize,
    pub near: usize,
    pub edits_with_hard_in_scope: usize,
    pub edits_with_hard_out_of_scope: usize,
}

impl ScopeCounts {
    /// Adds one edit's questions, given as `(in_scope, hard, near)` labels.
    pub fn add(&mut self, labels: impl IntoIterator<Item = (bool, bool, bool)>) {
        let (mut hard_in, mut hard_out) = (0, 0);
        self.records += 1;
        for (in_scope, hard, near) in labels {
            self.questions += 1;
            self.in_scope += in_scope as usize;
            hard_in += (hard && in_scope) as usize;
            hard_out += (hard && !in_scope) as usize;
            self.near += near as usize;
        }
        self.hard_in_scope += hard_in;
        self.hard_out_of_scope += hard_out;
        self.edits_with_hard_in_scope += (hard_in > 0) as usize;
        self.edits_with_hard_out_of_scope += (hard_out > 0) as usize;
    }
}

const SHOWN_ERRORS: usize = 20;

impl CheckSummary {
    pub fn new(report: &ReadReport) -> Self {
        let mut scope = ScopeCounts::default();
        for record in &report.records {
            scope.add(record.scope.iter().map(|q| (q.in_scope, q.hard, q.near)));
        }
        Self {
            file: report.path.display().to_string(),
            records: report.records.len(),
            skipped: report
                .skipped
                .iter()
                .map(|s| (s.index, s.reason.clone()))
                .collect(),
            invalid: report.errors.len(),
            missing_images: report
                .errors
                .iter()
                .filter(|e| e.is_missing_image())
                .count(),
            errors: report
                .errors
                .iter()
                .take(SHOWN_ERRORS)
                .map(Error::to_string)
                .collect(),
            scope: (scope.questions > 0).then_some(scope),
        }
    }

    pub fn is_valid(&self) -> bool {
        self.invalid == 0
    }
}

impl fmt::Display for CheckSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = |n: usize| 100.0 * n as f64 / self.records.max(1) as f64;
        writeln!(f, "file: {}", self.file)?;
        writeln!(
            f,
            "records: {} valid, {} skipped, {} invalid",
            self.records,
            self.skipped.len(),
            self.invalid
        )?;
        writeln!(f, "missing images: {}", self.missing_images)?;
        for (index, reason) in &self.skipped {
            writeln!(f, "  skipped record {index}: {reason}")?;
        }
        if let Some(s) = &self.scope {
            writeln!(
                f,
                "scope questions: {} ({} in scope, {} hard in-scope, {} hard out-of-scope, {} near)",
                s.questions, s.in_scope, s.hard_in_scope, s.hard_out_of_scope, s.near
            )?;
            writeln!(
                f,
                "edits with a hard in-scope question: {} ({:.1}%)",
                s.edits_with_hard_in_scope,
                percent(s.edits_with_hard_in_scope)
            )?;
            writeln!(
                f,
                "edits with a hard out-of-scope question: {} ({:.1}%)",
                s.edits_with_hard_out_of_scope,
                percent(s.edits_with_hard_out_of_scope)
            )?;
        }
        for error in &self.errors {
            writeln!(f, "error: {error}")?;
        }
        if self.invalid > self.errors.len() {
            writeln!(
                f,
                "... and {} more invalid records",
                self.invalid - self.errors.len()
            )?;
        }
        Ok(())
    }
}
