//! What the E2E quality targets look at, in one report: teacher-LM perplexity of samples and of the
//! human dev references (and their ratio), the repetition rate of both, 4-gram perplexity of samples
//! and of the human test references (and their ratio), how often sentences end with final
//! punctuation, how many contain an unknown word, and how many are verbatim copies of a training
//! reference. Texts are scored exactly as given.

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;

use super::fluency::{KneserNey, Perplexity};
use super::repetition::repetition_rate;
use crate::model::teacher_lm::{LoadedTeacher, TeacherPerplexity};
use crate::text::tokenizer::{words, UNK};
use crate::train::data::{references, DEV_FILE, TEST_FILE, TRAIN_FILE};
use crate::Result;

#[derive(Debug, Clone, Serialize)]
pub struct FluencyReport {
    /// Under the teacher LM, against the dev references (E2E's test references score much higher
    /// under an LM of the train references: another mix of MRs).
    pub teacher: TeacherScores,
    /// Share of texts with a word or bigram repeated back to back.
    pub samples_repetition: f64,
    pub dev_references_repetition: f64,
    pub order: usize,
    pub samples: Perplexity,
    pub test_references: Perplexity,
    /// samples ÷ test references (human text scores about 1.0–1.2).
    pub ratio: f64,
    pub samples_final_punctuation: f64,
    pub references_final_punctuation: f64,
    pub samples_with_unk: f64,
    pub samples_copied_from_train: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TeacherScores {
    pub samples: TeacherPerplexity,
    pub dev_references: TeacherPerplexity,
    /// samples ÷ dev references: 1 reads like E2E's own text, higher is less fluent.
    pub ratio: f64,
}

fn normalized(text: &str) -> String {
    words(text).join(" ")
}

fn final_punctuation_share(texts: &[String]) -> f64 {
    let ends = |t: &String| matches!(words(t).last().map(String::as_str), Some("." | "!" | "?"));
    texts.iter().filter(|t| ends(t)).count() as f64 / texts.len().max(1) as f64
}

/// Everything a report compares samples with, computed once: the 4-gram model of the train
/// references and what it and the teacher give the human references. `eval-control` judges its
/// guided and unguided texts with one of these.
pub struct FluencyJudge<'a> {
    order: usize,
    lm: KneserNey,
    teacher: &'a LoadedTeacher,
    train_set: HashSet<String>,
    test_perplexity: Perplexity,
    test_final_punctuation: f64,
    dev_teacher: TeacherPerplexity,
    dev_repetition: f64,
}

impl<'a> FluencyJudge<'a> {
    pub fn new(data_dir: &Path, order: usize, teacher: &'a LoadedTeacher) -> Result<Self> {
        let train = references(data_dir, TRAIN_FILE)?;
        let test = references(data_dir, TEST_FILE)?;
        let dev = references(data_dir, DEV_FILE)?;
        let lm = KneserNey::fit(train.iter().map(String::as_str), order);
        Ok(Self {
            order,
            test_perplexity: lm.perplexity(test.iter().map(String::as_str)),
            lm,
            teacher,
            train_set: train.iter().map(|t| normalized(t)).collect(),
            test_final_punctuation: final_punctuation_share(&test),
            dev_teacher: teacher.perplexity(&dev)?,
            dev_repetition: repetition_rate(&dev),
        })
    }

    /// The report of `samples`, each scored exactly as given.
    pub fn report(&self, samples: &[String]) -> Result<FluencyReport> {
        let teacher_samples = self.teacher.perplexity(samples)?;
        let sample_ppl = self.lm.perplexity(samples.iter().map(String::as_str));
        let n = samples.len().max(1) as f64;
        Ok(FluencyReport {
            teacher: TeacherScores {
                ratio: teacher_samples.perplexity / self.dev_teacher.perplexity,
                samples: teacher_samples,
                dev_references: self.dev_teacher,
            },
            samples_repetition: repetition_rate(samples),
            dev_references_repetition: self.dev_repetition,
            order: self.order,
            ratio: sample_ppl.perplexity / self.test_perplexity.perplexity,
            samples: sample_ppl,
            test_references: self.test_perplexity,
            samples_final_punctuation: final_punctuation_share(samples),
            references_final_punctuation: self.test_final_punctuation,
            samples_with_unk: samples.iter().filter(|s| s.contains(UNK)).count() as f64 / n,
            samples_copied_from_train: samples
                .iter()
                .filter(|s| self.train_set.contains(&normalized(s)))
                .count() as f64
                / n,
        })
    }
}

impl FluencyReport {
    /// A plain-text table for terminals and READMEs.
    pub fn table(&self) -> String {
        format!(
            "| measure | samples | E2E references |\n|---|---:|---:|\n\
             | teacher LM perplexity (vs dev references) | {:.2} | {:.2} |\n\
             | teacher perplexity ratio (samples ÷ references) | {:.3} | 1.000 |\n\
             | repetition (word or bigram repeated back to back) | {:.1}% | {:.1}% |\n\
             | sentences (test references) | {} | {} |\n\
             | {}-gram KN perplexity (vs test references) | {:.2} | {:.2} |\n\
             | n-gram perplexity ratio (samples ÷ references) | {:.3} | 1.000 |\n\
             | end with . ! ? | {:.1}% | {:.1}% |\n\
             | contain UNK | {:.1}% | – |\n\
             | exact copies of a train reference | {:.1}% | – |\n",
            self.teacher.samples.perplexity,
            self.teacher.dev_references.perplexity,
            self.teacher.ratio,
            100.0 * self.samples_repetition,
            100.0 * self.dev_references_repetition,
            self.samples.sentences,
            self.test_references.sentences,
            self.order,
            self.samples.perplexity,
            self.test_references.perplexity,
            self.ratio,
            100.0 * self.samples_final_punctuation,
            100.0 * self.references_final_punctuation,
            100.0 * self.samples_with_unk,
            100.0 * self.samples_copied_from_train,
        )
    }
}
