//! The `livegate` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    livegate::cli::main()
}
