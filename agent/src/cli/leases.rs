//! `weft leases`: every subnet lease in etcd, as a table or JSON.

use clap::Args;
use serde::Serialize;

use super::etcd::EtcdArgs;
use super::exit;
use crate::lease::BackendAttrs;
use crate::subnet::{EtcdStore, SubnetError, SubnetStore};

#[derive(Debug, Args)]
pub struct LeasesArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row of the listing. Fields in alphabetical order: the JSON keeps the key order it always had.
#[derive(Debug, Serialize)]
struct Row {
    backend: String,
    expires_in_secs: Option<i64>,
    public_ip: String,
    subnet: String,
    vni: Option<u32>,
    vtep_mac: Option<String>,
}

pub async fn print(store: &EtcdStore, json: bool) -> Result<u8, SubnetError> {
    let listing = store.list_leases().await?;
    let mut rows = Vec::new();
    for l in &listing.leases {
        let (vtep_mac, vni) = match &l.attrs.backend {
            BackendAttrs::Vxlan { vni, vtep_mac } => (Some(vtep_mac.to_string()), *vni),
            _ => (None, None),
        };
        rows.push(Row {
            backend: l.attrs.backend.type_name().to_string(),
            expires_in_secs: store.ttl_left(l.etcd_lease).await?,
            public_ip: l.attrs.public_ip.to_string(),
            subnet: l.subnet.to_string(),
            vni,
            vtep_mac,
        });
    }
    if json {
        // Serializing plain strings and numbers cannot fail.
        println!("{}", serde_json::to_string(&rows).unwrap_or_default());
        return Ok(exit::OK);
    }
    println!(
        "{:<20} {:<16} {:<18} {:<8} EXPIRES IN",
        "SUBNET", "PUBLIC IP", "VTEP MAC", "BACKEND"
    );
    for r in &rows {
        let exp = r.expires_in_secs.map_or("-".to_string(), |t| {
            format!("{}h{:02}m{:02}s", t / 3600, t / 60 % 60, t % 60)
        });
        println!(
            "{:<20} {:<16} {:<18} {:<8} {exp}",
            r.subnet,
            r.public_ip,
            r.vtep_mac.as_deref().unwrap_or("-"),
            r.backend
        );
    }
    Ok(exit::OK)
}
