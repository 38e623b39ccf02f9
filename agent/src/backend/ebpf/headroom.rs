//! The headroom device: room in front of every container's packets for the outer headers.
//!
//! A container's UDP datagram reaches encapsulation with 2 bytes free in front
//! of its Ethernet header, so `bpf_skb_adjust_room` has to reallocate and copy
//! the head of every one (`pskb_expand_head`: 40 % of encapsulation's time,
//! live). The container's stack leaves what its `eth0` asks for
//! (`needed_headroom`); a bridge asks each port for the largest headroom among
//! its ports (`update_headroom`), and a veth passes what it is asked on to its
//! peer, the container's `eth0`. A vxlan device needs its outer headers (64
//! bytes over IPv4, 84 over IPv6, the Ethernet header included), so one of them
//! as a bridge port gives every container that room, nothing changed inside the
//! containers.
//!
//! The device changes nothing else a user sees on the bridge: it is never up
//! (the bridge neither forwards to it nor counts it for carrier), has no
//! underlay and a VNI and port `flannel.<VNI>` cannot have, the overlay MTU
//! (the bridge's automatic MTU, its smallest port's, stays the containers'),
//! and the highest locally administered MAC (an automatic-MAC bridge takes its
//! lowest port's MAC, never this one while a container is on it). Never
//! encapsulated from, never bound. The kernel datapath does without it, as
//! flanneld does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracing::{info, warn};

use crate::{
    lease::MacAddr,
    netlink::{LinkInfo, Netlink, NetlinkError, VxlanSpec},
};

/// The device's name: one per network namespace, on the agent's bridge.
pub const DEVICE: &str = "weft-headroom";
/// The largest VNI: the device's mark (with [`DEVICE`]) that it is weft's.
const VNI: u32 = 0xff_ffff;
const MAC: MacAddr = MacAddr([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);

/// What the device must look like next to `flannel.<VNI>`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Want {
    /// The overlay MTU (subnet.env's `FLANNEL_MTU`, `flannel.<VNI>`'s).
    pub mtu: u32,
    /// `flannel.<VNI>`'s UDP port: the device's differs, so the kernel's
    /// "VNI in use" rule (same VNI, port and family) never refuses either.
    pub flannel_port: u16,
}

impl Want {
    fn port(&self) -> u16 {
        if self.flannel_port == u16::MAX {
            self.flannel_port - 1
        } else {
            self.flannel_port + 1
        }
    }

    fn spec(&self, local: IpAddr) -> VxlanSpec {
        VxlanSpec {
            name: DEVICE.to_string(),
            vni: VNI,
            local,
            dev_index: 0,
            port: self.port(),
            learning: false,
            gbp: false,
            mtu: self.mtu,
            mac: MAC,
        }
    }
}

/// Why an existing `weft-headroom` is not one weft may change, `None` when it is ours.
fn foreign(link: &LinkInfo, bridge_index: u32) -> Option<String> {
    let Some(v) = &link.vxlan else {
        return Some(format!(
            "it is a {} device, not weft's vxlan device",
            link.kind.as_deref().unwrap_or("hardware")
        ));
    };
    if v.vni != VNI || v.dev_index.is_some_and(|d| d != 0) {
        return Some(format!(
            "it is a vxlan device with vni {}, not weft's",
            v.vni
        ));
    }
    if link.up {
        return Some("it is up: the bridge would forward to it".to_string());
    }
    match link.master {
        Some(m) if m != bridge_index => Some(format!("it is a port of another device (index {m})")),
        _ => None,
    }
}

