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
    /// into three words), prices without the £, star ratings.
    #[test]
    fn matches_the_common_e2e_phrasings() {
        for (text, field, value) in [
            (
                "aromi is a family-friendly restaurant",
                "familyFriendly",
                "yes",
            ),
            ("it is kids friendly .", "familyFriendly", "yes"),
            ("it is not children friendly .", "familyFriendly", "no"),
            (
                "prices are less than 20 pounds",
                "priceRange",
                "less than £20",
            ),
            ("a price range of 20-25", "priceRange", "£20-25"),
            ("from £20 to £25", "priceRange", "£20-25"),
            ("is a high-priced pub", "priceRange", "high"),
            (
                "its customer rating is average",
                "customer rating",
                "average",
            ),
            ("a 5 star restaurant", "customer rating", "5 out of 5"),
            ("serves british food", "food", "English"),
            ("by the river", "area", "riverside"),
        ] {
            assert!(
                realises(text, field, value),
                "{text:?} should say {field}={value}"
            );
        }
        for (text, field, value) in [
            ("it is not kids friendly .", "familyFriendly", "yes"),
            ("it is a non-family-friendly pub", "familyFriendly", "yes"),
            (
                "prices are more than 30 pounds",
                "priceRange",
                "less than £20",
            ),
            ("a 1 star restaurant", "customer rating", "5 out of 5"),
            ("rating of 1 out of 5", "customer rating", "5 out of 5"),
        ] {
            assert!(
                !realises(text, field, value),
                "{text:?} should not say {field}={value}"
            );
        }
    }
}
