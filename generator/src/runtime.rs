//! Process-wide settings that must be made before candle starts its thread pool.

/// Allocator settings measured to help candle on this CPU (FINDINGS: ~30% of a train step went to
/// page faults from large temporaries being mapped and unmapped on every op).
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    unsafe {
        // Keep big buffers on the heap and do not give freed memory back to the OS at once.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Bound candle's worker pool (and gemm's threads). Must run before the first tensor op.
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads.filter(|&n| n > 0) {
        // SAFETY: called at start-up, before any other thread exists.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
}
