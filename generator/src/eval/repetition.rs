//! Stutter: a word repeated back to back ("italian italian") or a bigram repeated back to back
//! ("is a is a"), the failure guidance makes most. Human E2E references have it in about 0.5% of
//! texts. Counted on the tokenizer's words, punctuation included, lowercased.

use crate::text::tokenizer::words;

/// Whether `text` has an immediately repeated word or bigram.
pub fn stutters(text: &str) -> bool {
    let w = words(text);
    let repeated_word = w.windows(2).any(|p| p[0] == p[1]);
    let repeated_bigram = w.windows(4).any(|q| q[0] == q[2] && q[1] == q[3]);
    repeated_word || repeated_bigram
}

/// Share of `texts` that stutter.
pub fn repetition_rate(texts: &[String]) -> f64 {
    texts.iter().filter(|t| stutters(t)).count() as f64 / texts.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_stutters_guidance_makes() {
        for text in [
            "the olive grove serves italian italian food in the riverside .",
            "the rice boat is near express by holiday inn . it has has a average customer rating",
            "the golden curry is a riverside that offers fast food cheap cheap cheap .",
            "the wrestlers is a coffee coffee shop that is located in the city centre .",
            "it is not not family friendly .",
            "the mill is a is a pub near the river .",
            "Italian ITALIAN food.",
        ] {
            assert!(stutters(text), "{text}");
        }
        for text in [
            "the olive grove serves italian food in the riverside area .",
            "the mill is a pub . the mill is near the river .",
            "a pub near a pub",
            "",
        ] {
            assert!(!stutters(text), "{text}");
        }
        let texts = vec![
            "a a".to_string(),
            "a b".into(),
            "a b a b".into(),
            "b".into(),
        ];
        assert_eq!(repetition_rate(&texts), 0.5);
    }
}
