//! Command line: clap derive, every flag also from the environment.

pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
