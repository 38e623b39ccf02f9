//! Loading the programs, attaching them (adopting what a previous agent
//! pinned), finishing a layout change, and putting them back when they go
//! missing.

use std::path::Path;

use tracing::{info, warn};

use super::{EbpfBackend, EbpfBackendError};
use crate::{
    datapath::{Attachment, Datapath, DecapHook},
    netlink::Interface,
};

/// Loads the eBPF object, adopting the maps pinned under `pin_dir`.
pub(super) fn load(pin_dir: &Path) -> Result<Datapath, EbpfBackendError> {
    Datapath::load(pin_dir).map_err(|source| EbpfBackendError::Load {
        source: Box::new(source),
    })
}

impl EbpfBackend {
    /// Writes the node configuration and attaches both programs (adopting pinned links).
    pub(super) fn configure_and_attach(
        &mut self,
        interfaces: &[Interface],
    ) -> Result<(), EbpfBackendError> {
        self.write_node()?;
        let ext = self.s.vxlan.external.name.clone();
        let a =
            self.dp
                .attach_decap(&ext, self.hook)
                .map_err(|source| EbpfBackendError::Attach {
                    what: "decapsulation",
                    hook: hook_name(self.hook),
                    interface: ext.clone(),
                    source: Box::new(source),
                })?;
        info!(program = a.program, interface = %a.interface, hook = a.hook, adopted = a.adopted, "decapsulation attached");
        self.sync_host_encap(interfaces, true)?;
        self.encap_attached = false;
        self.attach_encap_if_bridge(interfaces)?;
        Ok(())
    }

    /// Host encapsulation on the egress of `flannel.N` and `flannel-v6.N`,
    /// where they exist and it is not attached (first time, or the device was
    /// deleted and created again, or someone detached it). `swap_live`: also
    /// put this build's program into live links a previous agent pinned, as
    /// on setup. Returns how many were re-attached (a first attach or a swap
    /// is not a repair).
    fn sync_host_encap(
        &mut self,
        interfaces: &[Interface],
        swap_live: bool,
    ) -> Result<usize, EbpfBackendError> {
        let program = weft_common::program_names::TC_HOST_ENCAP;
        let mut repairs = 0;
        for device in [self.s.vxlan.device_name(), self.s.vxlan.device_name_v6()] {
            let link = self.dp.pins().link(program, &device);
            let live = link.is_live(interfaces);
            if index_of(interfaces, &device).is_none() || (live && !swap_live) {
                continue;
            }
            let repair = !live && link.path.exists();
            let a =
                self.dp
                    .attach_host_encap(&device)
                    .map_err(|source| EbpfBackendError::Attach {
                        what: "host encapsulation",
                        hook: "tcx egress",
                        interface: device.clone(),
                        source: Box::new(source),
                    })?;
            info!(program = a.program, interface = %a.interface, hook = a.hook, adopted = a.adopted, "host encapsulation attached: the host's own traffic into the tunnel takes the eBPF path");
            repairs += usize::from(repair);
        }
        Ok(repairs)
    }

    /// After a layout change, once our programs are attached: every other
    /// pinned link switched, counters carried, the old maps unpinned.
    pub(super) fn finish_migration(
        &mut self,
        interfaces: &[Interface],
    ) -> Result<(), EbpfBackendError> {
        if !self.dp.migrating() {
            return Ok(());
        }
        // Bridge ports attached by the previous agent are switched in place,
        // so the new agent knows them as its own.
        let ports: Vec<String> = self
            .dp
            .pins()
            .links()
            .into_iter()
            .filter(|l| {
                l.program == weft_common::program_names::TC_ENCAP && l.interface != self.s.bridge
            })
            .map(|l| l.interface)
            .collect();
        self.dp
            .finish_migration(interfaces)
            .map_err(|source| EbpfBackendError::Migrate {
                source: Box::new(source),
            })?;
        self.ports.extend(ports);
        Ok(())
    }

    /// Attaches encapsulation when the bridge exists; returns whether it did.
    fn attach_encap_if_bridge(
        &mut self,
        interfaces: &[Interface],
    ) -> Result<bool, EbpfBackendError> {
        let bridge = self.s.bridge.clone();
        let Some(index) = index_of(interfaces, &bridge) else {
            info!(bridge = %bridge, "bridge does not exist yet; encapsulation is attached once it appears, the kernel path carries traffic meanwhile");
            return Ok(false);
        };
        if self.node.bridge_ifindex != index {
            self.node.bridge_ifindex = index;
            self.write_node()?;
        }
        let a = self.attach_encap(&bridge)?;
        info!(program = a.program, interface = %a.interface, hook = a.hook, adopted = a.adopted, "encapsulation attached");
        self.encap_attached = true;
        Ok(true)
    }

    /// Attaches encapsulation to the TC ingress of `interface` (the bridge or one of its ports).
    pub(super) fn attach_encap(&mut self, interface: &str) -> Result<Attachment, EbpfBackendError> {
        self.dp
            .attach_encap(interface)
            .map_err(|source| EbpfBackendError::Attach {
                what: "encapsulation",
                hook: "tcx ingress",
                interface: interface.to_string(),
                source: Box::new(source),
            })
    }

    /// Re-attaches programs that were detached (by hand, or because their
    /// interface was deleted and recreated), attaches encapsulation once the
    /// bridge exists, and rewrites an altered node configuration. Returns the
    /// number of repairs.
    pub(super) fn repair_attachments(
        &mut self,
        interfaces: &[Interface],
    ) -> Result<usize, EbpfBackendError> {
        let mut broken = Vec::new();
        let decap = (hook_program(self.hook), self.s.vxlan.external.name.clone());
        let encap = (weft_common::program_names::TC_ENCAP, self.s.bridge.clone());
        for (program, interface) in [&decap, &encap] {
            if *program == encap.0 && !self.encap_attached {
                continue;
            }
            let link = self.dp.pins().link(program, interface);
            let state = link.state();
            if !state.is_live_on(interfaces, interface) {
                warn!(program, interface = %interface, state = ?state, "program is no longer attached; re-attaching");
                broken.push(program);
            }
        }
        let mut repairs = broken.len();
        if !broken.is_empty() {
            // Reload rather than re-attach one link: a link whose pin was removed
            // is still held by our fd, and only dropping the old datapath frees it.
            let fresh = load(&self.s.pin_dir)?;
            drop(std::mem::replace(&mut self.dp, fresh));
            self.ports.clear();
            self.configure_and_attach(interfaces)?;
        } else {
            if !self.encap_attached && self.attach_encap_if_bridge(interfaces)? {
                repairs += 1;
            }
            repairs += self.sync_host_encap(interfaces, false)?;
        }
        repairs += self.repair_node()?;
        Ok(repairs)
    }
}

fn hook_program(hook: DecapHook) -> &'static str {
    match hook {
        DecapHook::Xdp => weft_common::program_names::XDP_DECAP,
        DecapHook::Tc => weft_common::program_names::TC_DECAP,
    }
}

fn hook_name(hook: DecapHook) -> &'static str {
    match hook {
        DecapHook::Xdp => "xdp native",
        DecapHook::Tc => "tcx ingress",
    }
}

/// The index of the interface named `name`, `None` when there is none.
pub(super) fn index_of(interfaces: &[Interface], name: &str) -> Option<u32> {
    interfaces.iter().find(|i| i.name == name).map(|i| i.index)
}
