//! Batch sharding over OS threads. candle's CPU backend runs element-wise ops on one core, so the
//! project parallelises over sequences instead: each shard runs single-threaded tensor math on its
//! own thread (see `runtime::set_threads`).

use crate::{Error, Result};

/// Splits `batch` rows into at most `shards` contiguous (start, len) pieces of near-equal size.
pub fn split(batch: usize, shards: usize) -> Vec<(usize, usize)> {
    let shards = shards.clamp(1, batch.max(1));
    let per = batch.div_ceil(shards).max(1);
    (0..batch)
        .step_by(per)
        .map(|start| (start, per.min(batch - start)))
        .collect()
}

/// Runs `f` on every state, one scoped thread each (inline when there is only one).
pub fn run_sharded<S: Send, T: Send>(
    states: Vec<S>,
    f: impl Fn(S) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    if states.len() <= 1 {
        return states.into_iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .into_iter()
            .map(|s| scope.spawn(move || f(s)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a worker thread panicked".into())))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_batch_once() {
        assert_eq!(split(5, 2), vec![(0, 3), (3, 2)]);
        assert_eq!(split(1, 4), vec![(0, 1)]);
        assert_eq!(split(64, 2), vec![(0, 32), (32, 32)]);
        assert_eq!(split(7, 3), vec![(0, 3), (3, 3), (6, 1)]);
        let out = run_sharded(split(10, 3), |(s, l)| Ok(s + l)).unwrap();
        assert_eq!(out, vec![4, 8, 10]);
    }
}
