//! A private bpffs instance for pins, so tests never touch /sys/fs/bpf or each other's pins.

use std::path::Path;

use anyhow::Context as _;

/// A bpffs mounted on a fresh temporary directory; lazily unmounted on drop.
pub struct BpfFs(tempfile::TempDir);

impl BpfFs {
    /// Mount one; panics with mount's message when it fails (a test setup step).
    pub fn mount() -> BpfFs {
        Self::try_mount().unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_mount() -> anyhow::Result<BpfFs> {
        let dir = tempfile::Builder::new()
            .prefix("weft-bpffs-")
            .tempdir()
            .context("create a directory for bpffs")?;
        let path = dir.path().to_str().context("temp dir path is not UTF-8")?;
        crate::netns::run_blocking("mount", &["-t", "bpf", "bpf", path])?;
        Ok(BpfFs(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}
