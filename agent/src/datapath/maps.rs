//! Typed access to the programs' maps: remote subnets, known VTEPs and local
//! containers of either family (one implementation over [`MapFamily`]), node
//! config, counters.

use std::{
    borrow::Borrow,
    fmt::Display,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
    Pod,
};
use weft_common::{
    counter, map_names, map_names6, Ipv4LpmData, Ipv6LpmData, LocalEndpoint, NodeConfig, PeerValue,
    PeerValue6, VtepValue,
};

use super::{Datapath, DatapathError};
use crate::{
    family::{IpFamily, IpNetwork},
    lease::MacAddr,
    turns::Turns,
};

/// What the IPv4 and IPv6 maps differ in: their names and the key and value
/// types the programs declare (the ABI, see `weft_common`). Everything else
/// about the peer, VTEP and local maps is one implementation over `A`.
pub trait MapFamily: IpFamily<Octets: Pod> {
    type Lpm: Pod;
    type Peer: Pod;
    const REMOTES: &'static str;
    const VTEPS: &'static str;
    const LOCAL: &'static str;
    fn lpm(addr_be: Self::Octets) -> Self::Lpm;
    fn lpm_addr(data: &Self::Lpm) -> Self::Octets;
    fn peer(vtep_ip_be: Self::Octets, vtep_mac: [u8; 6]) -> Self::Peer;
    fn peer_vtep(value: &Self::Peer) -> (Self::Octets, [u8; 6]);
}

// The families' map types have the same fields under different names.
macro_rules! map_families {
    ($($addr:ident, $lpm:ident, $peer:ident, $remotes:expr, $vteps:expr, $local:expr;)*) => {$(
        impl MapFamily for $addr {
            type Lpm = $lpm;
            type Peer = $peer;
            const REMOTES: &'static str = $remotes;
            const VTEPS: &'static str = $vteps;
            const LOCAL: &'static str = $local;
            fn lpm(addr_be: Self::Octets) -> $lpm {
                $lpm { addr_be }
            }
            fn lpm_addr(data: &$lpm) -> Self::Octets {
                data.addr_be
            }
            fn peer(vtep_ip_be: Self::Octets, vtep_mac: [u8; 6]) -> $peer {
                $peer { vtep_ip_be, vtep_mac, pad: [0; 2] }
            }
            fn peer_vtep(value: &$peer) -> (Self::Octets, [u8; 6]) {
                (value.vtep_ip_be, value.vtep_mac)
            }
        }
    )*};
}

map_families! {
    Ipv4Addr, Ipv4LpmData, PeerValue, map_names::REMOTES, map_names::KNOWN_VTEPS, map_names::LOCAL;
    Ipv6Addr, Ipv6LpmData, PeerValue6, map_names6::REMOTES6, map_names6::KNOWN_VTEPS6, map_names6::LOCAL6;
}

/// One remote subnet and the VTEP it is reached through (IPv4 unless `A` says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEntry<A: IpFamily = Ipv4Addr> {
    pub subnet: A::Net,
    /// The peer's `PublicIP` (`PublicIPv6`).
    pub vtep_ip: A,
    /// The peer's `flannel.N` (`flannel-v6.N`) MAC.
    pub vtep_mac: MacAddr,
}

/// One remote IPv6 subnet and the VTEP it is reached through.
pub type PeerEntry6 = PeerEntry<Ipv6Addr>;

/// A container on this host's bridge: decapsulated packets for `ip` go
/// straight into its namespace through the peer of `host_ifindex`. Bound from
/// the bridge's neighbour and forwarding entries, the same way for both families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalEntry<A: IpFamily = Ipv4Addr> {
    pub ip: A,
    /// The host end of the container's veth (a bridge port).
    pub host_ifindex: u32,
    pub mac: MacAddr,
    /// The bridge's MAC, the container's gateway.
    pub gateway_mac: MacAddr,
}

/// A container's IPv6 address on this host's bridge.
pub type LocalEntry6 = LocalEntry<Ipv6Addr>;

/// Counters summed over all CPUs, in index order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters {
    pub values: Vec<(&'static str, u64)>,
}

