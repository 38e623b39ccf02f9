//! `cargo xtask test`: unit tests and the root-only integration tests.
//!
//! Builds the eBPF object (`build-ebpf`) and the `weft` binary first, then runs
//! `cargo test --no-fail-fast --workspace --exclude weft-ebpf -- --include-ignored` with `WEFT_BIN` pointing at that
//! binary, so the integration tests run the agent that was just built. Root-only tests are
//! `#[ignore = "needs root: run cargo xtask test"]`: a plain `cargo test` reports them as ignored,
//! never as passed, and this command (which runs as root) runs them. A full run (no test arguments)
//! first checks that the build needs no protoc from the system (see [`check_hermetic_build`]). The
//! output ends with cargo test's summary.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _};

#[derive(clap::Args)]
pub struct Options {
    /// Also run the long tests (agent restarts under load, soak): sets WEFT_LONG_TESTS=1.
    #[arg(long)]
    pub long: bool,
    /// Do not run `build-ebpf` first; use the eBPF object built earlier.
    #[arg(long)]
    pub skip_ebpf: bool,
    /// Passed to `cargo test` after `--` (e.g. a test name filter, `--nocapture`).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("test")?;
    let weft_bin = build_weft(opts.skip_ebpf)?;
    if opts.test_args.is_empty() {
        check_hermetic_build()?;
    } else {
        // A filtered run is a developer's inner loop; the full run (CI's) keeps the check.
        println!("==> build without a system protoc: not checked (test arguments given)");
    }

    let mut test = cargo();
    // Every test binary runs even after one fails: a CI log then names every failure at once.
    test.args([
        "test",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "weft-ebpf",
    ])
    .env("WEFT_BIN", &weft_bin);
    if opts.long {
        test.env("WEFT_LONG_TESTS", "1");
    }
    test.arg("--").args(libtest_args(&opts.test_args));
    let long = if opts.long { "WEFT_LONG_TESTS=1 " } else { "" };
    println!("==> run the unit and integration tests");
    println!("$ WEFT_BIN={} {long}{}", weft_bin.display(), show(&test));
    let status = test.status().context("run cargo test")?;
    // Nothing may follow cargo test's own summary: pass its exit code on as it is.
    std::process::exit(status.code().unwrap_or(1));
}

/// Build the eBPF object (unless `skip_ebpf`) and the `weft` binary; returns the binary's path.
pub(crate) fn build_weft(skip_ebpf: bool) -> anyhow::Result<PathBuf> {
    crate::packages::ensure()?;
    if !skip_ebpf {
        let xtask = std::env::current_exe().context("find the xtask binary")?;
        let mut cmd = Command::new(xtask);
        cmd.arg("build-ebpf");
        step("build the eBPF object", &mut cmd)?;
    }
    let mut build = cargo();
    build.args(["build", "--package", "weft", "--bin", "weft"]);
    step("build the weft binary", &mut build)?;
    Ok(target_dir()?.join("debug").join("weft"))
}

/// What follows `--`: the user's arguments, plus `--include-ignored` so the root-only tests run,
/// unless the user already chose (`--ignored` and `--include-ignored` exclude each other in libtest,
/// and either one given twice is an error).
fn libtest_args(user: &[String]) -> Vec<String> {
    let chosen = user
        .iter()
        .any(|a| a == "--ignored" || a == "--include-ignored");
    let mut args = user.to_vec();
    if !chosen {
        args.push("--include-ignored".to_owned());
    }
    args
}

/// Hides every `protoc` on PATH and `/usr/include/google` (when present), then makes
/// etcd-client's build script run again and builds the agent.
const HERMETIC_BUILD: &str = r#"set -eu
cargo=$1
IFS=:
for dir in $PATH; do
    if [ -e "$dir/protoc" ]; then
        mount --bind /dev/null "$dir/protoc"
        echo "    hidden: $dir/protoc"
    fi
done
unset IFS
for dir in /usr/include/google /usr/local/include/google; do
    if [ -d "$dir" ]; then
        mount -t tmpfs -o ro weft-no-protobuf "$dir"
        echo "    hidden: $dir"
    fi
done
"$cargo" clean --package etcd-client
"$cargo" build --package weft --bin weft
"#;

/// The agent builds with nothing from the system's protobuf packages: in a private mount namespace
/// every `protoc` on PATH and `/usr/include/google` are hidden, etcd-client is cleaned so its
/// build script (the one that runs protoc) really runs again, and `weft` is built. A green run on a
/// development machine that happens to have protobuf installed then still proves a fresh machine
/// builds. Reuses the main target directory: the cost is rebuilding etcd-client and the agent.
fn check_hermetic_build() -> anyhow::Result<()> {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(HERMETIC_BUILD)
        .arg("sh")
        .arg(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        // The repo's own mechanism (.cargo/config.toml) must supply protoc, not the caller's shell.
        .env_remove("PROTOC")
        .env_remove("PROTOC_INCLUDE");
    println!("==> build weft with the system's protoc and /usr/include/google hidden");
    println!("$ unshare --mount --propagation private sh -c <hide protoc; cargo clean -p etcd-client; cargo build -p weft --bin weft>");
    let status = cmd.status().context("run unshare (util-linux)")?;
    if !status.success() {
        bail!(
            "building weft with the system's protoc and /usr/include/google hidden failed ({status}): \
             the build depends on a system protoc or protobuf include files again. etcd-client must \
             get protoc from .cargo/protoc (PROTOC in .cargo/config.toml, protoc-bin-vendored-* \
             build-dependencies of the agent); see README.md, Layout."
        );
    }
    Ok(())
}

/// The integration tests and the demo create namespaces, veths and bridges, load BPF programs and
/// run etcd and the agent inside namespaces: all of that needs root.
pub(crate) fn require_root(command: &str) -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    if euid != "0" {
        bail!(
            "cargo xtask {command} must run as root (effective uid is {euid}): it creates network \
             namespaces, veths and bridges, loads eBPF programs, and runs etcd and the agent inside \
             namespaces. Run it as root, e.g. `sudo -E env \"PATH=$PATH\" cargo xtask {command}`, or in \
             a root shell."
        );
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Print the step and its command line, run it, fail naming it.
pub(crate) fn step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    println!("==> {what}");
    println!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("run `{}`", show(cmd)))?;
    if !status.success() {
        bail!("{what} failed ({status}): `{}`", show(cmd));
    }
    Ok(())
}

/// The command line as a user would type it.
pub(crate) fn show(cmd: &Command) -> String {
    let program = PathBuf::from(cmd.get_program());
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let name = if name == "xtask" {
        "cargo xtask".to_owned()
    } else {
        name
    };
    std::iter::once(name)
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Cargo's target directory (honours CARGO_TARGET_DIR and config).
pub(crate) fn target_dir() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse cargo metadata")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

#[cfg(test)]
mod tests {
    use super::libtest_args;

    fn args(user: &[&str]) -> Vec<String> {
        libtest_args(&user.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn root_only_tests_run_unless_the_user_chose_otherwise() {
        assert_eq!(args(&[]), ["--include-ignored"]);
        assert_eq!(
            args(&["ebpf_", "--nocapture"]),
            ["ebpf_", "--nocapture", "--include-ignored"]
        );
        assert_eq!(args(&["--ignored"]), ["--ignored"]);
        assert_eq!(
            args(&["x", "--include-ignored"]),
            ["x", "--include-ignored"]
        );
    }
}
