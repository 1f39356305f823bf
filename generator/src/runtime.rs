//! Process-wide settings that must be made before candle starts its thread pool.

/// Allocator settings measured to help candle on this CPU (FINDINGS: ~30% of a train step went to
/// page faults from large temporaries being mapped and unmapped on every op).
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    unsafe {
        // Keep big buffers on the heap and do not give freed memory back to the OS at once.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // One arena: the sharding threads of each step are new threads, and per-thread arenas
        // grew and shrank with mprotect on every step (measured: sys time above user time).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of worker threads (default: all cores). The work is sharded over sequences
/// ([`crate::parallel`]), and candle's own pool is pinned to one thread so that shards do not
/// contend for it (FINDINGS: a spinning 2-thread pool loses to 1 thread on a busy machine).
/// Must run before the first tensor op.
pub fn set_threads(threads: Option<usize>) {
    let n = threads.filter(|&n| n > 0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    THREADS.store(n, Ordering::Relaxed);
    // SAFETY: called at start-up, before any other thread exists.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

/// Worker threads for sharded work (all cores unless [`set_threads`] said otherwise).
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    }
}