impl Counters {
    /// The value of counter `index` (see `weft_common::counter`), 0 when out of range.
    pub fn get(&self, index: u32) -> u64 {
        self.values.get(index as usize).map_or(0, |(_, v)| *v)
    }
}

pub(super) fn map_err(
    operation: impl Into<String>,
    map: &'static str,
) -> impl FnOnce(MapError) -> DatapathError {
    let operation = operation.into();
    move |source| DatapathError::Map {
        operation,
        map,
        source: Box::new(source),
    }
}

pub(super) fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

fn lpm_key<A: MapFamily>(subnet: A::Net) -> Key<A::Lpm> {
    let subnet = A::trunc(&subnet);
    Key::new(
        u32::from(A::prefix_len(&subnet)),
        A::lpm(A::network(&subnet).octets()),
    )
}

/// Removal where an absent entry is not an error.
fn removed(
    result: Result<(), MapError>,
    what: impl Display,
    map: &'static str,
) -> Result<(), DatapathError> {
    match result {
        Err(e) if !is_not_found(&e) => Err(map_err(format!("remove {what}"), map)(e)),
        _ => Ok(()),
    }
}

impl Datapath {
    /// The map `name` of the loaded object, typed as `M`.
    pub(super) fn open<'a, M>(&'a mut self, name: &'static str) -> Result<M, DatapathError>
    where
        M: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { map: name })?;
        M::try_from(map).map_err(map_err("open", name))
    }

    fn remotes<A: MapFamily>(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, A::Lpm, A::Peer>, DatapathError> {
        self.open(A::REMOTES)
    }

    fn vteps<A: MapFamily>(
        &mut self,
    ) -> Result<HashMap<&mut MapData, A::Octets, VtepValue>, DatapathError> {
        self.open(A::VTEPS)
    }

    fn local<A: MapFamily>(
        &mut self,
    ) -> Result<HashMap<&mut MapData, A::Octets, LocalEndpoint>, DatapathError> {
        self.open(A::LOCAL)
    }

    pub(super) fn config_map(&mut self) -> Result<Array<&mut MapData, NodeConfig>, DatapathError> {
        self.open(map_names::CONFIG)
    }

    /// Routes `subnet` to the VTEP at `vtep_ip` with MAC `vtep_mac` (replace semantics).
    pub fn upsert_peer<A: MapFamily>(
        &mut self,
        subnet: A::Net,
        vtep_ip: A,
        vtep_mac: MacAddr,
    ) -> Result<(), DatapathError> {
        let value = A::peer(vtep_ip.octets(), vtep_mac.0);
        self.remotes::<A>()?
            .insert(&lpm_key::<A>(subnet), value, 0)
            .map_err(map_err(format!("upsert {subnet} -> {vtep_ip}"), A::REMOTES))
    }

    /// Stops encapsulating for `subnet`; absent entries are not an error.
    pub fn remove_peer<N: IpNetwork<Family: MapFamily>>(
        &mut self,
        subnet: N,
    ) -> Result<(), DatapathError> {
        let result = self
            .remotes::<N::Family>()?
            .remove(&lpm_key::<N::Family>(subnet));
        removed(result, subnet, N::Family::REMOTES)
    }

    /// Every remote subnet of `A`'s family in the map, sorted.
    pub fn peers_of<A: MapFamily>(&mut self) -> Result<Vec<PeerEntry<A>>, DatapathError> {
        list_peers::<A, _>(&self.remotes::<A>()?)
    }

    /// [`Self::peers_of`] read in turns, for a reconcile pass that must stay interruptible.
    pub async fn peers_in_turns<A: MapFamily>(
        &mut self,
    ) -> Result<Vec<PeerEntry<A>>, DatapathError> {
        let map = self.remotes::<A>()?;
        let items = read_in_turns(map.iter()).await;
        Ok(peer_entries::<A>(
            items.map_err(map_err("list", A::REMOTES))?,
        ))
    }

    /// Every remote IPv4 subnet in the map, sorted.
    pub fn peers(&mut self) -> Result<Vec<PeerEntry>, DatapathError> {
        self.peers_of()
    }

    /// Every remote IPv6 subnet in the map, sorted.
    pub fn peers6(&mut self) -> Result<Vec<PeerEntry6>, DatapathError> {
        self.peers_of()
    }

    /// Accepts VXLAN from `ip` (a host whose lease has it as `PublicIP` or `PublicIPv6`).
    pub fn add_vtep<A: MapFamily>(&mut self, ip: A) -> Result<(), DatapathError> {
        self.vteps::<A>()?
            .insert(ip.octets(), VtepValue::default(), 0)
            .map_err(map_err(format!("add {ip}"), A::VTEPS))
    }

    /// Drops VXLAN from `ip` from now on; absent entries are not an error.
    pub fn remove_vtep<A: MapFamily>(&mut self, ip: A) -> Result<(), DatapathError> {
        let result = self.vteps::<A>()?.remove(&ip.octets());
        removed(result, ip, A::VTEPS)
    }

    /// The known VTEP addresses of `A`'s family, sorted.
    pub fn vteps_of<A: MapFamily>(&mut self) -> Result<Vec<A>, DatapathError> {
        list_vteps::<A, _>(&self.vteps::<A>()?)
    }

    /// [`Self::vteps_of`] read in turns, for a reconcile pass that must stay interruptible.
    pub async fn vteps_in_turns<A: MapFamily>(&mut self) -> Result<Vec<A>, DatapathError> {
        let map = self.vteps::<A>()?;
        let keys = read_in_turns(map.keys()).await;
        Ok(vtep_list::<A>(keys.map_err(map_err("list", A::VTEPS))?))
    }

    /// The known IPv4 VTEP addresses, sorted.
    pub fn vteps_list(&mut self) -> Result<Vec<Ipv4Addr>, DatapathError> {
        self.vteps_of()
    }

    /// The known IPv6 VTEP addresses, sorted.
    pub fn vteps6_list(&mut self) -> Result<Vec<Ipv6Addr>, DatapathError> {
        self.vteps_of()
    }

    /// Delivers decapsulated packets for `e.ip` straight to its container (replace semantics).
    pub fn upsert_local<A: MapFamily>(&mut self, e: &LocalEntry<A>) -> Result<(), DatapathError> {
        let value = LocalEndpoint {
            host_ifindex_ne: e.host_ifindex,
            mac: e.mac.0,
            gateway_mac: e.gateway_mac.0,
        };
        self.local::<A>()?
            .insert(e.ip.octets(), value, 0)
            .map_err(map_err(
                format!("upsert {} -> ifindex {}", e.ip, e.host_ifindex),
                A::LOCAL,
            ))
    }

    /// Sends packets for `ip` through the bridge again; absent entries are not an error.
    pub fn remove_local<A: MapFamily>(&mut self, ip: A) -> Result<(), DatapathError> {
        let result = self.local::<A>()?.remove(&ip.octets());
        removed(result, ip, A::LOCAL)
    }

    /// The local-container bindings of `A`'s family, sorted by address.
    pub fn locals_of<A: MapFamily>(&mut self) -> Result<Vec<LocalEntry<A>>, DatapathError> {
        list_locals::<A, _>(&self.local::<A>()?)
    }

    /// The local IPv4 bindings, sorted by address.
    pub fn locals(&mut self) -> Result<Vec<LocalEntry>, DatapathError> {
        self.locals_of()
    }

    /// The local IPv6 bindings, sorted by address.
    pub fn locals6(&mut self) -> Result<Vec<LocalEntry6>, DatapathError> {
        self.locals_of()
    }

    /// The node configuration currently in the map.
    pub fn node_config(&mut self) -> Result<NodeConfig, DatapathError> {
        self.config_map()?
            .get(&0, 0)
            .map_err(map_err("read node config", map_names::CONFIG))
    }

    pub(super) fn counter_map(&mut self) -> Result<PerCpuArray<&mut MapData, u64>, DatapathError> {
        self.open(map_names::COUNTERS)
    }

    /// All counters, each summed over the CPUs.
    pub fn counters(&mut self) -> Result<Counters, DatapathError> {
        sum_counters(&self.counter_map()?)
    }
}

