//! What differs between the IPv4 and IPv6 maps, so that one reconcile keeps
//! either family's peer and local maps equal to what they should hold.

use std::{
    fmt::Display,
    future::Future,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::datapath::{Datapath, DatapathError, LocalEntry, LocalEntry6, PeerEntry, PeerEntry6};
use crate::lease::MacAddr;

/// A remote-subnet entry of one family and its maps.
pub(super) trait Peer: Copy + PartialEq {
    type Net: Ord + Copy + Display;
    type Ip: Ord + Copy + Display;
    fn subnet(&self) -> Self::Net;
    fn vtep(&self) -> Self::Ip;
    /// The map's entries, read in turns (a reconcile pass stays interruptible).
    fn list(dp: &mut Datapath) -> impl Future<Output = Result<Vec<Self>, DatapathError>> + Send;
    /// The known VTEPs, read in turns.
    fn vteps(
        dp: &mut Datapath,
    ) -> impl Future<Output = Result<Vec<Self::Ip>, DatapathError>> + Send;
    fn remove(dp: &mut Datapath, subnet: Self::Net) -> Result<(), DatapathError>;
    fn remove_vtep(dp: &mut Datapath, vtep: Self::Ip) -> Result<(), DatapathError>;
    fn add_vtep(dp: &mut Datapath, vtep: Self::Ip) -> Result<(), DatapathError>;
    fn upsert(&self, dp: &mut Datapath) -> Result<(), DatapathError>;
}

/// A local container binding of one family and its map.
pub(super) trait Local: Copy + PartialEq {
    type Ip: PartialEq + Copy + Display;
    fn ip(&self) -> Self::Ip;
    fn port(&self) -> u32;
    fn mac(&self) -> MacAddr;
    fn list(dp: &mut Datapath) -> Result<Vec<Self>, DatapathError>;
    fn remove(dp: &mut Datapath, ip: Self::Ip) -> Result<(), DatapathError>;
    fn upsert(&self, dp: &mut Datapath) -> Result<(), DatapathError>;
}

macro_rules! families {
    ($($peer:ty, $net:ty, $ip:ty, $local:ty,
       $remove_peer:ident, $remove_vtep:ident, $add_vtep:ident,
       $upsert_peer:ident, $locals:ident, $remove_local:ident, $upsert_local:ident;)*) => {$(
        impl Peer for $peer {
            type Net = $net;
            type Ip = $ip;
            fn subnet(&self) -> $net {
                self.subnet
            }
            fn vtep(&self) -> $ip {
                self.vtep_ip
            }
            async fn list(dp: &mut Datapath) -> Result<Vec<Self>, DatapathError> {
                dp.peers_in_turns::<$ip>().await
            }
            async fn vteps(dp: &mut Datapath) -> Result<Vec<$ip>, DatapathError> {
                dp.vteps_in_turns::<$ip>().await
            }
            fn remove(dp: &mut Datapath, subnet: $net) -> Result<(), DatapathError> {
                dp.$remove_peer(subnet)
            }
            fn remove_vtep(dp: &mut Datapath, vtep: $ip) -> Result<(), DatapathError> {
                dp.$remove_vtep(vtep)
            }
            fn add_vtep(dp: &mut Datapath, vtep: $ip) -> Result<(), DatapathError> {
                dp.$add_vtep(vtep)
            }
            fn upsert(&self, dp: &mut Datapath) -> Result<(), DatapathError> {
                dp.$upsert_peer(self.subnet, self.vtep_ip, self.vtep_mac)
            }
        }

        impl Local for $local {
            type Ip = $ip;
            fn ip(&self) -> $ip {
                self.ip
            }
            fn port(&self) -> u32 {
                self.host_ifindex
            }
            fn mac(&self) -> MacAddr {
                self.mac
            }
            fn list(dp: &mut Datapath) -> Result<Vec<Self>, DatapathError> {
                dp.$locals()
            }
            fn remove(dp: &mut Datapath, ip: $ip) -> Result<(), DatapathError> {
                dp.$remove_local(ip)
            }
            fn upsert(&self, dp: &mut Datapath) -> Result<(), DatapathError> {
                dp.$upsert_local(self)
            }
        }
    )*};
}

families! {
    PeerEntry, Ipv4Net, Ipv4Addr, LocalEntry,
        remove_peer, remove_vtep, add_vtep, upsert_peer,
        locals, remove_local, upsert_local;
    PeerEntry6, Ipv6Net, Ipv6Addr, LocalEntry6,
        remove_peer, remove_vtep, add_vtep, upsert_peer,
        locals6, remove_local, upsert_local;
}
