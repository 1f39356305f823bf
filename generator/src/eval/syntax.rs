//! The syntax controls' measure (as Diffusion-LM's): targets taken from E2E test references — a
//! reference's whole tag sequence, or one of its labelled constituents — and success read off the
//! generated text by the same labeller that made the guides' training labels
//! (guide/train/syntax_labels.py: Debian's Lingua::EN::Tagger and link grammar parser). The labeller
//! runs as a child process; only evaluation and training need it, never serving.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use rand::seq::SliceRandom;
use rand::Rng;
use serde::Deserialize;

use crate::{Error, Result};

/// One text's labels: a tag per word, its constituents (None: the parser could not link it).
#[derive(Debug, Clone, Deserialize)]
pub struct SyntaxLabels {
    pub words: Vec<String>,
    pub pos: Vec<String>,
    pub spans: Option<Vec<(usize, usize, String)>>,
}

impl SyntaxLabels {
    pub fn has_span(&self, span: &SpanTarget) -> bool {
        self.spans.as_ref().is_some_and(|s| {
            s.iter()
                .any(|(a, b, l)| *a == span.start && *b == span.end && *l == span.label)
        })
    }
}

/// The labeller: `python script --written-forms references`, one child process per call.
pub struct Labeller<'a> {
    /// The Python that runs it (the system one: it has the link grammar bindings).
    pub python: &'a Path,
    /// guide/train/syntax_labels.py.
    pub script: &'a Path,
    /// The cased E2E references its truecaser is fitted on (the train set's CSV).
    pub written_forms: &'a Path,
}

impl Labeller<'_> {
    /// Labels for `texts` (one per line, words space-separated as the generator writes them).
    pub fn label(&self, texts: &[String]) -> Result<Vec<SyntaxLabels>> {
        let failed = |e: std::io::Error| Error::Io {
            path: self.script.to_path_buf(),
            source: e,
        };
        let mut child = Command::new(self.python)
            .arg(self.script)
            .arg("--written-forms")
            .arg(self.written_forms)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(failed)?;
        let mut input = String::new();
        for t in texts {
            input.push_str(&t.replace('\n', " "));
            input.push('\n');
        }
        let mut stdin = child.stdin.take().expect("piped stdin");
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().map_err(failed)?;
        writer
            .join()
            .map_err(|_| Error::Internal("labeller input thread panicked".into()))?
            .map_err(failed)?;
        if !out.status.success() {
            // Its last words say what failed (a missing package, a missing references file).
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.trim().lines().last().unwrap_or("no message");
            return Err(Error::Internal(format!(
                "{} {} exited with {}: {last} (it needs Debian's python3-link-grammar and \
                 liblingua-en-tagger-perl, deploy/setup.sh --train, and the references {})",
                self.python.display(),
                self.script.display(),
                out.status,
                self.written_forms.display()
            )));
        }
        let labels: Vec<SyntaxLabels> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Internal(format!("labeller output: {e}")))?;
        if labels.len() != texts.len() {
            return Err(Error::Internal(format!(
                "labeller answered {} of {} texts",
                labels.len(),
                texts.len()
            )));
        }
        Ok(labels)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpanTarget {
    pub start: usize,
    pub end: usize,
    pub label: String,
}

/// A syntax target from one test reference: its tag sequence (POS), one constituent of it, and one
/// field of its MR that it says (for composition with a semantic control), with the reference's
/// length (the canvas of both the guided and the unguided text).
#[derive(Debug, Clone)]
pub struct SyntaxTarget {
    pub reference: String,
    pub length: usize,
    pub pos: Vec<String>,
    pub span: Option<SpanTarget>,
    pub field: Option<(String, String)>,
}

