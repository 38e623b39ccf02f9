//! Attaching programs to interfaces, pinning the links, adopting pinned links
//! on restart, and removing everything again.

use std::path::{Path, PathBuf};

use aya::programs::{
    tc::SchedClassifierLink, xdp::XdpLink, SchedClassifier, TcAttachType, Xdp, XdpMode,
};

use super::{layout, Carried, Datapath, DatapathError, PinDir, ProgramKind};
use crate::netlink::Interface;

/// Where decapsulation runs on the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecapHook {
    /// Native XDP: best on physical NICs (runs before GRO, per wire frame).
    Xdp,
    /// TC ingress (TCX): best on veth, where XDP turns TSO off on the peer and
    /// was measured 7x slower for TCP.
    Tc,
}

impl DecapHook {
    /// TC for veth underlays, XDP for everything else (by the ethtool driver name).
    pub fn for_interface(interface: &str) -> Self {
        match driver_name(interface).as_deref() {
            Some("veth") => DecapHook::Tc,
            _ => DecapHook::Xdp,
        }
    }

    fn program(self) -> ProgramKind {
        match self {
            DecapHook::Xdp => ProgramKind::XdpDecap,
            DecapHook::Tc => ProgramKind::TcDecap,
        }
    }
}

impl ProgramKind {
    /// Where on its interface a TC program runs.
    fn tc_direction(self) -> TcAttachType {
        match self {
            ProgramKind::TcHostEncap => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }
}

/// One program attached to one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    pub interface: String,
    /// "tcx ingress", "tcx egress" or "xdp native".
    pub hook: &'static str,
    /// The link a previous agent pinned was kept and its program swapped atomically.
    pub adopted: bool,
    pub link_pin: PathBuf,
}

impl Datapath {
    /// Attaches the encapsulation program to `interface`'s TC ingress (the
    /// container bridge, or a host-side container veth).
    pub fn attach_encap(&mut self, interface: &str) -> Result<Attachment, DatapathError> {
        self.attach(ProgramKind::TcEncap, interface)
    }

    /// Detaches encapsulation from `interface` (a bridge port that is going, or
    /// gone) and removes its pin; absent already is fine.
    pub fn detach_encap(&mut self, interface: &str) -> Result<(), DatapathError> {
        let pin = self.pins.link(ProgramKind::TcEncap.name(), interface);
        // Our fd and the pin are what keep the link; with both gone the kernel detaches it.
        self.links.retain(|(path, _)| *path != pin.path);
        pin.remove()
    }

    /// Attaches host encapsulation to the TC egress of `interface`
    /// (`flannel.N` or `flannel-v6.N`), first dropping a link of ours to a
    /// device of that name that was deleted (and maybe created again).
    pub fn attach_host_encap(&mut self, interface: &str) -> Result<Attachment, DatapathError> {
        let pin = self.pins.link(ProgramKind::TcHostEncap.name(), interface);
        self.links.retain(|(path, _)| *path != pin.path);
        self.attach(ProgramKind::TcHostEncap, interface)
    }

    /// Attaches decapsulation to the underlay `interface` at `hook`.
    pub fn attach_decap(
        &mut self,
        interface: &str,
        hook: DecapHook,
    ) -> Result<Attachment, DatapathError> {
        self.attach(hook.program(), interface)
    }

    fn attach(&mut self, kind: ProgramKind, interface: &str) -> Result<Attachment, DatapathError> {
        let program = kind.name();
        let pin = self.pins.link(program, interface);
        let link_pin = pin.path.clone();
        self.pins.create_attach_dirs()?;
        let attach_err = |reason: String| DatapathError::Attach {
            program,
            interface: interface.to_string(),
            reason,
        };
        let adopted = match kind {
            ProgramKind::XdpDecap => {
                let prog: &mut Xdp = kind
                    .program_mut(&mut self.ebpf)?
                    .try_into()
                    .map_err(|e| attach_err(format!("{e}")))?;
                let adopted = pin.adopt::<XdpLink, _>(|link| {
                    prog.attach_to_link(link).and_then(|id| prog.take_link(id))
                });
                match adopted {
                    Some(link) => Some(link),
                    None => {
                        let id = prog
                            .attach(interface, XdpMode::Driver)
                            .map_err(|e| attach_err(xdp_reason(interface, &e)))?;
                        let link = prog.take_link(id).map_err(|e| attach_err(format!("{e}")))?;
                        self.links.push((link_pin.clone(), pin.replace(link)?));
                        None
                    }
                }
            }
            ProgramKind::TcEncap | ProgramKind::TcDecap | ProgramKind::TcHostEncap => {
                let prog: &mut SchedClassifier = kind
                    .program_mut(&mut self.ebpf)?
                    .try_into()
                    .map_err(|e| attach_err(format!("{e}")))?;
                let adopted = pin.adopt::<SchedClassifierLink, _>(|link| {
                    prog.attach_to_link(link).and_then(|id| prog.take_link(id))
                });
                match adopted {
                    Some(link) => Some(link),
                    None => {
                        let id = prog.attach(interface, kind.tc_direction()).map_err(|e| {
                            attach_err(format!(
                                "{e}; does the interface exist (`ip link show {interface}`)?"
                            ))
                        })?;
                        let link = prog.take_link(id).map_err(|e| attach_err(format!("{e}")))?;
                        self.links.push((link_pin.clone(), pin.replace(link)?));
                        None
                    }
                }
            }
        };
        let is_adopted = adopted.is_some();
        if let Some(link) = adopted {
            self.links.push((link_pin.clone(), link));
        }
        self.pin_program(kind)?;
        let hook = match kind {
            ProgramKind::XdpDecap => "xdp native",
            ProgramKind::TcHostEncap => "tcx egress",
            ProgramKind::TcEncap | ProgramKind::TcDecap => "tcx ingress",
        };
        Ok(Attachment {
            program,
            interface: interface.to_string(),
            hook,
            adopted: is_adopted,
            link_pin,
        })
    }

