//! Typed access to the programs' maps: remote subnets, known VTEPs, local
//! containers, node config, counters.

use std::{borrow::Borrow, net::Ipv4Addr};

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray};
use ipnet::Ipv4Net;
use weft_common::{
    counter, map_names, Ipv4LpmData, LocalEndpoint, NodeConfig, PeerValue, VtepValue,
};

use super::{Datapath, DatapathError};
use crate::lease::MacAddr;

/// One remote subnet and the VTEP it is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEntry {
    pub subnet: Ipv4Net,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
}

/// A container on this host's bridge: decapsulated packets for `ip` go
/// straight into its namespace through the peer of `host_ifindex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalEntry {
    pub ip: Ipv4Addr,
    /// The host end of the container's veth (a bridge port).
    pub host_ifindex: u32,
    pub mac: MacAddr,
    /// The bridge's MAC, the container's gateway.
    pub gateway_mac: MacAddr,
}

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

fn lpm_key(subnet: Ipv4Net) -> Key<Ipv4LpmData> {
    let subnet = subnet.trunc();
    Key::new(
        u32::from(subnet.prefix_len()),
        Ipv4LpmData {
            addr_be: subnet.network().octets(),
        },
    )
}

impl Datapath {
    fn map_data(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { map: name })
    }

    fn remotes(&mut self) -> Result<LpmTrie<&mut MapData, Ipv4LpmData, PeerValue>, DatapathError> {
        LpmTrie::try_from(self.map_data(map_names::REMOTES)?)
            .map_err(map_err("open", map_names::REMOTES))
    }

    fn vteps(&mut self) -> Result<HashMap<&mut MapData, [u8; 4], VtepValue>, DatapathError> {
        HashMap::try_from(self.map_data(map_names::KNOWN_VTEPS)?)
            .map_err(map_err("open", map_names::KNOWN_VTEPS))
    }

    fn local(&mut self) -> Result<HashMap<&mut MapData, [u8; 4], LocalEndpoint>, DatapathError> {
        HashMap::try_from(self.map_data(map_names::LOCAL)?)
            .map_err(map_err("open", map_names::LOCAL))
    }

    pub(super) fn config_map(&mut self) -> Result<Array<&mut MapData, NodeConfig>, DatapathError> {
        Array::try_from(self.map_data(map_names::CONFIG)?)
            .map_err(map_err("open", map_names::CONFIG))
    }

    /// Routes `subnet` to the VTEP at `vtep_ip` with MAC `vtep_mac` (replace semantics).
    pub fn upsert_peer(
        &mut self,
        subnet: Ipv4Net,
        vtep_ip: Ipv4Addr,
        vtep_mac: MacAddr,
    ) -> Result<(), DatapathError> {
        let value = PeerValue {
            vtep_ip_be: vtep_ip.octets(),
            vtep_mac: vtep_mac.0,
            pad: [0; 2],
        };
        self.remotes()?
            .insert(&lpm_key(subnet), value, 0)
            .map_err(map_err(
                format!("upsert {subnet} -> {vtep_ip}"),
                map_names::REMOTES,
            ))
    }

    /// Stops encapsulating for `subnet`; absent entries are not an error.
    pub fn remove_peer(&mut self, subnet: Ipv4Net) -> Result<(), DatapathError> {
        match self.remotes()?.remove(&lpm_key(subnet)) {
            Err(e) if !is_not_found(&e) => {
                Err(map_err(format!("remove {subnet}"), map_names::REMOTES)(e))
            }
            _ => Ok(()),
        }
    }

    /// Every remote subnet in the map, sorted.
    pub fn peers(&mut self) -> Result<Vec<PeerEntry>, DatapathError> {
        list_peers(&self.remotes()?)
    }

    /// Accepts VXLAN from `ip` (a host holding a lease).
    pub fn add_vtep(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.vteps()?
            .insert(ip.octets(), VtepValue::default(), 0)
            .map_err(map_err(format!("add {ip}"), map_names::KNOWN_VTEPS))
    }

    /// Drops VXLAN from `ip` from now on; absent entries are not an error.
    pub fn remove_vtep(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        match self.vteps()?.remove(&ip.octets()) {
            Err(e) if !is_not_found(&e) => {
                Err(map_err(format!("remove {ip}"), map_names::KNOWN_VTEPS)(e))
            }
            _ => Ok(()),
        }
    }

    /// The known VTEP addresses, sorted.
    pub fn vteps_list(&mut self) -> Result<Vec<Ipv4Addr>, DatapathError> {
        list_vteps(&self.vteps()?)
    }

    /// Delivers decapsulated packets for `e.ip` straight to its container (replace semantics).
    pub fn upsert_local(&mut self, e: &LocalEntry) -> Result<(), DatapathError> {
        let value = LocalEndpoint {
            host_ifindex_ne: e.host_ifindex,
            mac: e.mac.0,
            gateway_mac: e.gateway_mac.0,
        };
        self.local()?
            .insert(e.ip.octets(), value, 0)
            .map_err(map_err(
                format!("upsert {} -> ifindex {}", e.ip, e.host_ifindex),
                map_names::LOCAL,
            ))
    }

    /// Sends packets for `ip` through the bridge again; absent entries are not an error.
    pub fn remove_local(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        match self.local()?.remove(&ip.octets()) {
            Err(e) if !is_not_found(&e) => {
                Err(map_err(format!("remove {ip}"), map_names::LOCAL)(e))
            }
            _ => Ok(()),
        }
    }

    /// The local-container bindings, sorted by address.
    pub fn locals(&mut self) -> Result<Vec<LocalEntry>, DatapathError> {
        list_locals(&self.local()?)
    }

    /// The node configuration currently in the map.
    pub fn node_config(&mut self) -> Result<NodeConfig, DatapathError> {
        self.config_map()?
            .get(&0, 0)
            .map_err(map_err("read node config", map_names::CONFIG))
    }

    pub(super) fn counter_map(&mut self) -> Result<PerCpuArray<&mut MapData, u64>, DatapathError> {
        PerCpuArray::try_from(self.map_data(map_names::COUNTERS)?)
            .map_err(map_err("open", map_names::COUNTERS))
    }

    /// All counters, each summed over the CPUs.
    pub fn counters(&mut self) -> Result<Counters, DatapathError> {
        sum_counters(&self.counter_map()?)
    }
}

