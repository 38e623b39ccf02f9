//! The bridge side: encapsulation on every bridge port, and the local map
//! binding each container's address to its port and MAC, taken from the
//! kernel's own tables (the bridge's neighbour and forwarding entries).

use std::{collections::BTreeSet, net::Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, info, warn};

use super::{family::Local, headroom, EbpfBackend, EbpfBackendError};
use crate::{
    datapath::{Datapath, LocalEntry, LocalEntry6},
    lease::MacAddr,
    netlink::{BridgePortEntry, Interface, Neigh6Entry, NeighEntry, Netlink},
};

impl EbpfBackend {
    /// Brings the bridge's ports and containers into the datapath: encapsulation
    /// on every port's TC ingress (a container's frames are encapsulated before
    /// the bridge sees them; the bridge's own attachment catches the rest), and
    /// the local-container map. Returns the number of changes.
    pub(super) async fn sync_bridge(
        &mut self,
        nl: &Netlink,
        interfaces: &[Interface],
    ) -> Result<usize, EbpfBackendError> {
        let bridge = self.s.bridge.clone();
        let err = |source| EbpfBackendError::Bridge {
            bridge: bridge.clone(),
            source,
        };
        // Events queued until now are covered by the tables read below.
        if let (Some(watch), bridge) = (&mut self.watch, self.node.bridge_ifindex) {
            watch.drain(bridge);
        }
        let mut errors = Vec::new();
        let mut changes = 0;
        // Without the bridge (or before it is attached) nothing is bound.
        let mut want = Vec::new();
        let mut want6 = Vec::new();
        let link = match nl.link_by_name(&bridge).await {
            Ok(link) => link,
            Err(e) => return Err(err(e)),
        };
        if let Some(link) = &link {
            match self.sync_headroom(nl, link).await {
                Ok(n) => changes += n,
                Err(e) => errors.push(e),
            }
        }
        if let Some(link) = link.filter(|_| self.encap_attached) {
            let mut ports = nl.bridge_ports(link.index).await.map_err(err)?;
            // Not a container's: never encapsulated from, never bound.
            ports.retain(|(_, name)| name != headroom::DEVICE);
            match self.sync_port_attachments(interfaces, &ports) {
                Ok(n) => changes += n,
                Err(e) => errors.push(e),
            }
            let state = nl.bridge_state(link.index).await.map_err(err)?;
            let state = state.unwrap_or_default();
            match self.mirror_bridge_state(&state) {
                Ok(n) => changes += n,
                Err(e) => errors.push(e),
            }
            // The bridge neither takes frames from nor delivers to a port that does not forward.
            let forwarding: Vec<(u32, String)> = ports
                .iter()
                .filter(|(i, _)| state.forwarding.contains(i))
                .cloned()
                .collect();
            // Each family binds once its own subnet is known: an IPv6-only
            // lease has no IPv4 subnet, a dual-stack one may get IPv6 later.
            let own6 = self.node6.as_ref().and_then(|n| n.subnet);
            if let Some(gateway_mac) = link.mac.filter(|_| self.own.is_some() || own6.is_some()) {
                let learned = nl.bridge_learned(link.index).await.map_err(err)?;
                let neighbours = nl.neighbours_v4(link.index).await.map_err(err)?;
                let neighbours6 = match own6 {
                    Some(_) => nl.neighbours_v6(link.index).await.map_err(err)?,
                    None => Vec::new(),
                };
                if let Some(watch) = &mut self.watch {
                    watch.remember(&neighbours, &neighbours6, &learned);
                }
                let learned = with_aged_out(learned, &self.held());
                if let Some(own) = self.own {
                    want = local_entries(own, gateway_mac, &neighbours, &learned, &forwarding);
                }
                if let Some(own6) = own6 {
                    want6 = local_entries6(own6, gateway_mac, &neighbours6, &learned, &forwarding);
                }
            }
        }
        let (local, local_errors) = self.sync_local(&want);
        errors.extend(local_errors);
        let (local6, local_errors) = self.sync_local(&want6);
        errors.extend(local_errors);
        if !errors.is_empty() {
            return Err(EbpfBackendError::Steps(errors));
        }
        Ok(changes + local + local6)
    }

