//! The clamping trick as one choice per sequence rather than one per position.
//!
//! The plain clamp snaps every position of the x0 estimate to its nearest word on its own. While the
//! model is still undecided which of two neighbouring positions holds a word ("located" at i or at
//! i+1), both estimates lie nearest to it, both snap to it, and the next step sees the word twice and
//! keeps it: that is where unguided stutter comes from (models/README: every text has a doubled word
//! at the first steps, and the ones left lock in between t ≈ 1260 and 600). The joint clamp chooses
//! the words of a sequence together, among each position's few nearest words, minimising the summed
//! squared distance plus `repeat_penalty` for every pair of neighbours holding the same word: a
//! neighbour takes its next-nearest word when that is at most `repeat_penalty` farther than its
//! nearest. Word embeddings lie about 12 apart (squared L2, median nearest pair of e2e-deep): a
//! penalty of a few units parts only estimates that sit between two words; the default, far past
//! the spacing, parts every pair, also the ones guidance pushes onto one word (README, Text
//! quality, has both measured). The sampler skips it on the last step: the text is rounded from
//! the model's own final estimate, so a doubled word in the output is one the model wrote there.

use candle_core::Tensor;

use crate::model::diffusion_lm::distances_to_rows;
use crate::text::tokenizer::SPECIAL_TOKENS;
use crate::{Error, Result};

/// Nearest words considered per position: enough for a run of three equal neighbours to part.
const CANDIDATES: usize = 4;

/// The largest `repeat_penalty` a request may ask: far past the spacing of the words, i.e. never
/// two equal words side by side in an intermediate estimate.
pub const MAX_REPEAT_PENALTY: f32 = 1000.0;

/// The default `repeat_penalty`: neighbours never share a word in an intermediate estimate (README,
/// Text quality: against 6 and 12, less stutter guided and unguided at the same control and fluency).
pub const DEFAULT_REPEAT_PENALTY: f32 = MAX_REPEAT_PENALTY;

/// How one sequence of the batch is snapped this step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowClamp {
    /// Snap at all (false: the row passes through unchanged).
    pub clamp: bool,
    /// Added for each pair of neighbours on the same word (0: the plain, independent clamp).
    /// PAD, UNK, START and END repeat freely (a canvas ends in a run of PAD).
    pub repeat_penalty: f32,
    /// Positions 1..words_until must be words, not PAD/UNK/START/END (a fixed length; 0: none).
    pub words_until: usize,
}

/// A request's `repeat_penalty`, checked; `field` names it in the error.
pub fn repeat_penalty(field: &'static str, value: Option<f32>) -> Result<f32> {
    let value = value.unwrap_or(DEFAULT_REPEAT_PENALTY);
    if !(value.is_finite() && (0.0..=MAX_REPEAT_PENALTY).contains(&value)) {
        return Err(Error::invalid(
            field,
            format!("must be in [0, {MAX_REPEAT_PENALTY}], got {value}"),
        ));
    }
    Ok(value)
}

/// Snaps x0 [B, L, D] to rows of `table` [V, D], one sequence at a time (see the module doc).
pub fn snap_jointly(x0: &Tensor, table: &Tensor, rows: &[RowClamp]) -> Result<Tensor> {
    let (b, l, d) = x0.dims3()?;
    if rows.len() != b {
        return Err(Error::Internal(format!(
            "snap_jointly: {} row settings for a batch of {b}",
            rows.len()
        )));
    }
    // Every path takes one word per position, so the ‖x‖² these distances leave out changes no
    // path's rank.
    let distances = distances_to_rows(x0, table)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let v = table.dim(0)?;
    let mut ids = Vec::with_capacity(b * l);
    for (row, setting) in distances.chunks_exact(l * v).zip(rows) {
        ids.extend(choose_words(row, v, setting));
    }
    let ids = Tensor::from_vec(ids, b * l, x0.device())?;
    let snapped = table.index_select(&ids, 0)?.reshape((b, l, d))?;
    // Rows that do not clamp keep their estimate.
    if rows.iter().all(|r| r.clamp) {
        return Ok(snapped);
    }
    let keep: Vec<f32> = rows.iter().map(|r| r.clamp as u8 as f32).collect();
    let keep = Tensor::from_vec(keep, (b, 1, 1), x0.device())?;
    Ok(x0.add(&snapped.sub(x0)?.broadcast_mul(&keep)?)?)
}

/// One sequence's words: Viterbi over each position's nearest candidates, minimising the summed
/// distances plus the penalty of every equal (non-special) pair of neighbours.
fn choose_words(distances: &[f32], v: usize, setting: &RowClamp) -> Vec<u32> {
    let specials = SPECIAL_TOKENS.len() as u32;
    let candidates: Vec<Vec<(u32, f32)>> = distances
        .chunks_exact(v)
        .enumerate()
        .map(|(pos, dist)| {
            let words_only = pos > 0 && pos < setting.words_until;
            nearest(dist, if words_only { specials } else { 0 })
        })
        .collect();
    let Some(first) = candidates.first() else {
        return Vec::new();
    };
    let mut cost: Vec<f32> = first.iter().map(|c| c.1).collect();
    let mut back: Vec<Vec<usize>> = Vec::with_capacity(candidates.len());
    back.push(vec![0; cost.len()]);
    for pair in candidates.windows(2) {
        let (before, here) = (&pair[0], &pair[1]);
        let mut next = Vec::with_capacity(here.len());
        let mut from = Vec::with_capacity(here.len());
        for &(word, dist) in here {
            let (best, arg) = before
                .iter()
                .zip(&cost)
                .enumerate()
                .map(|(i, (&(prev, _), &c))| {
                    let repeat = prev == word && word >= specials;
                    (c + if repeat { setting.repeat_penalty } else { 0.0 }, i)
                })
                .fold((f32::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a });
            next.push(best + dist);
            from.push(arg);
        }
        cost = next;
        back.push(from);
    }
    // The cheapest end, first on ties (candidates are sorted: the plain clamp's choice wins ties).
    let mut at = (0..cost.len()).fold(0, |a, i| if cost[i] < cost[a] { i } else { a });
    let mut words = vec![0u32; candidates.len()];
    for pos in (0..candidates.len()).rev() {
        words[pos] = candidates[pos][at].0;
        at = back[pos][at];
    }
    words
}

