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
    /// E2E's restaurant names: their words say nothing of the other fields.
    restaurant_names: Vec<String>,
}

static PARAPHRASES: LazyLock<Paraphrases> = LazyLock::new(|| {
    serde_json::from_str(include_str!("paraphrases.json")).expect("paraphrases.json is valid")
});

fn contains_seq(hay: &[String], needle: &[String]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `text` realises `field = value`.
pub fn realises(text: &str, field: &str, value: &str) -> bool {
    SaidText::new(text).realises(field, value)
}

/// A text read once for any number of fields: its words as written (what `name` and `near` match)
/// and with the restaurant names blanked (what the other fields match).
pub struct SaidText {
    words: Vec<String>,
    outside_names: Vec<String>,
}

impl SaidText {
    pub fn new(text: &str) -> Self {
        let words = words(text);
        let outside_names = without_restaurant_names(&words);
        Self {
            words,
            outside_names,
        }
    }

    /// Whether the text realises `field = value`.
    pub fn realises(&self, field: &str, value: &str) -> bool {
        let words = if field == "name" || field == "near" {
            &self.words
        } else {
            &self.outside_names
        };
        says(words, field, value)
    }

    /// Whether the text realises every pair of `target`.
    pub fn realises_all(&self, target: &[(String, String)]) -> bool {
        target.iter().all(|(f, v)| self.realises(f, v))
    }
}

/// `text` with each restaurant name's words blanked ("near raja indian cuisine" does not say food =
/// Indian), for matching the fields other than `name` and `near`.
fn without_restaurant_names(text: &[String]) -> Vec<String> {
    static NAMES: LazyLock<Vec<Vec<String>>> = LazyLock::new(|| {
        PARAPHRASES
            .restaurant_names
            .iter()
            .map(|n| words(n))
            .collect()
    });
    let mut out = text.to_vec();
    for name in NAMES.iter() {
        for (start, window) in text.windows(name.len()).enumerate() {
            if window == name.as_slice() {
                out[start..start + name.len()].fill(String::new());
            }
        }
    }
    out
}

/// Whether `text` says one of the phrases of `field = value` and not its cancelling value's.
fn says(text: &[String], field: &str, value: &str) -> bool {
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
            .is_some_and(|other| says(text, field, other))
    };
    said && !cancelled()
}

/// The E2E fields a guide steers (all of an MR's attributes).
pub const FIELDS: [&str; 8] = [
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
];

/// How many of an MR's fields one target asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldCount {
    /// K fields drawn from one MR (MRs with fewer are skipped).
    Some(usize),
    /// The whole MR (3–8 fields in E2E).
    All,
}

impl std::str::FromStr for FieldCount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(FieldCount::All),
            k => match k.parse::<usize>() {
                Ok(k) if (1..=FIELDS.len()).contains(&k) => Ok(FieldCount::Some(k)),
                _ => Err(format!("`{k}`: a number of fields 1..=8, or `all`")),
            },
        }
    }
}

/// How long eval-control asks each text to be (the request's `length`, guided and unguided alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLength {
    /// The model decides.
    Free,
    /// This many words.
    Words(usize),
    /// As long as E2E's own texts that say as many fields: the median length of the train
    /// references whose MR has that many fields ([`median_lengths`]). A whole MR of 7–8 fields
    /// takes 30–33 words there, half again the model's usual length.
    Auto,
}

/// As a table's footer names it.
impl std::fmt::Display for TextLength {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TextLength::Free => write!(f, "free length"),
            TextLength::Words(k) => write!(f, "{k} words"),
            TextLength::Auto => write!(f, "length auto (E2E's median for as many fields)"),
        }
    }
}

impl std::str::FromStr for TextLength {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "free" => Ok(TextLength::Free),
            "auto" => Ok(TextLength::Auto),
            k => match k.parse::<usize>() {
                Ok(k) if k > 0 => Ok(TextLength::Words(k)),
                _ => Err(format!("`{k}`: a number of words, `free` or `auto`")),
            },
        }
    }
}

/// Number of MR fields → the median length in words of the references with that many.
pub fn median_lengths(records: &[crate::text::e2e::E2eRecord]) -> HashMap<usize, usize> {
    let mut by_fields: HashMap<usize, Vec<usize>> = HashMap::new();
    for r in records {
        if let Some(text) = &r.text {
            by_fields
                .entry(r.mr.0.len())
                .or_default()
                .push(words(text).len());
        }
    }
    by_fields
        .into_iter()
        .map(|(k, mut lengths)| {
            lengths.sort_unstable();
            (k, lengths[lengths.len() / 2])
        })
        .collect()
}

/// A target: (field, value) pairs from one meaning representation.
pub type Target = Vec<(String, String)>;

/// `count` targets from `mrs` (E2E test MRs), each `fields` of one MR, drawn with `rng`, with the
/// index of the MR each came from (its references are the human texts for it). With
/// `FieldCount::Some(1)` and no `name` (the single-field protocol of the README's control table)
/// it is the earlier draw: one of the MR's fields other than `name`.
pub fn draw_targets(
    mrs: &[crate::text::e2e::MeaningRepresentation],
    fields: FieldCount,
    count: usize,
    rng: &mut impl rand::Rng,
) -> Vec<(usize, Target)> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let drawn = rng.random_range(0..mrs.len());
        let mr = &mrs[drawn];
        let present: Vec<&(String, String)> =
            mr.0.iter()
                .filter(|(f, _)| FIELDS.contains(&f.as_str()))
                .collect();
        let target: Target = match fields {
            FieldCount::Some(1) => {
                let (f, v) = &mr.0[rng.random_range(0..mr.0.len())];
                if f == "name" || !FIELDS.contains(&f.as_str()) {
                    continue;
                }
                vec![(f.clone(), v.clone())]
            }
            FieldCount::Some(k) => {
                if present.len() < k {
                    continue;
                }
                let mut picked = rand::seq::index::sample(rng, present.len(), k).into_vec();
                picked.sort_unstable();
                picked.iter().map(|&i| present[i].clone()).collect()
            }
            FieldCount::All => present.into_iter().cloned().collect(),
        };
        out.push((drawn, target));
    }
    out
}

