//! `generate`: the same as `qvc generate`.
fn main() -> std::process::ExitCode {
    qvc::cli::main_with(Some("generate"))
}
