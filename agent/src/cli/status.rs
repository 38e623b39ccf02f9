//! `weft status`: this host's datapath as the pinned maps and links show it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{exit, fail};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Pin directory, as given to `weft agent --bpf-pin-dir`.
    #[arg(long, env = "WEFT_BPF_PIN_DIR")]
    bpf_pin_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The default pin directory: one per network namespace, so agents of several
/// namespaces on one machine (and of the test harness) never share maps.
pub fn default_pin_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/net")?.ino();
    Ok(PathBuf::from(format!("/sys/fs/bpf/weft/netns-{ino}")))
}

pub fn run(a: StatusArgs) -> ExitCode {
    let dir = match a.bpf_pin_dir.map_or_else(default_pin_dir, Ok) {
        Ok(d) => d,
        Err(e) => {
            return fail(
                exit::OTHER,
                format!("find this namespace's pin directory: {e}"),
            )
        }
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(exit::OTHER, format!("start the async runtime: {e}")),
    };
    match rt.block_on(crate::status::collect(&dir)) {
        Ok(st) if a.json => match serde_json::to_string_pretty(&st) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(exit::OTHER, e),
        },
        Ok(st) => {
            print!("{st}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit::OTHER, e),
    }
}