// Readers shared by the loaded datapath and the pinned-state inspector.

pub(super) fn list_peers<A: MapFamily, T: Borrow<MapData>>(
    map: &LpmTrie<T, A::Lpm, A::Peer>,
) -> Result<Vec<PeerEntry<A>>, DatapathError> {
    let items = map.iter().collect::<Result<_, _>>();
    Ok(peer_entries::<A>(
        items.map_err(map_err("list", A::REMOTES))?,
    ))
}

/// The remote subnets among a peer map's entries, sorted.
fn peer_entries<A: MapFamily>(items: Vec<(Key<A::Lpm>, A::Peer)>) -> Vec<PeerEntry<A>> {
    let mut peers: Vec<PeerEntry<A>> = items
        .into_iter()
        .filter_map(|(key, value)| {
            let addr = A::from(A::lpm_addr(&key.data()));
            let subnet = A::net(addr, key.prefix_len() as u8)?;
            let (vtep_ip, vtep_mac) = A::peer_vtep(&value);
            Some(PeerEntry {
                subnet,
                vtep_ip: A::from(vtep_ip),
                vtep_mac: MacAddr(vtep_mac),
            })
        })
        .collect();
    peers.sort_by_key(|p| p.subnet);
    peers
}

pub(super) fn list_vteps<A: MapFamily, T: Borrow<MapData>>(
    map: &HashMap<T, A::Octets, VtepValue>,
) -> Result<Vec<A>, DatapathError> {
    let keys = map.keys().collect::<Result<_, _>>();
    Ok(vtep_list::<A>(keys.map_err(map_err("list", A::VTEPS))?))
}

