//! `cargo xtask bench`: build the eBPF object, the agent and the bench runner (all release), then
//! run the runner (`bench/`, crate `weft-bench`) with the agent just built.
//!
//! The runner is its own crate because it drives the test harness, which links the agent, whose
//! build embeds the eBPF object: xtask itself must build before that object exists. Every argument
//! after `bench` goes to the runner (`cargo xtask bench --help` lists them); results land in
//! `<target>/bench/` (report.json, report.svg, report.md, control-plane.json).

use std::process::Command;

use anyhow::Context as _;

use crate::test::{show, step, target_dir};

#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Options {
    /// Do not run `build-ebpf` first; use the eBPF object built earlier.
    #[arg(long)]
    pub skip_ebpf: bool,
    /// Arguments for the benchmark runner (e.g. `--rounds 7`, `--quick`, `--control-plane`, `--help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !opts.skip_ebpf {
        let xtask = std::env::current_exe().context("find the xtask binary")?;
        step("build the eBPF object", Command::new(xtask).arg("build-ebpf"))?;
    }
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build.args([
        "build",
        "--release",
        "--package",
        "weft",
        "--bin",
        "weft",
        "--package",
        "weft-bench",
        "--bin",
        "weft-bench",
    ]);
    step("build the agent and the benchmark (release)", &mut build)?;

    let target = target_dir()?;
    let release = target.join("release");
    let mut bench = Command::new(release.join("weft-bench"));
    bench.env("WEFT_BIN", release.join("weft")).args(&opts.args);
    if !opts.args.iter().any(|a| a == "--out" || a.starts_with("--out=")) {
        bench.arg("--out").arg(target.join("bench"));
    }
    println!("==> run the benchmark");
    println!("$ {}", show(&bench));
    let status = bench.status().with_context(|| format!("run `{}`", show(&bench)))?;
    std::process::exit(status.code().unwrap_or(1));
}