/// The `CANDIDATES` nearest ids ≥ `lowest` by distance, nearest first (lower id first on ties):
/// one pass, most words failing the first comparison.
fn nearest(dist: &[f32], lowest: u32) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(CANDIDATES + 1);
    for (i, &d) in dist.iter().enumerate().skip(lowest as usize) {
        if best.len() == CANDIDATES && d >= best[CANDIDATES - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, e)| e <= d);
        best.insert(at, (i as u32, d));
        best.truncate(CANDIDATES);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Six words on a line, 4 apart (squared distance 16 between neighbours): ids 0–3 special.
    fn table() -> Tensor {
        let rows: Vec<f32> = (0..6).flat_map(|i| [4.0 * i as f32, 0.0]).collect();
        Tensor::from_vec(rows, (6, 2), &Device::Cpu).unwrap()
    }

    fn snap(points: &[f32], setting: RowClamp) -> Vec<u32> {
        let x = Tensor::from_vec(points.to_vec(), (1, points.len() / 2, 2), &Device::Cpu).unwrap();
        let out = snap_jointly(&x, &table(), &[setting]).unwrap();
        out.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .chunks(2)
            .map(|p| (p[0] / 4.0).round() as u32)
            .collect()
    }

    const PLAIN: RowClamp = RowClamp {
        clamp: true,
        repeat_penalty: 0.0,
        words_until: 0,
    };

    #[test]
    fn without_a_penalty_every_position_takes_its_nearest_word() {
        // Two estimates nearest word 4; one between 4 and 5 but nearer 4.
        assert_eq!(snap(&[16.0, 0.0, 17.5, 0.0], PLAIN), vec![4, 4]);
    }

    #[test]
    fn an_undecided_neighbour_parts_from_a_settled_one() {
        let setting = RowClamp {
            repeat_penalty: 6.0,
            ..PLAIN
        };
        // Position 1 sits 1.5 from word 4 and 2.5 from word 5 (squared: 2.25 and 6.25): parting
        // costs 4 < 6, so it takes word 5; the settled position 0 keeps word 4.
        assert_eq!(snap(&[16.0, 0.0, 17.5, 0.0], setting), vec![4, 5]);
        // Both settled on word 4: parting would cost 16 − 0 > 6, so the model's repeat stands.
        assert_eq!(snap(&[16.0, 0.0, 16.0, 0.0], setting), vec![4, 4]);
    }

    #[test]
    fn by_default_neighbours_never_share_a_word() {
        let setting = RowClamp {
            repeat_penalty: DEFAULT_REPEAT_PENALTY,
            ..PLAIN
        };
        // Three estimates settled on word 4: parting costs 16 each, far below the default penalty.
        let words = snap(&[16.0, 0.0, 16.0, 0.0, 16.0, 0.0], setting);
        assert!(words.windows(2).all(|p| p[0] != p[1]), "{words:?}");
        assert_eq!(words.iter().filter(|&&w| w == 4).count(), 2, "{words:?}");
    }

    #[test]
    fn special_tokens_repeat_freely_and_fixed_lengths_snap_to_words() {
        let setting = RowClamp {
            repeat_penalty: MAX_REPEAT_PENALTY,
            ..PLAIN
        };
        // A run of PAD (id 0) is not a stutter.
        assert_eq!(
            snap(&[0.0, 0.0, 0.5, 0.0, 0.0, 0.0], setting),
            vec![0, 0, 0]
        );
        // Position 1 (of 1..2) must be a word: the nearest word to PAD's place is 4.
        let fixed = RowClamp {
            words_until: 2,
            ..PLAIN
        };
        assert_eq!(snap(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], fixed), vec![0, 4, 0]);
    }

    #[test]
    fn rows_that_do_not_clamp_pass_through() {
        let x = Tensor::from_vec(vec![17.0f32, 0.3], (1, 1, 2), &Device::Cpu).unwrap();
        let off = RowClamp {
            clamp: false,
            ..PLAIN
        };
        let out = snap_jointly(&x, &table(), &[off]).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![17.0, 0.3]
        );
    }

    #[test]
    fn a_penalty_outside_its_range_names_the_field() {
        for bad in [-1.0, f32::NAN, f32::INFINITY, MAX_REPEAT_PENALTY + 1.0] {
            let err = repeat_penalty("clamp_repeat_penalty", Some(bad)).unwrap_err();
            assert!(err.to_string().contains("clamp_repeat_penalty"), "{err}");
        }
        assert_eq!(repeat_penalty("f", None).unwrap(), DEFAULT_REPEAT_PENALTY);
        assert_eq!(repeat_penalty("f", Some(0.0)).unwrap(), 0.0);
    }
}