/// `count` targets from distinct labelled references that fit `max_words`, with one constituent of
/// at least two words each (references the parser could not link are skipped). `mrs[i]` is the
/// meaning representation of `references[i]`.
pub fn draw_targets(
    references: &[SyntaxLabels],
    mrs: &[&crate::text::MeaningRepresentation],
    max_words: usize,
    count: usize,
    rng: &mut impl Rng,
) -> Vec<SyntaxTarget> {
    let mut order: Vec<usize> = (0..references.len()).collect();
    order.shuffle(rng);
    let mut out = Vec::new();
    for i in order {
        let r = &references[i];
        if r.words.is_empty() || r.words.len() > max_words {
            continue;
        }
        let spans: Vec<&(usize, usize, String)> =
            r.spans.iter().flatten().filter(|(a, b, _)| b > a).collect();
        if spans.is_empty() {
            continue;
        }
        let (start, end, label) = spans[rng.random_range(0..spans.len())].clone();
        let text = r.words.join(" ");
        let reading = super::control::SaidText::new(&text);
        let said: Vec<&(String, String)> = mrs[i]
            .0
            .iter()
            .filter(|(f, v)| f != "name" && f != "near" && reading.realises(f, v))
            .collect();
        let field = (!said.is_empty()).then(|| said[rng.random_range(0..said.len())].clone());
        out.push(SyntaxTarget {
            reference: text,
            length: r.words.len(),
            pos: r.pos.clone(),
            span: Some(SpanTarget { start, end, label }),
            field,
        });
        if out.len() == count {
            break;
        }
    }
    out
}

/// Share of texts whose whole tag sequence is the target's, and share of words tagged as asked.
pub fn pos_rates(pairs: &[(&SyntaxTarget, &SyntaxLabels)]) -> (f64, f64) {
    let (mut exact, mut right, mut words) = (0usize, 0usize, 0usize);
    for (target, got) in pairs {
        exact += usize::from(got.pos == target.pos);
        right += target
            .pos
            .iter()
            .zip(&got.pos)
            .filter(|(a, b)| a == b)
            .count();
        words += target.pos.len();
    }
    (
        exact as f64 / pairs.len().max(1) as f64,
        right as f64 / words.max(1) as f64,
    )
}

/// Share of texts that contain their target's labelled span.
pub fn span_rate(pairs: &[(&SyntaxTarget, &SyntaxLabels)]) -> f64 {
    let ok = pairs
        .iter()
        .filter(|(t, got)| t.span.as_ref().is_some_and(|s| got.has_span(s)))
        .count();
    ok as f64 / pairs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pos: &[&str], spans: Option<Vec<(usize, usize, &str)>>) -> SyntaxLabels {
        SyntaxLabels {
            words: pos.iter().map(|_| "w".to_string()).collect(),
            pos: pos.iter().map(|s| s.to_string()).collect(),
            spans: spans.map(|v| {
                v.into_iter()
                    .map(|(a, b, l)| (a, b, l.to_string()))
                    .collect()
            }),
        }
    }

    #[test]
    fn rates_count_exact_sequences_words_and_labelled_spans() {
        let target = SyntaxTarget {
            reference: String::new(),
            length: 3,
            pos: vec!["DT".into(), "NN".into(), "VBZ".into()],
            span: Some(SpanTarget {
                start: 0,
                end: 1,
                label: "NP".into(),
            }),
            field: None,
        };
        let same = labels(&["DT", "NN", "VBZ"], Some(vec![(0, 1, "NP"), (0, 2, "S")]));
        let other = labels(&["DT", "JJ", "VBZ"], Some(vec![(0, 1, "VP")]));
        let unparsed = labels(&["DT", "NN", "VBZ"], None);
        let pairs = [(&target, &same), (&target, &other), (&target, &unparsed)];
        let (exact, per_word) = pos_rates(&pairs);
        assert!((exact - 2.0 / 3.0).abs() < 1e-9);
        assert!((per_word - 8.0 / 9.0).abs() < 1e-9);
        assert!((span_rate(&pairs) - 1.0 / 3.0).abs() < 1e-9);
    }
}
