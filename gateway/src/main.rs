// mimalloc instead of glibc's malloc: the request and pull paths allocate from many threads
// at once, where it measured 8–50 % faster (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    phr_gateway::cli::main()
}
