//! Handing freed heap memory back to the kernel.
//!
//! glibc's allocator keeps what the program frees for reuse and returns memory to the kernel
//! on its own only from the top of the heap. Start-up (reading the kernel's BTF to load the
//! eBPF programs, the configuration, certificates, task set-up) leaves free memory scattered
//! through the heap, which an idle agent would hold for nothing: about 1.6 of its 3 MiB of
//! anonymous memory in the benchmark (docs/benchmarks.md, change 7). `malloc_trim` gives the
//! free pages back (`madvise(MADV_DONTNEED)`) and keeps the heap's layout, so nothing is copied.
//!
//! The agent calls [`release_free_memory`] after control-plane work only (start-up, reloads,
//! a change in the tasks discovered from ECS, the periodic sweep of idle metric series):
//! trimming walks the allocator's free lists under its locks, which a busy data path should not
//! wait for on every request.

/// Returns the heap's free pages to the kernel (a no-op where the C library is not glibc).
pub fn release_free_memory() {
    // SAFETY: malloc_trim only inspects and releases the allocator's own free memory; it is
    // thread-safe (it takes each arena's lock), and 0 asks to keep no padding at the top.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}
