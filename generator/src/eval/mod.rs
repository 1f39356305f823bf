//! Evaluation of generated text.

pub mod control;
pub mod fluency;
pub mod report;

pub use fluency::{KneserNey, Perplexity};
