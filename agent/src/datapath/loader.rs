//! An aya loader that does not read the kernel's BTF.
//!
//! `EbpfLoader::new()` (aya 0.14) always parses `/sys/kernel/btf/vmlinux`
//! (5.5 MB on Linux 6.18, about 16 MB once parsed) for CO-RE relocations,
//! and `EbpfLoader::btf(None)` can only drop it afterwards: the agent's peak
//! memory (VmHWM) was 27.5 MB against 12 MB resident after start. weft's
//! programs use no CO-RE relocation (they read `__sk_buff` and packet bytes
//! only), so the kernel BTF is never needed. The loader is built in a short
//! thread whose private mount namespace hides that file; when hiding fails,
//! the plain loader is used and only the peak is higher.

use std::io;

use aya::EbpfLoader;

/// A loader without kernel BTF.
pub(super) fn loader() -> EbpfLoader<'static> {
    let hidden = std::thread::scope(|s| {
        s.spawn(|| hide_kernel_btf().map(|()| EbpfLoader::new()))
            .join()
    });
    let mut loader = match hidden {
        Ok(Ok(loader)) => loader,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "could not hide the kernel BTF from the eBPF loader; it parses it once");
            EbpfLoader::new()
        }
        Err(_) => EbpfLoader::new(),
    };
    loader.btf(None);
    loader
}

/// Gives the calling thread (only: unshare of a mount namespace also
/// unshares the thread's fs_struct) a private mount namespace with an empty
/// tmpfs over `/sys/kernel/btf`. The namespace goes away with the thread.
fn hide_kernel_btf() -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls with NUL-terminated constant strings; they affect this thread only.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing mounted below may propagate back to the host's namespace.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"none".as_ptr(),
            c"/sys/kernel/btf".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

    #[test]
    #[ignore = "needs root: run cargo xtask test"]
    fn kernel_btf_is_hidden_from_the_loading_thread_only() {
        assert!(
            std::path::Path::new(VMLINUX).exists(),
            "the kernel exposes no {VMLINUX}: weft's eBPF datapath needs a kernel built with BTF"
        );
        let inside = std::thread::spawn(|| {
            hide_kernel_btf().map(|()| std::path::Path::new(VMLINUX).exists())
        })
        .join()
        .expect("thread");
        assert!(
            !inside.expect("hide the kernel BTF"),
            "the loading thread must not see {VMLINUX}"
        );
        assert!(
            std::path::Path::new(VMLINUX).exists(),
            "the rest of the process still sees it"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(
            !mounts.contains("/sys/kernel/btf"),
            "nothing leaked into the process's mounts"
        );
    }
}
