//! Handing freed heap memory back to the system.
//!
//! glibc keeps freed small allocations in its heap, resident until something reuses
//! them. Loading a model frees a great many (a large tokenizer's merge list is some
//! hundred MiB of short-lived strings) while the weights are still being repacked into
//! large allocations that never reuse that space, so the resident size stays that much
//! above what the engine holds. Trimming returns those pages.

/// Returns the heap's free pages to the system where the allocator can (glibc);
/// elsewhere nothing.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free; it takes
    // the allocator's own locks and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
