//! The `livegate` binary: everything lives in the library; see `cli`. It owns one choice
//! the library must not make for its users: the process's memory allocator.
//!
//! mimalloc rather than glibc's malloc: `perf` of the gateway in a sustained rush put
//! a quarter of its CPU in glibc's `_int_malloc`, `_int_free`, `unlink_chunk`,
//! `malloc_consolidate` and `realloc` (frames, JSON values, Redis commands and replies are
//! short-lived allocations made on one worker thread and often freed on another); the
//! figures are in docs/benchmarks.md ("Allocator").

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    livegate::cli::main()
}
