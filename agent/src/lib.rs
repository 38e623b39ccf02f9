//! weft: a flannel-compatible overlay network agent with an eBPF VXLAN datapath.
//!
//! Layering (see STYLE.md): only [`datapath`] touches aya, only [`netlink`]
//! touches rtnetlink, only [`subnet::etcd`] touches etcd-client. Everything else
//! speaks domain types ([`lease::Lease`], [`lease::LeaseEvent`], [`config::NetworkConfig`]).

pub mod agent;
pub mod backend;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod family;
pub mod files;
pub mod health;
pub mod iface;
pub mod lease;
pub mod masq;
pub mod metrics;
pub mod netlink;
pub mod notify;
pub mod status;
pub mod subnet;
pub mod telemetry;
pub(crate) mod turns;
