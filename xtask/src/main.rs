//! Developer and operator commands: `cargo xtask <command>`. No product logic here.

use clap::{Parser, Subcommand};

mod bench;
mod build_ebpf;
mod demo;
mod install;
mod packages;
mod soak;
mod test;

#[derive(Parser)]
#[command(name = "xtask", about = "weft's build, test, demo and bench commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installs nightly rust-src and bpf-linker when missing).
    BuildEbpf(build_ebpf::Options),
    /// Run unit tests and the root-only integration tests.
    Test(test::Options),
    /// Start a local 3-host demonstration cluster and leave it up (`--down` removes it).
    Demo(demo::Options),
    /// Benchmark the datapaths (host-gw, kernel vxlan, eBPF) or, with --control-plane, the agent.
    Bench(bench::Options),
    /// A cluster under churn for N minutes, sampled: does anything grow? (report.json, report.svg)
    Soak(soak::Options),
    /// Build weft in release (eBPF included) and install the binary, the systemd unit and weft.env.
    Install(install::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(opts) => build_ebpf::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::Install(opts) => install::run(&opts),
        Command::Soak(opts) => soak::run(&opts),
    }
}