    /// The headroom device on the bridge ([`headroom`]).
    async fn sync_headroom(
        &mut self,
        nl: &Netlink,
        bridge: &crate::netlink::LinkInfo,
    ) -> Result<usize, EbpfBackendError> {
        let want = headroom::Want {
            mtu: self.s.vxlan.device_mtu(),
            flannel_port: self.s.vxlan.port(),
        };
        let (changes, ours) = headroom::ensure(nl, bridge, want, &mut self.headroom_warned)
            .await
            .map_err(|source| EbpfBackendError::Headroom {
                bridge: bridge.name.clone(),
                source,
            })?;
        // Its joining the bridge is no container's: no reason for another pass.
        if let Some(watch) = &mut self.watch {
            watch.ignore_port(ours);
        }
        Ok(changes)
    }

    /// (MAC, port) of every binding in both families' maps now.
    fn held(&mut self) -> Vec<(MacAddr, u32)> {
        fn of<L: Local>(dp: &mut Datapath) -> Vec<(MacAddr, u32)> {
            // A map that cannot be listed is reported by sync_local.
            L::list(dp)
                .unwrap_or_default()
                .iter()
                .map(|l| (l.mac(), l.port()))
                .collect()
        }
        let mut held = of::<LocalEntry>(&mut self.dp);
        held.extend(of::<LocalEntry6>(&mut self.dp));
        held
    }

    /// Tells the programs whether the bridge forwards at all (written before
    /// the bindings change, so a bridge going down stops the fast path at once).
    fn mirror_bridge_state(
        &mut self,
        state: &crate::netlink::BridgeState,
    ) -> Result<usize, EbpfBackendError> {
        if self.node.bridge_down != state.up {
            return Ok(0);
        }
        info!(bridge = %self.s.bridge, up = state.up, "bridge state changed; the eBPF path follows it");
        self.node.bridge_down = !state.up;
        self.write_node()?;
        Ok(1)
    }

    /// Encapsulation on exactly the current ports (re-attached where someone detached it).
    fn sync_port_attachments(
        &mut self,
        interfaces: &[Interface],
        ports: &[(u32, String)],
    ) -> Result<usize, EbpfBackendError> {
        let program = weft_common::program_names::TC_ENCAP;
        let mut changes = 0;
        for (_, name) in ports {
            let live = self.dp.pins().link(program, name).is_live(interfaces);
            if self.ports.contains(name) && live {
                continue;
            }
            let a = self.attach_encap(name)?;
            debug!(interface = %a.interface, adopted = a.adopted, "encapsulation attached to a bridge port");
            self.ports.insert(name.clone());
            changes += 1;
        }
        // Ports that left the bridge, also those a previous agent pinned.
        let pinned = self
            .dp
            .pins()
            .links()
            .into_iter()
            .filter(|l| l.program == program)
            .map(|l| l.interface);
        let gone: BTreeSet<String> = self
            .ports
            .iter()
            .cloned()
            .chain(pinned)
            .filter(|i| *i != self.s.bridge && !ports.iter().any(|(_, n)| n == i))
            .collect();
        for name in gone {
            self.dp
                .detach_encap(&name)
                .map_err(Self::map_err(format!("detach encapsulation from {name}")))?;
            self.ports.remove(&name);
            changes += 1;
        }
        Ok(changes)
    }

