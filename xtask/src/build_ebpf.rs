//! `cargo xtask build-ebpf`: make sure the toolchain is there, then build the eBPF object.
//!
//! The eBPF crate needs nightly (with `rust-src`, for `-Z build-std=core`) and a
//! `bpf-linker` linked against nightly's own LLVM, so the bitcode rustc emits and
//! the linker reading it agree. Missing pieces are installed; what cannot be
//! installed stops with the exact command to run.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const TARGET: &str = "bpfel-unknown-none";
const EBPF_PACKAGE: &str = "weft-ebpf";

#[derive(clap::Args)]
pub struct Options {
    /// Never install anything; fail with the command to run instead.
    #[arg(long)]
    pub no_install: bool,
    /// Install root for bpf-linker (`cargo install --root`); default: cargo's own (~/.cargo).
    #[arg(long, env = "WEFT_BPF_LINKER_ROOT")]
    pub linker_root: Option<PathBuf>,
    /// Rebuild bpf-linker even when a working one is on PATH.
    #[arg(long)]
    pub reinstall_linker: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    ensure_nightly(opts)?;
    let linker_bin = ensure_bpf_linker(opts)?;
    let object = build_object(linker_bin.as_deref())?;
    println!("{}", object.display());
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A command with the variables the outer (stable) cargo set removed, so
/// `+nightly` really selects nightly and nothing points at stable's rustc.
fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTC",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd`, returning stdout; fails with the command line and its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with inherited output, or says what to run by hand.
fn install_step(opts: &Options, what: &str, cmd: &mut Command, manual: &str) -> Result<()> {
    if opts.no_install {
        bail!("{what} is missing; install it with: {manual}");
    }
    eprintln!("build-ebpf: installing {what}: {manual}");
    let status = cmd.status().with_context(|| format!("run {manual}"))?;
    if !status.success() {
        bail!("installing {what} failed ({status}); run by hand: {manual}");
    }
    Ok(())
}

fn ensure_nightly(opts: &Options) -> Result<()> {
    let toolchains = output(clean_command("rustup").args(["toolchain", "list"]))
        .context("rustup is needed for the nightly toolchain; install it from https://rustup.rs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        install_step(
            opts,
            "the nightly toolchain",
            clean_command("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "rustup toolchain install nightly --profile minimal",
        )?;
    }
    let components = output(clean_command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.trim() == "rust-src") {
        install_step(
            opts,
            "nightly rust-src",
            clean_command("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]),
            "rustup component add rust-src --toolchain nightly",
        )?;
    }
    Ok(())
}

/// nightly's libLLVM: the versioned file name in its sysroot and the major version.
struct NightlyLlvm {
    library: PathBuf,
    file_name: String,
    major: u32,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let sysroot = output(clean_command("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let entries =
        std::fs::read_dir(&lib_dir).with_context(|| format!("list {}", lib_dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // e.g. libLLVM.so.22.1-rust-1.97.0-nightly
        let Some(version) = name.strip_prefix("libLLVM.so.") else {
            continue;
        };
        let major = version
            .split(['.', '-'])
            .next()
            .and_then(|m| m.parse().ok());
        if let Some(major) = major {
            return Ok(NightlyLlvm {
                library: entry.path(),
                file_name: name,
                major,
            });
        }
    }
    bail!(
        "no libLLVM.so.<version> in {}; reinstall nightly: rustup toolchain install nightly --profile minimal --force",
        lib_dir.display()
    )
}

/// Whether a working bpf-linker is found (it loads its libLLVM at start, so a
/// broken rpath after a nightly update shows up here).
fn linker_works(bin: &OsStr) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Returns the directory to prepend to PATH when bpf-linker was installed under a custom root.
fn ensure_bpf_linker(opts: &Options) -> Result<Option<PathBuf>> {
    let root_bin = opts.linker_root.as_ref().map(|r| r.join("bin"));
    let candidate = match &root_bin {
        Some(bin) => bin.join("bpf-linker").into_os_string(),
        None => "bpf-linker".into(),
    };
    if !opts.reinstall_linker && linker_works(&candidate) {
        return Ok(root_bin);
    }
    let llvm = nightly_llvm()?;
    // The prefix must outlive the install: bpf-linker's rpath points into it.
    let prefix_base = match &opts.linker_root {
        Some(root) => root.clone(),
        None => home_cargo_dir()?,
    };
    let prefix = prefix_base.join("weft-llvm").join(&llvm.file_name);
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    for link in ["libLLVM.so".to_string(), llvm.file_name.clone()] {
        let path = lib.join(&link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&llvm.library, &path)
            .with_context(|| format!("symlink {} -> {}", path.display(), llvm.library.display()))?;
    }
    let feature = format!("llvm-{}", llvm.major);
    let mut cmd = clean_command("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--no-default-features",
        "--features",
        &feature,
        "--force",
    ])
    .env("LLVM_PREFIX", &prefix);
    if let Some(root) = &opts.linker_root {
        cmd.arg("--root").arg(root);
    }
    let manual = format!(
        "LLVM_PREFIX={} cargo install bpf-linker --no-default-features --features {feature}{}",
        prefix.display(),
        opts.linker_root
            .as_ref()
            .map(|r| format!(" --root {}", r.display()))
            .unwrap_or_default()
    );
    install_step(
        opts,
        "bpf-linker (built against nightly's LLVM)",
        &mut cmd,
        &manual,
    )?;
    if !linker_works(&candidate) {
        bail!(
            "bpf-linker was installed but `{} --version` fails; run by hand: {manual}",
            candidate.to_string_lossy()
        );
    }
    Ok(root_bin)
}

fn home_cargo_dir() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home =
        std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set; set CARGO_HOME")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn build_object(linker_bin: Option<&Path>) -> Result<PathBuf> {
    let mut cmd = clean_command("cargo");
    cmd.current_dir(workspace_root()).args([
        "+nightly",
        "build",
        "-p",
        EBPF_PACKAGE,
        "--release",
        "--target",
        TARGET,
        "-Z",
        "build-std=core",
    ]);
    if let Some(bin) = linker_bin {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin.to_path_buf()];
        paths.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(paths).context("join PATH")?);
    }
    let status = cmd
        .status()
        .context("run cargo +nightly build for the eBPF crate")?;
    if !status.success() {
        bail!("building the eBPF crate failed ({status}); the compiler output above says why");
    }
    let object = target_dir().join(TARGET).join("release").join(EBPF_PACKAGE);
    if !object.is_file() {
        bail!(
            "cargo reported success but {} does not exist",
            object.display()
        );
    }
    Ok(object)
}
