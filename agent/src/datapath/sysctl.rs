//! The kernel settings the datapath depends on.

use tracing::{debug, info};

/// The namespace's default IPv4 TTL (`net.ipv4.ip_default_ttl`), the outer TTL
/// of a vxlan device with `ttl auto`; 64 (the kernel's default) if unreadable.
pub fn default_ttl() -> u8 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_default_ttl")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(64)
}

/// rp_filter could not be relaxed.
#[derive(Debug, thiserror::Error)]
#[error("set {path} to 2 (loose) so decapsulated packets from remote subnets pass reverse-path filtering: {source}")]
pub struct RpFilterError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// Decapsulated packets enter the stack on the external interface with a
/// source in a remote subnet, whose route points at flannel.N: strict reverse
/// path filtering (1) would drop them. The effective value is the maximum of
/// `all` and the interface's, so raising the interface to loose (2) suffices
/// and `all` stays as the administrator set it; 0 (off) is left alone.
pub fn relax_rp_filter(interface: &str) -> Result<(), RpFilterError> {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"))
            .ok()
            .and_then(|v| v.trim().parse::<u8>().ok())
            .unwrap_or(0)
    };
    let effective = read("all").max(read(interface));
    if effective != 1 {
        debug!(
            interface,
            rp_filter = effective,
            "reverse path filtering already lets decapsulated traffic in"
        );
        return Ok(());
    }
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter");
    std::fs::write(&path, "2").map_err(|source| RpFilterError {
        path: path.clone(),
        source,
    })?;
    info!(path = %path, "set reverse path filtering to loose for decapsulated traffic");
    Ok(())
}
