//! Text in and out of the model: the E2E corpus reader and the word-level tokenizer.

pub mod e2e;
pub mod tokenizer;

pub use e2e::{read_e2e, E2eRecord, MeaningRepresentation};
pub use tokenizer::{WordTokenizer, END, PAD, START, UNK};
