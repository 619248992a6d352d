//! What the papers claim, checked against the tables that reproduce them: a claim names cells
//! of a table (rows x columns) and what each must be at least as high as (or, with `lower`,
//! at most as high as): the same column of other rows, another column of the same row, or a
//! value, give or take `by`. Each record states every claim of its tables and whether it
//! holds, with the numbers.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::report::Table;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// The claim in words, and where the paper makes it.
    pub says: String,
    pub rows: Vec<String>,
    pub columns: Vec<String>,
    /// Compared with the same column of each of these rows,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub than_rows: Vec<String>,
    /// with this column of the same row,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub than_column: Option<String>,
    /// or with this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub than: Option<f64>,
    /// The margin: a cell must be at least `by` above the reference (below it with `lower`);
    /// a negative margin allows it to fall short by that much.
    #[serde(default)]
    pub by: f64,
    /// The cells must be low (a cost), not high.
    #[serde(default)]
    pub lower: bool,
}

/// A claim as checked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Checked {
    pub says: String,
    pub holds: bool,
    /// Every comparison, e.g. `MSCKE Specificity 89.96 >= SERAC 77.97 + 5`.
    pub comparisons: Vec<String>,
}

fn value(table: &Table, row: &str, column: &str) -> Result<f64> {
    let missing = |what: &str, name: &str| Error::Config {
        path: "experiments".into(),
        reason: format!("a claim on '{}' names no {what} '{name}'", table.title),
    };
    let c = table
        .columns
        .iter()
        .position(|c| c == column)
        .ok_or_else(|| missing("column", column))?;
    let r = table
        .rows
        .iter()
        .find(|r| r.name == row)
        .ok_or_else(|| missing("row", row))?;
    Ok(r.values[c])
}

impl Claim {
    /// Checks the claim on `table`; an error when it names a row or column the table lacks.
    pub fn check(&self, table: &Table) -> Result<Checked> {
        let mut holds = true;
        let mut comparisons = Vec::new();
        for row in &self.rows {
            for column in &self.columns {
                let here = value(table, row, column)?;
                let mut references = Vec::new();
                for other in &self.than_rows {
                    references.push((value(table, other, column)?, other.clone()));
                }
                if let Some(other) = &self.than_column {
                    references.push((value(table, row, other)?, other.clone()));
                }
                if let Some(v) = self.than {
                    references.push((v, String::new()));
                }
                for (reference, name) in references {
                    let (ok, sign) = if self.lower {
                        (here <= reference - self.by, "<=")
                    } else {
                        (here >= reference + self.by, ">=")
                    };
                    holds &= ok;
                    // The reference moves up by `by` (down, for a cost).
                    let shift = if self.lower { -self.by } else { self.by };
                    let margin = if shift > 0.0 {
                        format!(" + {shift}")
                    } else if shift < 0.0 {
                        format!(" - {}", -shift)
                    } else {
                        String::new()
                    };
                    let reference = match name.as_str() {
                        "" => format!("{reference:.2}"),
                        name => format!("{name} {reference:.2}"),
                    };
                    comparisons.push(format!(
                        "{row} {column} {here:.2} {sign} {reference}{margin}: {}",
                        if ok { "yes" } else { "no" }
                    ));
                }
            }
        }
        Ok(Checked {
            says: self.says.clone(),
            holds,
            comparisons,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut t = Table::new("t", "method", &["Locality", "Specificity"]);
        t.push("SERAC", vec![100.0, 78.0]);
        t.push("MSCKE", vec![100.0, 90.0]);
        t
    }

    fn claim(text: &str) -> Claim {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_claim_holds_only_where_every_cell_meets_every_reference() {
        let t = table();
        let above = claim(
            r#"says = "x"
rows = ["MSCKE"]
columns = ["Specificity"]
than_rows = ["SERAC"]
by = 5.0"#,
        );
        let checked = above.check(&t).unwrap();
        assert!(checked.holds);
        assert_eq!(
            checked.comparisons,
            ["MSCKE Specificity 90.00 >= SERAC 78.00 + 5: yes"]
        );
        let too_far = Claim {
            by: 15.0,
            ..above.clone()
        };
        assert!(!too_far.check(&t).unwrap().holds);
        let both = claim(
            r#"says = "x"
rows = ["SERAC", "MSCKE"]
columns = ["Locality"]
than = 99.0"#,
        );
        assert!(both.check(&t).unwrap().holds);
        let cost = Claim {
            lower: true,
            than_column: Some("Locality".into()),
            than: None,
            columns: vec!["Specificity".into()],
            ..both
        };
        let checked = cost.check(&t).unwrap();
        assert!(checked.holds, "{checked:?}");
        let unknown = Claim {
            rows: vec!["MEND".into()],
            ..above
        };
        let err = unknown.check(&t).unwrap_err().to_string();
        assert!(err.contains("no row 'MEND'"), "{err}");
    }
}
