//! Fluency as perplexity under a word n-gram language model with interpolated Kneser-Ney
//! smoothing (Chen & Goodman 1998), fitted on the E2E train references and tokenized as the
//! model's tokenizer does. Samples are compared with human references by the ratio of perplexities.
//!
//! P(w | h) = max(c(h w) − D, 0) / c(h) + D · N1+(h •) / c(h) · P(w | h′)
//!
//! with raw counts at the highest order, continuation counts N1+(• h w) below it, one discount per
//! order D = n1 / (n1 + 2 n2), and a uniform distribution over the vocabulary plus one unknown word
//! under the unigrams.

use std::collections::HashMap;

use crate::text::tokenizer::words;

const BOS: u32 = 0;
const EOS: u32 = 1;
const UNKNOWN: u32 = 2;

#[derive(Default)]
struct Order {
    /// count of each n-gram (raw at the top order, continuation counts below)
    counts: HashMap<Vec<u32>, u64>,
    /// per context: (sum of counts, number of distinct following words)
    contexts: HashMap<Vec<u32>, (u64, u64)>,
    discount: f64,
}

pub struct KneserNey {
    order: usize,
    vocab: HashMap<String, u32>,
    orders: Vec<Order>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    pub sentences: usize,
    /// Scored tokens, sentence ends included.
    pub tokens: usize,
    /// Words never seen in the training text.
    pub unknown: usize,
}

impl KneserNey {
    /// Fits an `order`-gram model on `texts`.
    pub fn fit<'a>(texts: impl Iterator<Item = &'a str>, order: usize) -> Self {
        assert!(order >= 1, "order must be at least 1");
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let mut top: HashMap<Vec<u32>, u64> = HashMap::new();
        for text in texts {
            let mut ids = vec![BOS; order - 1];
            for w in words(text) {
                let next = vocab.len() as u32 + 3;
                ids.push(*vocab.entry(w).or_insert(next));
            }
            ids.push(EOS);
            for end in order - 1..ids.len() {
                *top.entry(ids[end + 1 - order..=end].to_vec()).or_default() += 1;
            }
        }
        let mut orders: Vec<Order> = (0..order).map(|_| Order::default()).collect();
        orders[order - 1].counts = top;
        // Continuation counts: N1+(• g), the number of distinct words seen before each lower-order
        // gram g. (Sentence-start padding counts as a word, so grams at the start are covered too.)
        for n in (1..order).rev() {
            let mut lower: HashMap<Vec<u32>, u64> = HashMap::new();
            for gram in orders[n].counts.keys() {
                *lower.entry(gram[1..].to_vec()).or_default() += 1;
            }
            orders[n - 1].counts = lower;
        }
        for o in orders.iter_mut() {
            let (mut n1, mut n2) = (0f64, 0f64);
            for (gram, &c) in &o.counts {
                let entry = o
                    .contexts
                    .entry(gram[..gram.len() - 1].to_vec())
                    .or_default();
                entry.0 += c;
                entry.1 += 1;
                match c {
                    1 => n1 += 1.0,
                    2 => n2 += 1.0,
                    _ => {}
                }
            }
            o.discount = if n1 + n2 > 0.0 {
                n1 / (n1 + 2.0 * n2)
            } else {
                0.5
            };
        }
        Self {
            order,
            vocab,
            orders,
        }
    }

    fn id(&self, word: &str) -> u32 {
        self.vocab.get(word).copied().unwrap_or(UNKNOWN)
    }

    /// P(w | context), context of any length (the last order−1 words are used).
    fn prob(&self, context: &[u32], w: u32) -> f64 {
        // Uniform base over the known words, sentence end and one unknown word.
        let mut p = 1.0 / (self.vocab.len() + 2) as f64;
        for n in 1..=self.order {
            if context.len() < n - 1 {
                break;
            }
            let h = &context[context.len() - (n - 1)..];
            let o = &self.orders[n - 1];
            let Some(&(total, distinct)) = o.contexts.get(h) else {
                break; // unseen context: the lower order stands alone
            };
            let mut gram = h.to_vec();
            gram.push(w);
            let c = o.counts.get(&gram).copied().unwrap_or(0) as f64;
            let total = total as f64;
            p = (c - o.discount).max(0.0) / total + o.discount * distinct as f64 / total * p;
        }
        p
    }

    /// Perplexity of `texts`, each a sentence scored with its end.
    pub fn perplexity<'a>(&self, texts: impl Iterator<Item = &'a str>) -> Perplexity {
        let (mut log_sum, mut tokens, mut unknown, mut sentences) = (0f64, 0usize, 0usize, 0usize);
        for text in texts {
            sentences += 1;
            let mut ids = vec![BOS; self.order - 1];
            for w in words(text) {
                let id = self.id(&w);
                unknown += (id == UNKNOWN) as usize;
                ids.push(id);
            }
            ids.push(EOS);
            for end in self.order - 1..ids.len() {
                log_sum += self.prob(&ids[..end], ids[end]).ln();
                tokens += 1;
            }
        }
        Perplexity {
            perplexity: (-log_sum / tokens.max(1) as f64).exp(),
            sentences,
            tokens,
            unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<&'static str> {
        vec![
            "the eagle is a pub in the city centre .",
            "the eagle is a coffee shop near the river .",
            "the mill is a pub near the river .",
            "a pub in the city centre is the mill .",
        ]
    }

    #[test]
    fn distributions_sum_to_one() {
        let lm = KneserNey::fit(corpus().into_iter(), 4);
        let mut all: Vec<u32> = lm.vocab.values().copied().collect();
        all.extend([EOS, UNKNOWN]);
        for context in [
            vec![BOS, BOS, BOS],
            vec![BOS, BOS, lm.id("the")],
            vec![lm.id("is"), lm.id("a"), lm.id("pub")],
            vec![lm.id("river"), lm.id("pub"), lm.id("eagle")],
        ] {
            let total: f64 = all.iter().map(|&w| lm.prob(&context, w)).sum();
            assert!((total - 1.0).abs() < 1e-9, "{context:?}: {total}");
        }
    }

    #[test]
    fn fluent_text_beats_word_salad() {
        let lm = KneserNey::fit(corpus().into_iter(), 4);
        let fluent = lm.perplexity(["the eagle is a pub near the river ."].into_iter());
        let salad = lm.perplexity(["river the pub . near eagle a the is"].into_iter());
        assert!(
            fluent.perplexity * 3.0 < salad.perplexity,
            "{fluent:?} vs {salad:?}"
        );
        let unseen = lm.perplexity(["the zebra is a pub ."].into_iter());
        assert_eq!(unseen.unknown, 1);
        assert!(unseen.perplexity.is_finite());
    }
}
