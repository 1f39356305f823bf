//! Reader for the E2E NLG CSV files (`mr`, `ref` columns; quoted fields may hold CR LF).

use std::path::Path;

use crate::{Error, Result};

/// One row of an E2E file: a meaning representation and, except in the MR-only test file, a reference.
#[derive(Debug, Clone, PartialEq)]
pub struct E2eRecord {
    pub mr: MeaningRepresentation,
    pub text: Option<String>,
}

/// A flat MR such as `name[The Vaults], eatType[pub]`, as ordered (attribute, value) pairs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MeaningRepresentation(pub Vec<(String, String)>);

impl MeaningRepresentation {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let mut pairs = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            let open = rest
                .find('[')
                .ok_or_else(|| format!("expected `attr[value]` in {rest:?}"))?;
            let close = rest[open..]
                .find(']')
                .map(|i| open + i)
                .ok_or_else(|| format!("unclosed `[` in {rest:?}"))?;
            let attr = rest[..open].trim().trim_start_matches(',').trim();
            if attr.is_empty() {
                return Err(format!("empty attribute name in {s:?}"));
            }
            pairs.push((attr.to_string(), rest[open + 1..close].trim().to_string()));
            rest = rest[close + 1..].trim_start_matches([',', ' ']);
        }
        Ok(Self(pairs))
    }

    pub fn get(&self, attr: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(a, _)| a == attr)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads an E2E CSV file. The header must name an `mr` column (any case); `ref` is optional.
pub fn read_e2e(path: &Path) -> Result<Vec<E2eRecord>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(file);
    let csv_err = |e: csv::Error| Error::Csv {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let headers = reader.headers().map_err(csv_err)?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    };
    let mr_col = column("mr").ok_or_else(|| Error::Csv {
        path: path.to_path_buf(),
        message: format!(
            "no `mr` column in header {:?}",
            headers.iter().collect::<Vec<_>>()
        ),
    })?;
    let ref_col = column("ref");
    let mut records = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.map_err(csv_err)?;
        let mr = MeaningRepresentation::parse(&record[mr_col]).map_err(|message| Error::Csv {
            path: path.to_path_buf(),
            message: format!("row {}: {message}", row + 1),
        })?;
        let text = ref_col.map(|c| record[c].trim().to_string());
        records.push(E2eRecord { mr, text });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mr_with_commas_and_pounds() {
        let mr = MeaningRepresentation::parse(
            "name[The Vaults], priceRange[more than £30], customer rating[5 out of 5]",
        )
        .unwrap();
        assert_eq!(mr.get("name"), Some("The Vaults"));
        assert_eq!(mr.get("priceRange"), Some("more than £30"));
        assert_eq!(mr.get("customer rating"), Some("5 out of 5"));
        assert_eq!(mr.0.len(), 3);
    }

    #[test]
    fn malformed_csv_names_the_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.csv");
        std::fs::write(&path, "mr,ref\n\"name[A]\",one,two\n").unwrap();
        let err = read_e2e(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad.csv") && err.contains("malformed CSV"),
            "{err}"
        );
        std::fs::write(&path, "text\nhello\n").unwrap();
        let err = read_e2e(&path).unwrap_err().to_string();
        assert!(err.contains("no `mr` column"), "{err}");
        std::fs::write(&path, "mr,ref\nname[A,hello\n").unwrap();
        let err = read_e2e(&path).unwrap_err().to_string();
        assert!(err.contains("row 1") && err.contains("unclosed"), "{err}");
    }
}