/// The device on `bridge`: created (IPv6 flavour when the kernel has IPv6, for
/// the larger headroom), enslaved and sized; an existing one of ours adopted.
/// An interface of that name that is not ours is left alone, with a warning
/// the first time (`warned`). Returns the number of changes, and the device's
/// index when it is ours.
pub(super) async fn ensure(
    nl: &Netlink,
    bridge: &LinkInfo,
    want: Want,
    warned: &mut bool,
) -> Result<(usize, Option<u32>), NetlinkError> {
    let mut changes = 0;
    let mut link = nl.link_by_name(DEVICE).await?;
    if let Some(l) = &link {
        let on_flannels_port = l
            .vxlan
            .as_ref()
            .is_some_and(|v| v.port == want.flannel_port);
        if on_flannels_port && foreign(l, bridge.index).is_none() {
            // Ours, but the config moved flannel.<VNI> to its port: made again on another.
            nl.del_link(l.index).await?;
            link = None;
        }
    }
    let link = match link {
        Some(link) => link,
        None => {
            create(nl, want).await?;
            changes += 1;
            match nl.link_by_name(DEVICE).await? {
                Some(link) => link,
                // Deleted at once by someone else: the next pass tries again.
                None => return Ok((changes, None)),
            }
        }
    };
    if let Some(why) = foreign(&link, bridge.index) {
        if !*warned {
            warn!(interface = DEVICE, bridge = %bridge.name, reason = %why,
                "an interface named {DEVICE} exists and is not weft's headroom device; leaving it alone. \
                 Encapsulation works but copies every small packet: rename or delete it (`ip link del {DEVICE}`)");
            *warned = true;
        }
        return Ok((changes, None));
    }
    *warned = false;
    if link.mtu != want.mtu {
        nl.set_link_mtu(link.index, want.mtu).await?;
        changes += 1;
    }
    if link.master != Some(bridge.index) {
        nl.set_link_master(link.index, bridge.index).await?;
        let room = nl.link_by_index(link.index).await?.and_then(|l| l.headroom);
        info!(interface = DEVICE, bridge = %bridge.name, headroom = ?room,
            "headroom device on the bridge: containers' packets get room for the outer headers");
        changes += 1;
    }
    Ok((changes, Some(link.index)))
}

/// Creates the device over IPv6 (84 bytes of headroom, enough for either
/// underlay), or over IPv4 (64) where the kernel has no IPv6.
async fn create(nl: &Netlink, want: Want) -> Result<(), NetlinkError> {
    match nl.add_vxlan(&want.spec(Ipv6Addr::UNSPECIFIED.into())).await {
        Ok(_) => Ok(()),
        Err(e) => {
            info!(interface = DEVICE, error = %e, "no IPv6 vxlan device here; the headroom device covers an IPv4 underlay");
            nl.add_vxlan(&want.spec(Ipv4Addr::UNSPECIFIED.into()))
                .await
                .map(|_| ())
        }
    }
}

/// Deletes the device if it is weft's (`weft agent --cleanup`, the kernel
/// datapath). Returns whether it did.
pub async fn remove(nl: &Netlink) -> Result<bool, NetlinkError> {
    let Some(link) = nl.link_by_name(DEVICE).await? else {
        return Ok(false);
    };
    // Ours on any bridge: only the bridge index may differ.
    if foreign(&link, link.master.unwrap_or(0)).is_some() {
        return Ok(false);
    }
    nl.del_link(link.index).await?;
    info!(interface = DEVICE, "headroom device removed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::VxlanAttrs;

    fn link(kind: &str, vni: u32, up: bool, master: Option<u32>) -> LinkInfo {
        LinkInfo {
            index: 9,
            name: DEVICE.into(),
            mtu: 1450,
            mac: Some(MAC),
            up,
            vxlan: (kind == "vxlan").then(|| VxlanAttrs {
                vni,
                ..Default::default()
            }),
            kind: Some(kind.into()),
            master,
            headroom: None,
        }
    }

    #[test]
    fn only_a_down_vxlan_device_with_our_vni_on_no_or_our_bridge_is_ours() {
        assert_eq!(foreign(&link("vxlan", VNI, false, None), 3), None);
        assert_eq!(foreign(&link("vxlan", VNI, false, Some(3)), 3), None);
        for (l, why) in [
            (link("dummy", VNI, false, None), "dummy device"),
            (link("vxlan", 1, false, None), "vni 1"),
            (link("vxlan", VNI, true, Some(3)), "it is up"),
            (link("vxlan", VNI, false, Some(4)), "another device"),
        ] {
            let got = foreign(&l, 3).unwrap_or_default();
            assert!(got.contains(why), "{got:?} should say {why:?}");
        }
    }

    #[test]
    fn the_port_never_equals_flannels() {
        for flannel_port in [0, 8472, 4789, u16::MAX] {
            let want = Want {
                mtu: 1450,
                flannel_port,
            };
            assert_ne!(want.port(), flannel_port);
            assert_ne!(want.port(), 0, "0 would be the kernel's default port");
        }
    }
}