/// Per field: (texts whose target has it, of which realise it); over all: texts realising their
/// whole target, of all texts.
pub struct ControlRates {
    pub per_field: Vec<(String, usize, usize)>,
    pub all_realised: usize,
    pub texts: usize,
}

pub fn rates(results: &[(Target, Vec<String>)]) -> ControlRates {
    let mut per_field: Vec<(String, usize, usize)> =
        FIELDS.iter().map(|f| (f.to_string(), 0, 0)).collect();
    let (mut all_realised, mut texts) = (0, 0);
    for (target, outs) in results {
        for t in outs {
            let said = SaidText::new(t);
            texts += 1;
            let mut all = true;
            for (f, v) in target {
                let ok = said.realises(f, v);
                all &= ok;
                if let Some(row) = per_field.iter_mut().find(|r| r.0 == *f) {
                    row.1 += 1;
                    row.2 += ok as usize;
                }
            }
            all_realised += all as usize;
        }
    }
    per_field.retain(|r| r.1 > 0);
    ControlRates {
        per_field,
        all_realised,
        texts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restaurant_names_words_say_no_other_field() {
        let text = "The Vaults is a pub near Raja Indian Cuisine.";
        assert!(realises(text, "near", "Raja Indian Cuisine"));
        assert!(!realises(text, "food", "Indian"));
        assert!(realises(
            "Near Raja Indian Cuisine, it serves Indian food.",
            "food",
            "Indian"
        ));
        // Half a name is not the name, and its words are free again.
        assert!(!realises(
            "near raja indian food",
            "near",
            "Raja Indian Cuisine"
        ));
        assert!(realises("near raja indian food", "food", "Indian"));
    }

    #[test]
    fn targets_take_k_fields_of_one_mr_and_all_means_the_whole_mr() {
        use crate::text::e2e::MeaningRepresentation;
        use rand::SeedableRng;
        let mr = |pairs: &[(&str, &str)]| {
            MeaningRepresentation(
                pairs
                    .iter()
                    .map(|(f, v)| (f.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let mrs = vec![
            mr(&[("name", "The Eagle"), ("food", "Italian")]),
            mr(&[
                ("name", "Aromi"),
                ("eatType", "pub"),
                ("area", "riverside"),
                ("near", "Café Sicilia"),
            ]),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (i, t) in draw_targets(&mrs, FieldCount::Some(3), 20, &mut rng) {
            assert_eq!((i, t.len()), (1, 3));
            assert!(t.iter().all(|p| mrs[1].0.contains(p)), "{t:?}");
        }
        for (i, t) in draw_targets(&mrs, FieldCount::All, 20, &mut rng) {
            assert_eq!(t, mrs[i].0);
        }
        for (i, t) in draw_targets(&mrs, FieldCount::Some(1), 20, &mut rng) {
            assert!(t.len() == 1 && t[0].0 != "name" && mrs[i].0.contains(&t[0]));
        }
        let results = vec![(
            vec![
                ("food".to_string(), "Italian".to_string()),
                ("area".to_string(), "riverside".to_string()),
            ],
            vec![
                "an italian place by the river".to_string(),
                "an italian place".to_string(),
            ],
        )];
        let r = rates(&results);
        assert_eq!((r.all_realised, r.texts), (1, 2));
        assert_eq!(
            r.per_field,
            vec![("food".into(), 2, 2), ("area".into(), 2, 1)]
        );
        assert!(SaidText::new("an italian place by the river").realises_all(&results[0].0));
        assert_eq!("all".parse::<FieldCount>(), Ok(FieldCount::All));
        assert!("9".parse::<FieldCount>().is_err());
    }

    #[test]
    fn auto_length_is_the_median_of_references_with_as_many_fields() {
        use crate::text::e2e::{E2eRecord, MeaningRepresentation};
        let record = |fields: usize, text: &str| E2eRecord {
            mr: MeaningRepresentation(vec![("food".into(), "Italian".into()); fields]),
            text: Some(text.into()),
        };
        let records = vec![
            record(3, "a b c"),
            record(3, "a b c d e"),
            record(3, "a b c d e f g"),
            record(5, "one , two ."),
        ];
        let medians = median_lengths(&records);
        assert_eq!(medians.get(&3), Some(&5));
        assert_eq!(medians.get(&5), Some(&4), "punctuation counts as words");
        assert_eq!(medians.get(&4), None);
        assert_eq!("auto".parse::<TextLength>(), Ok(TextLength::Auto));
        assert_eq!("free".parse::<TextLength>(), Ok(TextLength::Free));
        assert_eq!("30".parse::<TextLength>(), Ok(TextLength::Words(30)));
        assert!("0".parse::<TextLength>().is_err());
        assert!("long".parse::<TextLength>().is_err());
    }

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