    /// Pins the program (replacing an older agent's pin) so bpftool and `weft status` see it.
    fn pin_program(&mut self, kind: ProgramKind) -> Result<(), DatapathError> {
        let path = self.pins.program(kind.name());
        let _ = std::fs::remove_file(&path);
        let prog = kind.program_mut(&mut self.ebpf)?;
        prog.pin(&path).map_err(|e| DatapathError::Pin {
            what: format!("program {}", kind.name()),
            path,
            reason: e.to_string(),
        })?;
        // Its link runs ours now: another build's pin of it only keeps a dead program alive.
        for stale in self.pins.foreign_programs() {
            let name = stale.file_name().map(|n| n.to_string_lossy().into_owned());
            if name
                .is_some_and(|n| n == kind.name() || n.starts_with(&format!("{}-v", kind.name())))
            {
                let _ = std::fs::remove_file(stale);
            }
        }
        Ok(())
    }

    /// The links pinned under `pin_dir` as (program, interface) pairs.
    pub fn pinned_links(pin_dir: &Path) -> Vec<(String, String)> {
        PinDir::new(pin_dir)
            .links()
            .into_iter()
            .map(|l| (l.program, l.interface))
            .collect()
    }

    /// Detaches every program pinned under `pin_dir` and removes the pins
    /// (links, programs, maps of every layout). Keeps going after errors and
    /// reports them all. Programs attached by a running agent detach once it
    /// also drops them.
    pub fn detach_and_unpin(pin_dir: &Path) -> Result<(), Vec<DatapathError>> {
        PinDir::new(pin_dir).remove_all()
    }

    /// Whether maps of another layout are still waiting for
    /// [`Datapath::finish_migration`].
    pub fn migrating(&self) -> bool {
        self.previous.is_some()
    }

    /// Completes a layout change once the agent attached its own programs:
    /// swaps every other live pinned link (bridge ports) to this build's
    /// programs, adds the old counters to the new ones, and unpins the old
    /// maps and programs. Links whose interface is gone from `interfaces` (this
    /// namespace's, from rtnetlink) are left for the
    /// agent's reconcile to remove. `Ok(None)` when there was nothing to do.
    pub fn finish_migration(
        &mut self,
        interfaces: &[Interface],
    ) -> Result<Option<Carried>, DatapathError> {
        let Some(previous) = self.previous.take() else {
            return Ok(None);
        };
        for pin in self.pins.links() {
            if self.links.iter().any(|(path, _)| *path == pin.path) || !pin.is_live(interfaces) {
                continue;
            }
            let Some(kind) = ProgramKind::ALL
                .into_iter()
                .find(|k| k.name() == pin.program)
            else {
                continue;
            };
            if let Err(e) = self.attach(kind, &pin.interface) {
                tracing::warn!(error = %e, link = %pin.path.display(), "could not switch a pinned link to the new programs; the next reconcile re-attaches it");
            }
        }
        let counters = {
            let mut ours = self.counter_map()?;
            layout::add_counters(&previous, &mut ours)?
        };
        layout::unpin(&previous)?;
        for stale in self.pins.foreign_programs() {
            let _ = std::fs::remove_file(stale);
        }
        tracing::info!(from = %previous.describe(), to = weft_common::LAYOUT_VERSION, counters, "layout change complete: every link runs the new programs, the old maps are unpinned");
        Ok(Some(Carried {
            counters,
            ..Carried::default()
        }))
    }
}

fn xdp_reason(interface: &str, e: &aya::programs::ProgramError) -> String {
    let errno = match e {
        aya::programs::ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EBUSY) | Some(libc::EEXIST) => {
            format!("device busy; another XDP program is attached, see `weft status` (or `ip link show {interface}`)")
        }
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
            format!("{e}; the driver lacks native XDP: use the TC decap hook (--decap-hook tc)")
        }
        _ => format!("{e}"),
    }
}

/// The interface's driver as ethtool reports it (`veth`, `virtio_net`, ...).
pub(super) fn driver_name(interface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    let bytes = interface.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: plain socket + ioctl with buffers that outlive the call.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        libc::close(fd);
        rc
    };
    if rc != 0 {
        return None;
    }
    let end = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}
