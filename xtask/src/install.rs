//! `cargo xtask install`: build weft in release (eBPF object included) and install the binary, the
//! systemd unit and the example environment file.
//!
//! ```text
//! <destdir><prefix>/bin/weft                                   0755, replaced
//! <destdir><unit-dir>/weft.service                             0644, replaced (ExecStart points at the binary)
//! <destdir><config-dir>/weft.env                               0600, only when absent: site settings survive
//! <destdir><prefix>/share/doc/weft/10-etcd-tls.conf.example    0644, the TLS/auth drop-in, to copy by hand
//! ```

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::test::{step, target_dir};

/// Where the unit in dist/ expects the binary.
const UNIT_BIN: &str = "/usr/local/bin/weft";

#[derive(clap::Args)]
pub struct Options {
    /// Installation prefix: the binary goes to <prefix>/bin/weft.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Directory for weft.service.
    #[arg(long, default_value = "/etc/systemd/system")]
    pub unit_dir: PathBuf,
    /// Directory for weft.env (written only when it does not exist yet).
    #[arg(long, default_value = "/etc/weft")]
    pub config_dir: PathBuf,
    /// Staging root put in front of every path (for packages); the installed unit still names
    /// <prefix>/bin/weft.
    #[arg(long)]
    pub destdir: Option<PathBuf>,
    /// Install this already built binary instead of building one.
    #[arg(long)]
    pub bin: Option<PathBuf>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let bin = match &opts.bin {
        Some(bin) => bin.clone(),
        None => build_release()?,
    };
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    println!("==> install");
    for line in install(opts, &bin, &dist)? {
        println!("{line}");
    }
    if opts.destdir.is_none() {
        println!(
            "next: edit {}, then `systemctl daemon-reload && systemctl enable --now weft` (see README.md, section Run weft with systemd)",
            opts.config_dir.join("weft.env").display()
        );
    }
    Ok(())
}

/// `cargo xtask build-ebpf`, then `cargo build --release -p weft --bin weft`; the binary's path.
pub(crate) fn build_release() -> anyhow::Result<PathBuf> {
    let xtask = std::env::current_exe().context("find the xtask binary")?;
    step(
        "build the eBPF object",
        Command::new(xtask).arg("build-ebpf"),
    )?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    step(
        "build weft (release)",
        Command::new(cargo).args(["build", "--release", "--package", "weft", "--bin", "weft"]),
    )?;
    Ok(target_dir()?.join("release").join("weft"))
}

/// Copy the files into place; one line per file saying what happened.
pub fn install(opts: &Options, bin: &Path, dist: &Path) -> anyhow::Result<Vec<String>> {
    if !bin.is_file() {
        bail!(
            "{} does not exist; build it first or drop --bin",
            bin.display()
        );
    }
    let root = |p: &Path| match &opts.destdir {
        Some(d) => d.join(p.strip_prefix("/").unwrap_or(p)),
        None => p.to_path_buf(),
    };
    let installed_bin = opts.prefix.join("bin").join("weft");
    let mut done = Vec::new();

    let bin_to = root(&installed_bin);
    // Write beside and rename: replacing a running binary in place fails with ETXTBSY.
    let tmp = bin_to.with_extension("new");
    copy(bin, &tmp, 0o755)?;
    std::fs::rename(&tmp, &bin_to)
        .with_context(|| format!("rename {} to {}", tmp.display(), bin_to.display()))?;
    done.push(format!("installed {}", bin_to.display()));

    let unit = read(&dist.join("weft.service"))?;
    let installed_path = installed_bin
        .to_str()
        .context("the prefix must be valid UTF-8")?;
    let unit = unit.replace(UNIT_BIN, installed_path);
    let unit_to = root(&opts.unit_dir.join("weft.service"));
    write(&unit_to, unit.as_bytes(), 0o644)?;
    done.push(format!("installed {}", unit_to.display()));

    let env_to = root(&opts.config_dir.join("weft.env"));
    if env_to.exists() {
        done.push(format!("kept {} (already there)", env_to.display()));
    } else {
        copy(&dist.join("weft.env"), &env_to, 0o600)?;
        done.push(format!("installed {}", env_to.display()));
    }

    let dropin_to = root(&opts.prefix.join("share/doc/weft/10-etcd-tls.conf.example"));
    copy(
        &dist.join("weft.service.d/10-etcd-tls.conf"),
        &dropin_to,
        0o644,
    )?;
    done.push(format!("installed {}", dropin_to.display()));
    Ok(done)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("read {}", from.display()))?;
    write(to, &bytes, mode)
}

fn write(to: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(to, bytes).with_context(|| format!("write {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn installs_into_a_destdir_and_keeps_an_existing_env_file() {
        let dest = std::env::temp_dir().join(format!("weft-install-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dest);
        let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
        let fake_bin = dest.join("built-weft");
        write(&fake_bin, b"#!/bin/sh\necho weft\n", 0o700).unwrap();
        let opts = Options {
            prefix: "/opt/weft".into(),
            unit_dir: "/etc/systemd/system".into(),
            config_dir: "/etc/weft".into(),
            destdir: Some(dest.join("root")),
            bin: None,
        };
        let r = dest.join("root");
        install(&opts, &fake_bin, &dist).unwrap();
        assert_eq!(
            std::fs::read(r.join("opt/weft/bin/weft")).unwrap(),
            std::fs::read(&fake_bin).unwrap()
        );
        assert_eq!(mode(&r.join("opt/weft/bin/weft")), 0o755);
        let unit = std::fs::read_to_string(r.join("etc/systemd/system/weft.service")).unwrap();
        assert!(
            unit.contains("ExecStart=/opt/weft/bin/weft agent"),
            "{unit}"
        );
        assert!(
            !unit.contains(UNIT_BIN),
            "every {UNIT_BIN} is rewritten: {unit}"
        );
        assert_eq!(mode(&r.join("etc/systemd/system/weft.service")), 0o644);
        let env = r.join("etc/weft/weft.env");
        assert_eq!(
            std::fs::read_to_string(&env).unwrap(),
            read(&dist.join("weft.env")).unwrap()
        );
        assert_eq!(mode(&env), 0o600, "the env file may hold a password");
        assert!(r
            .join("opt/weft/share/doc/weft/10-etcd-tls.conf.example")
            .is_file());

        // A second install replaces the binary and the unit but keeps the site's settings.
        std::fs::write(&env, "WEFT_ETCD_ENDPOINTS=https://etcd.example:2379\n").unwrap();
        let lines = install(&opts, &fake_bin, &dist).unwrap();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("kept ") && l.contains("weft.env")),
            "{lines:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&env).unwrap(),
            "WEFT_ETCD_ENDPOINTS=https://etcd.example:2379\n"
        );
        std::fs::remove_dir_all(&dest).unwrap();
    }

    #[test]
    fn a_missing_binary_is_named() {
        let opts = Options {
            prefix: "/usr/local".into(),
            unit_dir: "/x".into(),
            config_dir: "/y".into(),
            destdir: Some("/nonexistent".into()),
            bin: None,
        };
        let e = install(&opts, Path::new("/nonexistent/weft"), Path::new("dist")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/weft does not exist"),
            "{e}"
        );
    }
}
