//! Does the text say what was asked? For an E2E (field, value) target, whether a text realises it,
//! by normalised word match (the tokenizer's words, lowercased), with the usual paraphrases of
//! familyFriendly.

use crate::text::tokenizer::words;

fn contains_seq(hay: &[String], needle: &[String]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `text` realises `field = value`.
pub fn realises(text: &str, field: &str, value: &str) -> bool {
    let t = words(text);
    let has = |phrase: &str| contains_seq(&t, &words(phrase));
    match field {
        "familyFriendly" => {
            let negated = [
                "not family",
                "not kid",
                "not child",
                "non family",
                "adults only",
                "no children",
                "not for families",
            ]
            .iter()
            .any(|p| has(p));
            let friendly = [
                "family friendly",
                "kid friendly",
                "child friendly",
                "children friendly",
                "families",
                "for kids",
                "for children",
            ]
            .iter()
            .any(|p| has(p));
            match value {
                "yes" => friendly && !negated,
                "no" => negated,
                _ => false,
            }
        }
        "priceRange" => match value {
            "cheap" => has("cheap") || has("inexpensive") || has("low price") || has("low cost"),
            "high" => {
                has("high price") || has("expensive") || has("high cost") || has("high priced")
            }
            "moderate" => has("moderate") || has("moderately") || has("average price"),
            v => has(v),
        },
        "customer rating" => match value {
            "high" => {
                has("high customer rating")
                    || has("highly rated")
                    || has("high rating")
                    || has("rated high")
            }
            "low" => {
                has("low customer rating")
                    || has("low rating")
                    || has("poorly rated")
                    || has("rated low")
            }
            "average" => {
                has("average customer rating") || has("average rating") || has("rated average")
            }
            v => has(v),
        },
        _ => has(value),
    }
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
}
