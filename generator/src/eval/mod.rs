//! Evaluation of generated text.

pub mod fluency;
pub mod report;

pub use fluency::{KneserNey, Perplexity};
