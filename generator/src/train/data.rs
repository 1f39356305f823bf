//! Training sequences: E2E references, one per sequence, as `START words END PAD…` of length L.

use std::path::Path;

use crate::text::{read_e2e, WordTokenizer};
use crate::{Error, Result};

pub const TRAIN_FILE: &str = "trainset.csv";
pub const DEV_FILE: &str = "devset.csv";
pub const TEST_FILE: &str = "testset_w_refs.csv";

/// The reference texts of one E2E split.
pub fn references(data_dir: &Path, file: &str) -> Result<Vec<String>> {
    let path = data_dir.join(file);
    let texts: Vec<String> = read_e2e(&path)?
        .into_iter()
        .filter_map(|r| r.text)
        .filter(|t| !t.is_empty())
        .collect();
    if texts.is_empty() {
        return Err(Error::format(
            &path,
            "no references (is there a `ref` column?)",
        ));
    }
    Ok(texts)
}

/// Encoded sequences, and how many references were left out for containing an unknown word.
pub struct Sequences {
    pub ids: Vec<Vec<u32>>,
    pub dropped_unk: usize,
    pub dropped_long: usize,
}

pub fn encode_all(
    tokenizer: &WordTokenizer,
    texts: &[String],
    seq_len: usize,
    drop_unk: bool,
    drop_long: bool,
) -> Result<Sequences> {
    let mut ids = Vec::with_capacity(texts.len());
    let (mut dropped_unk, mut dropped_long) = (0, 0);
    for text in texts {
        if drop_long && tokenizer.encode(text)?.len() + 2 > seq_len {
            dropped_long += 1;
            continue;
        }
        let seq = tokenizer.encode_padded(text, seq_len)?;
        if drop_unk && seq.contains(&tokenizer.unk_id()) {
            dropped_unk += 1;
            continue;
        }
        ids.push(seq);
    }
    Ok(Sequences {
        ids,
        dropped_unk,
        dropped_long,
    })
}