    /// Makes one family's local map hold exactly the bindings the kernel's
    /// tables give (`want`): first removes every other entry (stale, or
    /// written by anyone else), then writes the missing ones. Keeps going past
    /// errors, so a failed write never keeps a stale entry alive; returns the
    /// number of changes and the errors.
    fn sync_local<L: Local>(&mut self, want: &[L]) -> (usize, Vec<EbpfBackendError>) {
        let mut errors = Vec::new();
        let have = match L::list(&mut self.dp) {
            Ok(have) => have,
            Err(e) => {
                errors.push(Self::map_err("list local containers".into())(e));
                return (0, errors);
            }
        };
        let mut changes = 0;
        for stale in have
            .iter()
            .filter(|h| !want.iter().any(|w| w.ip() == h.ip()))
        {
            debug!(ip = %stale.ip(), port = stale.port(), "binding no longer in the bridge's tables");
            match L::remove(&mut self.dp, stale.ip()) {
                Ok(()) => changes += 1,
                Err(e) => errors.push(Self::map_err(format!("unbind {}", stale.ip()))(e)),
            }
        }
        for e in want.iter().filter(|e| !have.contains(e)) {
            debug!(ip = %e.ip(), port = e.port(), "container bound");
            match e.upsert(&mut self.dp) {
                Ok(()) => changes += 1,
                Err(err) => errors.push(Self::map_err(format!(
                    "bind {} to port {}",
                    e.ip(),
                    e.port()
                ))(err)),
            }
        }
        for e in &errors {
            warn!(error = %e, "local container binding");
        }
        (changes, errors)
    }
}

/// The bindings the kernel itself would deliver by: addresses of subnet
/// `own` whose neighbour entry on the bridge names a MAC (IP -> MAC) that the
/// bridge forwards to one of its current ports (MAC -> port).
fn local_entries(
    own: Ipv4Net,
    gateway_mac: MacAddr,
    neighbours: &[NeighEntry],
    learned: &[BridgePortEntry],
    ports: &[(u32, String)],
) -> Vec<LocalEntry> {
    let neighbours = neighbours
        .iter()
        .filter(|n| own.contains(&n.ip))
        .map(|n| (n.ip, n.mac));
    bindings(neighbours, learned, ports, |ip, host_ifindex, mac| {
        LocalEntry {
            ip,
            host_ifindex,
            mac,
            gateway_mac,
        }
    })
}

/// [`local_entries`] for IPv6: link-local and multicast addresses are never
/// a container's overlay address, whatever the subnet.
fn local_entries6(
    own: Ipv6Net,
    gateway_mac: MacAddr,
    neighbours: &[Neigh6Entry],
    learned: &[BridgePortEntry],
    ports: &[(u32, String)],
) -> Vec<LocalEntry6> {
    let neighbours = neighbours
        .iter()
        .filter(|n| own.contains(&n.ip) && !n.ip.is_multicast() && !is_link_local(n.ip))
        .map(|n| (n.ip, n.mac));
    bindings(neighbours, learned, ports, |ip, host_ifindex, mac| {
        LocalEntry6 {
            ip,
            host_ifindex,
            mac,
            gateway_mac,
        }
    })
}

fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The bridge's learned entries, plus the port of each `held` binding whose
/// MAC the bridge no longer lists anywhere. The encapsulation program takes a
/// container's frames at its port, before the bridge learns from them, so
/// while the container talks only through the fast path its entry ages out
/// (300 s by default) though it never moved; the kernel would still reach it
/// there (it floods unknown MACs). A MAC the bridge lists on another port
/// moved, and follows the bridge; a port that left the bridge takes its
/// bindings with it (they must be on a current forwarding port).
fn with_aged_out(
    mut learned: Vec<BridgePortEntry>,
    held: &[(MacAddr, u32)],
) -> Vec<BridgePortEntry> {
    let aged: Vec<BridgePortEntry> = held
        .iter()
        .filter(|(mac, _)| !learned.iter().any(|l| l.mac == *mac))
        .map(|&(mac, port_index)| BridgePortEntry { mac, port_index })
        .collect();
    learned.extend(aged);
    learned
}

