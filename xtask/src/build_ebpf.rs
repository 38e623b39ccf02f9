//! `cargo xtask build-ebpf`: make sure the toolchain is there, then build the eBPF object.

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    anyhow::bail!("build-ebpf is being written")
}
