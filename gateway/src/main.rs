fn main() -> std::process::ExitCode {
    phr_gateway::cli::main()
}