/// Joins neighbour entries (IP -> MAC) with the bridge's forwarding entries
/// (MAC -> port) on the forwarding `ports`; sorted by address.
fn bindings<A: Ord + Copy, E>(
    neighbours: impl Iterator<Item = (A, Option<MacAddr>)>,
    learned: &[BridgePortEntry],
    ports: &[(u32, String)],
    entry: impl Fn(A, u32, MacAddr) -> E,
) -> Vec<E> {
    let mut out: Vec<(A, E)> = neighbours
        .filter_map(|(ip, mac)| {
            let mac = mac?;
            let port = learned
                .iter()
                .find(|p| p.mac == mac && ports.iter().any(|(i, _)| *i == p.port_index))?;
            Some((ip, entry(ip, port.port_index, mac)))
        })
        .collect();
    out.sort_by_key(|(ip, _)| *ip);
    out.into_iter().map(|(_, e)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_bindings_are_container_addresses_of_our_subnet_on_forwarding_ports() {
        let (a, b, gw) = (
            MacAddr([2, 0, 0, 0, 0, 0xa]),
            MacAddr([2, 0, 0, 0, 0, 0xb]),
            MacAddr([2, 0, 0, 0, 0, 1]),
        );
        let neigh = |ip: &str, mac| Neigh6Entry {
            ip: ip.parse().unwrap(),
            mac: Some(mac),
            permanent: false,
        };
        let neighbours = [
            neigh("fd00:10:0:5::3", a),
            neigh("fd00:10:0:5::4", b), // on a port that does not forward
            neigh("fd00:10:0:6::3", a), // another host's subnet
            neigh("fe80::a", a),        // link-local
            neigh("ff02::1", a),        // multicast
        ];
        let learned = [
            BridgePortEntry {
                mac: a,
                port_index: 7,
            },
            BridgePortEntry {
                mac: b,
                port_index: 8,
            },
        ];
        let own: Ipv6Net = "fd00:10:0:5::/64".parse().unwrap();
        let got = local_entries6(own, gw, &neighbours, &learned, &[(7, "veth7".into())]);
        assert_eq!(
            got,
            [LocalEntry6 {
                ip: "fd00:10:0:5::3".parse().unwrap(),
                host_ifindex: 7,
                mac: a,
                gateway_mac: gw,
            }]
        );
        // Link-local and multicast never bind, even inside a (silly) subnet covering them.
        let all: Ipv6Net = "::/0".parse().unwrap();
        let got = local_entries6(all, gw, &neighbours[2..], &learned, &[(7, "veth7".into())]);
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[test]
    fn a_binding_outlives_its_aged_out_forwarding_entry_but_not_a_move_or_its_port() {
        let (a, b, gw) = (
            MacAddr([2, 0, 0, 0, 0, 0xa]),
            MacAddr([2, 0, 0, 0, 0, 0xb]),
            MacAddr([2, 0, 0, 0, 0, 1]),
        );
        let own: Ipv4Net = "10.1.5.0/24".parse().unwrap();
        let neigh = |ip: &str, mac| NeighEntry {
            ip: ip.parse().unwrap(),
            mac: Some(mac),
            permanent: false,
        };
        let neighbours = [neigh("10.1.5.2", a), neigh("10.1.5.3", b)];
        let ports = [(7, "veth7".to_string()), (8, "veth8".to_string())];
        let bound =
            |learned: Vec<BridgePortEntry>, held: &[(MacAddr, u32)], ports: &[(u32, String)]| {
                local_entries(own, gw, &neighbours, &with_aged_out(learned, held), ports)
                    .iter()
                    .map(|e| (e.ip.to_string(), e.host_ifindex))
                    .collect::<Vec<_>>()
            };
        let at = |mac, port_index| BridgePortEntry { mac, port_index };
        // Both entries aged out: the bindings stay where they were.
        assert_eq!(
            bound(vec![], &[(a, 7), (b, 8)], &ports),
            [("10.1.5.2".into(), 7), ("10.1.5.3".into(), 8)]
        );
        // The bridge saw a's MAC on port 8: the binding follows it.
        assert_eq!(
            bound(vec![at(a, 8)], &[(a, 7)], &ports),
            [("10.1.5.2".into(), 8)]
        );
        // Port 7 left the bridge: its binding goes with it.
        assert_eq!(bound(vec![], &[(a, 7)], &ports[1..]), []);
        // Never bound, never learned: nothing.
        assert_eq!(bound(vec![], &[], &ports), []);
    }
}
