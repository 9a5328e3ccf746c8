fn main() -> std::process::ExitCode {
    qvc::cli::main_with(None)
}
