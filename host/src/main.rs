//! The `framehost` command. Everything it does lives in the library; see `cli`.

// jemalloc hands freed pages back to the kernel on a timer (dirty/muzzy decay) instead of
// keeping them in per-thread arenas, as glibc's malloc does with the multi-megabyte buffers
// that grew the Python worker. The RSS benchmark in BENCHMARKS.md checks the result.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    framehost::cli::main()
}