// Readers shared by the loaded datapath and the pinned-state inspector.

pub(super) fn list_peers<T: Borrow<MapData>>(
    map: &LpmTrie<T, Ipv4LpmData, PeerValue>,
) -> Result<Vec<PeerEntry>, DatapathError> {
    let mut peers = Vec::new();
    for item in map.iter() {
        let (key, value) = item.map_err(map_err("list", map_names::REMOTES))?;
        let addr = Ipv4Addr::from(key.data().addr_be);
        let Ok(subnet) = Ipv4Net::new(addr, key.prefix_len() as u8) else {
            continue;
        };
        peers.push(PeerEntry {
            subnet,
            vtep_ip: Ipv4Addr::from(value.vtep_ip_be),
            vtep_mac: MacAddr(value.vtep_mac),
        });
    }
    peers.sort_by_key(|p| p.subnet);
    Ok(peers)
}

pub(super) fn list_vteps<T: Borrow<MapData>>(
    map: &HashMap<T, [u8; 4], VtepValue>,
) -> Result<Vec<Ipv4Addr>, DatapathError> {
    let mut out = Vec::new();
    for key in map.keys() {
        out.push(Ipv4Addr::from(
            key.map_err(map_err("list", map_names::KNOWN_VTEPS))?,
        ));
    }
    out.sort();
    Ok(out)
}

pub(super) fn list_locals<T: Borrow<MapData>>(
    map: &HashMap<T, [u8; 4], LocalEndpoint>,
) -> Result<Vec<LocalEntry>, DatapathError> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (ip, v) = item.map_err(map_err("list", map_names::LOCAL))?;
        out.push(LocalEntry {
            ip: Ipv4Addr::from(ip),
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
