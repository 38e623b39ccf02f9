//! Another weft build from this repository's history, with its own eBPF object: the previous
//! layout in tests/tests/upgrade.rs, the benchmark's `ebpf-base` mode.
//!
//! A `git worktree` of the commit under `<target>/<dir>/src`, built (`cargo xtask build-ebpf`,
//! then `cargo build`) into `<target>/<dir>/target` the first time and reused while the worktree
//! still holds that commit. Each caller has a variable that names an already built binary instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// One build of one commit.
#[derive(Debug, Clone, Copy)]
pub struct PrevBuild<'a> {
    /// The commit, as git takes it (`96d6bbb`).
    pub rev: &'a str,
    /// The directory under the target directory that holds the worktree and its build.
    pub dir: &'a str,
    /// `cargo build --release` (what the benchmark measures) rather than a debug build.
    pub release: bool,
    /// The variable that names an already built binary instead, for the error messages.
    pub bin_var: &'a str,
}

/// The workspace this harness belongs to.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Runs `cmd` to its end: its stdout, trimmed, or an error with the command and its output.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl PrevBuild<'_> {
    fn profile(&self) -> &'static str {
        if self.release {
            "release"
        } else {
            "debug"
        }
    }

    /// Where the binary is (or will be) once built.
    pub fn bin(&self) -> PathBuf {
        target_dir()
            .join(self.dir)
            .join("target")
            .join(self.profile())
            .join("weft")
    }

    /// The weft binary of [`PrevBuild::rev`]: built now unless an earlier build of that commit is
    /// there. Takes minutes the first time.
    pub fn build(&self) -> anyhow::Result<PathBuf> {
        let ws = workspace();
        let target = target_dir();
        let root = target.join(self.dir);
        let src = root.join("src");
        let prev_target = root.join("target");
        let bin = self.bin();
        let git = |dir: &Path, args: &[&str]| run(Command::new("git").current_dir(dir).args(args));
        let commit = git(
            &ws,
            &["rev-parse", "--verify", &format!("{}^{{commit}}", self.rev)],
        )
        .with_context(|| {
            format!(
                "find commit {} (a clone with history is needed; or set {})",
                self.rev, self.bin_var
            )
        })?;
        if src.join("Cargo.toml").is_file() {
            if git(&src, &["rev-parse", "HEAD"])? == commit && bin.is_file() {
                return Ok(bin);
            }
            git(&src, &["checkout", "--detach", &commit])
                .with_context(|| format!("check out {} in {}", self.rev, src.display()))?;
        } else {
            std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
            run(Command::new("git")
                .current_dir(&ws)
                .args(["worktree", "add", "--force", "--detach"])
                .arg(&src)
                .arg(&commit))
            .with_context(|| format!("check out {} (or set {})", self.rev, self.bin_var))?;
        }
        eprintln!(
            "building weft {} ({}) into {} (once; takes minutes)",
            self.rev,
            self.profile(),
            prev_target.display()
        );
        // The commit's xtask (which builds its eBPF object) is a debug build either way.
        for profile in ["debug", self.profile()] {
            seed(&target.join(profile), &prev_target.join(profile))?;
        }
        let cargo = |args: &[&str]| {
            let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            cmd.current_dir(&src)
                .args(args)
                .env("CARGO_TARGET_DIR", &prev_target)
                .env("PROTOC", protoc(&src, &ws))
                .env_remove("WEFT_EBPF_OBJECT")
                .env_remove("RUSTFLAGS");
            cmd
        };
        // The commit's own xtask builds the commit's own programs, which its agent embeds.
        run(&mut cargo(&["xtask", "build-ebpf", "--no-install"]))
            .with_context(|| format!("build the eBPF object of {}", self.rev))?;
        let mut build = vec!["build", "-p", "weft", "--bin", "weft"];
        if self.release {
            build.push("--release");
        }
        run(&mut cargo(&build)).with_context(|| format!("build weft {}", self.rev))?;
        if !bin.is_file() {
            bail!("building weft {} left no {}", self.rev, bin.display());
        }
        Ok(bin)
    }
}

/// The commit's own `.cargo/protoc` when it has one, else this workspace's.
fn protoc(src: &Path, ws: &Path) -> PathBuf {
    let own = src.join(".cargo").join("protoc");
    if own.is_file() {
        own
    } else {
        ws.join(".cargo").join("protoc")
    }
}

/// Both commits share most of Cargo.lock: copying this build's compiled dependencies (not its
/// test binaries or incremental caches) spares the other build from compiling them again.
fn seed(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.join("deps").exists() || !from.join("deps").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(to.join("deps"))?;
    for dir in ["build", ".fingerprint"] {
        run(Command::new("cp").arg("-a").arg(from.join(dir)).arg(to))?;
    }
    let libs: Vec<PathBuf> = std::fs::read_dir(from.join("deps"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("lib"))
        .map(|e| e.path())
        .collect();
    run(Command::new("cp").arg("-a").args(libs).arg(to.join("deps")))?;
    Ok(())
}
