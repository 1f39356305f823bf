//! Word-level tokenizer stored as a Hugging Face `tokenizer.json` (WordLevel model), so that Python
//! tools (the guide's classifier training) read the very same vocabulary.
//!
//! Text is lowercased, split on whitespace, and every character that is neither a word character
//! nor whitespace (punctuation, `£`) becomes a token of its own: `£30.` → `£ 30 .`.

use std::path::Path;

use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::{Error, Result};

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const START: &str = "[START]";
pub const END: &str = "[END]";
/// Special tokens, in id order: PAD = 0, UNK = 1, START = 2, END = 3.
pub const SPECIAL_TOKENS: [&str; 4] = [PAD, UNK, START, END];

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// The pre-tokenizer, compiled once (its regex is costly to build).
fn shared_pre_tokenizer() -> &'static Sequence {
    static PRE: std::sync::OnceLock<Sequence> = std::sync::OnceLock::new();
    PRE.get_or_init(pre_tokenizer)
}

fn pre_tokenizer() -> Sequence {
    let punctuation = Split::new(
        SplitPattern::Regex(r"[^\w\s]".into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .expect("static regex compiles");
    Sequence::new(vec![
        PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit),
        PreTokenizerWrapper::Split(punctuation),
    ])
}

/// The words of `text` exactly as the tokenizer sees them, before any vocabulary lookup.
pub fn words(text: &str) -> Vec<String> {
    let mut normalized = NormalizedString::from(text);
    Lowercase
        .normalize(&mut normalized)
        .expect("lowercase cannot fail");
    let mut pre = PreTokenizedString::from(normalized);
    shared_pre_tokenizer()
        .pre_tokenize(&mut pre)
        .expect("pre-tokenizer cannot fail");
    pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
}

/// The word-level vocabulary with PAD/UNK/START/END.
#[derive(Clone)]
pub struct WordTokenizer {
    inner: Tokenizer,
    pad: u32,
    unk: u32,
    start: u32,
    end: u32,
}

impl WordTokenizer {
    /// Builds the vocabulary from `texts`: every word seen at least `min_count` times.
    pub fn train<'a>(texts: impl Iterator<Item = &'a str> + Send, min_count: u64) -> Result<Self> {
        let model = WordLevel::builder()
            .unk_token(UNK.into())
            .build()
            .map_err(tok_err)?;
        let mut tokenizer = Tokenizer::new(model);
        tokenizer
            .with_normalizer(Some(Lowercase))
            .map_err(tok_err)?
            .with_pre_tokenizer(Some(pre_tokenizer()));
        let trainer = WordLevelTrainer::builder()
            .min_frequency(min_count)
            .vocab_size(usize::MAX)
            .show_progress(false)
            .special_tokens(
                SPECIAL_TOKENS
                    .iter()
                    .map(|t| AddedToken::from(*t, true))
                    .collect(),
            )
            .build()
            .map_err(tok_err)?;
        tokenizer
            .train(&mut TrainerWrapper::from(trainer), texts)
            .map_err(tok_err)?;
        Self::from_tokenizer(tokenizer)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer file not found"),
            ));
        }
        let inner = Tokenizer::from_file(path).map_err(|e| Error::format(path, e.to_string()))?;
        Self::from_tokenizer(inner)
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<Self> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::Tokenizer(format!("vocabulary lacks special token {t}")))
        };
        Ok(Self {
            pad: id(PAD)?,
            unk: id(UNK)?,
            start: id(START)?,
            end: id(END)?,
            inner,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, true).map_err(tok_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    pub fn unk_id(&self) -> u32 {
        self.unk
    }
    pub fn start_id(&self) -> u32 {
        self.start
    }
    pub fn end_id(&self) -> u32 {
        self.end
    }
    /// PAD, UNK, START and END: the ids that are not words.
    pub fn special_ids(&self) -> [u32; 4] {
        [self.pad, self.unk, self.start, self.end]
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Word ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// `START words END PAD…`, exactly `len` ids; over-long texts are cut and still end with END.
    pub fn encode_padded(&self, text: &str, len: usize) -> Result<Vec<u32>> {
        let words = self.encode(text)?;
        let mut ids = Vec::with_capacity(len);
        ids.push(self.start);
        ids.extend(words.iter().take(len.saturating_sub(2)));
        ids.push(self.end);
        ids.resize(len, self.pad);
        ids.truncate(len);
        Ok(ids)
    }

    /// The visible words of a sampled sequence: up to the first END, with PAD and START dropped.
    pub fn visible<'a>(&self, ids: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
        let (pad, start, end) = (self.pad, self.start, self.end);
        ids.iter()
            .copied()
            .take_while(move |&id| id != end)
            .filter(move |&id| id != pad && id != start)
    }

    /// Text of a sampled sequence: words joined by spaces, PAD and END removed (UNK is kept, visibly).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.visible(ids)
            .map(|id| {
                self.inner
                    .id_to_token(id)
                    .unwrap_or_else(|| UNK.to_string())
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<&'static str> {
        vec![
            "The Vaults is a pub near Café Adriatic. Prices start at £30.",
            "The Vaults, a pub, is near Café Adriatic.",
            "A pub near Café Adriatic: The Vaults.",
        ]
    }

    #[test]
    fn words_split_punctuation_and_pounds() {
        assert_eq!(
            words("Prices start at £30.  Café  it's"),
            vec!["prices", "start", "at", "£", "30", ".", "café", "it", "'", "s"]
        );
    }

    #[test]
    fn round_trip_through_tokenizer_json() {
        let tok = WordTokenizer::train(corpus().into_iter(), 2).unwrap();
        assert_eq!(
            (tok.pad_id(), tok.unk_id(), tok.start_id(), tok.end_id()),
            (0, 1, 2, 3)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let loaded = WordTokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        let text = "the vaults is a pub near café adriatic .";
        let ids = loaded.encode_padded(text, 16).unwrap();
        assert_eq!(ids.len(), 16);
        assert_eq!(ids[0], loaded.start_id());
        assert_eq!(loaded.decode(&ids), text);
        assert_eq!(tok.encode(text).unwrap(), loaded.encode(text).unwrap());
        // "prices" occurs once: below min_count 2, so it is unknown.
        assert_eq!(loaded.decode(&loaded.encode("Prices").unwrap()), UNK);
    }

    #[test]
    fn truncation_keeps_end_and_decode_stops_there() {
        let tok = WordTokenizer::train(corpus().into_iter(), 1).unwrap();
        let ids = tok
            .encode_padded("the vaults is a pub near café adriatic", 5)
            .unwrap();
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[4], tok.end_id());
        assert_eq!(tok.decode(&ids), "the vaults is");
        let mut after_end = ids.clone();
        after_end.push(tok.token_to_id("pub").unwrap());
        assert_eq!(tok.decode(&after_end), "the vaults is");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = WordTokenizer::from_file(Path::new("/nonexistent/tokenizer.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    }
}
