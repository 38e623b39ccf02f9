//! The Debian packages weft's build, tests, demo and bench run: installed when missing.
//!
//! `.ci/run` installs the same list before it runs any cargo command. Building weft needs none of
//! them: etcd-client's protoc comes from crates.io (see .cargo/protoc).

use std::process::Command;

use anyhow::bail;

/// (command, Debian package that provides it). Keep in sync with `.ci/run`.
pub const NEEDED: &[(&str, &str)] = &[
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    ("ip", "iproute2"),
    ("bridge", "iproute2"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("bpftool", "bpftool"),
    ("tcpdump", "tcpdump"),
    ("ethtool", "ethtool"),
    ("ping", "iputils-ping"),
    ("openssl", "openssl"),
    ("systemd-analyze", "systemd"),
    // The Docker scenarios and `demo --docker`: a real dockerd per host, and an image built from
    // busybox-static (a static binary, so the image needs no libc).
    ("dockerd", "docker.io"),
    ("docker", "docker.io"),
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("busybox", "busybox-static"),
    // tests/tests/systemd.rs: a Debian root file system booted under systemd-nspawn.
    ("debootstrap", "debootstrap"),
    ("systemd-nspawn", "systemd-container"),
];

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Install the packages whose commands are missing; quiet when nothing is.
pub fn ensure() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !on_path("apt-get") {
        bail!("missing commands; install these packages (Debian names) and rerun: {list}");
    }
    println!("==> installing {list}");
    let ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
    let updated = ok(Command::new("apt-get").args(["update", "-qq"]));
    let installed = ok(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if !(updated && installed) {
        bail!("could not install the packages; run `apt-get update && apt-get install {list}` as root, then rerun");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_run_installs_the_same_packages() {
        let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/run"))
            .expect("read .ci/run");
        for (cmd, pkg) in NEEDED {
            assert!(
                ci.contains(&format!("[{cmd}]={pkg}")),
                ".ci/run lacks [{cmd}]={pkg}"
            );
        }
    }
}
