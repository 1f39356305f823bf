//! Evaluation of generated text.

pub mod control;
pub mod device_parity;
pub mod fluency;
pub mod repetition;
pub mod report;
pub mod syntax;

pub use fluency::{KneserNey, Perplexity};
