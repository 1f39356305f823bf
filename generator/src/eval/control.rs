//! Does the text say what was asked? For an E2E (field, value) target, whether a text realises it,
//! by normalised word match (the tokenizer's words, lowercased) against the value's usual phrases in
//! `paraphrases.json`, which the guide trainer also reads to label its training texts.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Deserialize;

use crate::text::tokenizer::words;

#[derive(Deserialize)]
struct Paraphrases {
    /// field -> value -> phrases that say it.
    phrases: HashMap<String, HashMap<String, Vec<String>>>,
    /// field -> value -> the value whose realisation cancels it ("not family friendly" is not "yes").
    unless: HashMap<String, HashMap<String, String>>,
}

static PARAPHRASES: LazyLock<Paraphrases> = LazyLock::new(|| {
    serde_json::from_str(include_str!("paraphrases.json")).expect("paraphrases.json is valid")
});

fn contains_seq(hay: &[String], needle: &[String]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `text` realises `field = value`.
pub fn realises(text: &str, field: &str, value: &str) -> bool {
    realises_words(&words(text), field, value)
}

fn realises_words(text: &[String], field: &str, value: &str) -> bool {
    let table = &*PARAPHRASES;
    let said = match table
        .phrases
        .get(field)
        .and_then(|values| values.get(value))
    {
        Some(phrases) => phrases.iter().any(|p| contains_seq(text, &words(p))),
        None => contains_seq(text, &words(value)),
    };
    let cancelled = || {
        table
            .unless
            .get(field)
            .and_then(|values| values.get(value))
            .is_some_and(|other| realises_words(text, field, other))
    };
    said && !cancelled()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_values_and_paraphrases() {
        assert!(realises(
            "The Eagle serves Italian food.",
            "food",
            "Italian"
        ));
        assert!(!realises(
            "The Eagle serves Indian food.",
            "food",
            "Italian"
        ));
        assert!(realises(
            "prices less than £20",
            "priceRange",
            "less than £20"
        ));
        assert!(realises("It is kid friendly.", "familyFriendly", "yes"));
        assert!(realises(
            "It is not family friendly.",
            "familyFriendly",
            "no"
        ));
        assert!(!realises(
            "It is not family friendly.",
            "familyFriendly",
            "yes"
        ));
        assert!(realises("in the city centre", "area", "city centre"));
        assert!(realises(
            "rated 5 out of 5",
            "customer rating",
            "5 out of 5"
        ));
    }

    /// How E2E references commonly say values: hyphenated (the tokenizer splits "family-friendly"
    /// into three words), prices without the £, star ratings; and what they must not be taken for.
    #[test]
    fn matches_the_common_e2e_phrasings() {
        for (text, field, value, says) in [
            (
                "aromi is a family-friendly restaurant",
                "familyFriendly",
                "yes",
                true,
            ),
            ("it is kids friendly .", "familyFriendly", "yes", true),
            (
                "it is not children friendly .",
                "familyFriendly",
                "no",
                true,
            ),
            (
                "prices are less than 20 pounds",
                "priceRange",
                "less than £20",
                true,
            ),
            ("a price range of 20-25", "priceRange", "£20-25", true),
            ("from £20 to £25", "priceRange", "£20-25", true),
            ("is a high-priced pub", "priceRange", "high", true),
            (
                "its customer rating is average",
                "customer rating",
                "average",
                true,
            ),
            ("a 5 star restaurant", "customer rating", "5 out of 5", true),
            ("serves british food", "food", "English", true),
            ("by the river", "area", "riverside", true),
            ("it is not kids friendly .", "familyFriendly", "yes", false),
            (
                "it is a non-family-friendly pub",
                "familyFriendly",
                "yes",
                false,
            ),
            (
                "prices are more than 30 pounds",
                "priceRange",
                "less than £20",
                false,
            ),
            (
                "a 1 star restaurant",
                "customer rating",
                "5 out of 5",
                false,
            ),
            (
                "rating of 1 out of 5",
                "customer rating",
                "5 out of 5",
                false,
            ),
        ] {
            assert_eq!(
                realises(text, field, value),
                says,
                "{text:?} says {field}={value}: expected {says}"
            );
        }
    }
}