fn vtep_list<A: MapFamily>(keys: Vec<A::Octets>) -> Vec<A> {
    let mut out: Vec<A> = keys.into_iter().map(A::from).collect();
    out.sort();
    out
}

/// Reads a map listing, giving the runtime a turn every [`crate::turns::TURN_ITEMS`] entries. Each entry is
/// one or two system calls that never yield: at 5000 peers one listing ran tens of ms in
/// which a reconcile pass could not be dropped for a lease event.
async fn read_in_turns<T>(
    items: impl Iterator<Item = Result<T, MapError>>,
) -> Result<Vec<T>, MapError> {
    let mut out = Vec::new();
    let mut turns = Turns::default();
    for item in items {
        out.push(item?);
        turns.tick().await;
    }
    Ok(out)
}

pub(super) fn list_locals<A: MapFamily, T: Borrow<MapData>>(
    map: &HashMap<T, A::Octets, LocalEndpoint>,
) -> Result<Vec<LocalEntry<A>>, DatapathError> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (ip, v) = item.map_err(map_err("list", A::LOCAL))?;
        out.push(LocalEntry {
            ip: A::from(ip),
            host_ifindex: v.host_ifindex_ne,
            mac: MacAddr(v.mac),
            gateway_mac: MacAddr(v.gateway_mac),
        });
    }
    out.sort_by_key(|e| e.ip);
    Ok(out)
}

pub(super) fn sum_counters<T: Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> Result<Counters, DatapathError> {
    let mut values = Vec::with_capacity(counter::COUNT as usize);
    for (index, name) in counter::NAMES.iter().enumerate() {
        let per_cpu = map
            .get(&(index as u32), 0)
            .map_err(map_err(format!("read counter {name}"), map_names::COUNTERS))?;
        values.push((*name, per_cpu.iter().sum()));
    }
    Ok(Counters { values })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reconcile pass is dropped for a lease event only at an await that returns `Pending`:
    /// a listing of thousands of map entries must give the runtime turns while it is read.
    #[tokio::test]
    async fn a_map_listing_is_read_in_turns() {
        let n = 5000;
        let entries = (0..n).map(Ok::<_, MapError>);
        let (all, turns) = crate::turns::count_turns(read_in_turns(entries)).await;
        let all = all.expect("an Ok listing reads");
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "every entry, in order");
        assert_eq!(
            turns,
            n / crate::turns::TURN_ITEMS,
            "turns given while reading {n} entries"
        );
    }
}
