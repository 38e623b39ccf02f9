//! What flanneld does to a host, done by hand with the commands FLANNEL-COMPAT.md lists: the
//! reference the tests compare weft's kernel state with, and the "flanneld host" that weft hosts
//! must interoperate with. Also flanneld's lease bytes and keys.
//!
//! Commands are argv lists (`ip ...`, `bridge ...`) so sync and async callers run the same ones
//! in a namespace with [`run`] or [`run_blocking`].

use std::net::Ipv4Addr;

use anyhow::Context as _;
pub use ipnet::Ipv4Net;

use crate::{Cluster, Etcd, Host, Netns};

/// flanneld's VXLAN device, VNI and port.
pub const DEVICE: &str = "flannel.1";
pub const VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;

/// The lease value flanneld writes for a vxlan node: its exact bytes, no trailing newline.
pub fn lease_value(public_ip: Ipv4Addr, vtep_mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":{VNI},"VtepMAC":"{vtep_mac}"}}}}"#
    )
}

/// The etcd key of the lease on `subnet` under `prefix` (e.g. `/coreos.com/network`).
pub fn lease_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{prefix}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// flannel.1's MTU on an underlay of 1500.
pub const MTU: u32 = 1450;

/// The subnet file flanneld writes for `subnet` (the host's address in it is `.1`).
pub fn subnet_env(network: &str, subnet: Ipv4Net, mtu: u32) -> String {
    format!(
        "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n",
        Ipv4Addr::from(u32::from(subnet.network()) + 1),
        subnet.prefix_len()
    )
}

/// Put flanneld's lease for a vxlan node into etcd as flanneld does: its exact value, attached to
/// an etcd lease of 24 h. Returns the value.
pub async fn put_lease(
    etcd: &Etcd,
    prefix: &str,
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
    vtep_mac: &str,
) -> anyhow::Result<String> {
    let granted = etcd.etcdctl(&["lease", "grant", "86400"]).await?;
    // "lease 694d7b5f2ae3a10c granted with TTL(86400s)"
    let id = granted
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("no lease id in {granted:?}"))?;
    let (key, value) = (lease_key(prefix, subnet), lease_value(public_ip, vtep_mac));
    etcd.etcdctl(&["put", &format!("--lease={id}"), &key, &value])
        .await?;
    Ok(value)
}

/// flannel.1's MAC in `ns`.
pub async fn device_mac(ns: &Netns) -> anyhow::Result<String> {
    let out = ns.ip(&["-j", "link", "show", DEVICE]).await?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parse ip -j link")?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{DEVICE} has no MAC: {out}"))
}

/// Make `host` a flanneld host holding `subnet` of `network`: flannel.1 as flanneld creates it,
/// its lease in etcd ([`put_lease`]) and its subnet file (from which the harness addresses
/// docker0, as Docker would). Returns flannel.1's MAC. Peers are added with [`vxlan_peer`].
pub async fn host_by_hand(
    c: &Cluster,
    host: &Host,
    network: &str,
    subnet: Ipv4Net,
) -> anyhow::Result<String> {
    let ns = host.netns();
    run(
        ns.name(),
        &vxlan_device(host.ens32_ip(), subnet, None, MTU, &[]),
    )
    .await?;
    let mac = device_mac(ns).await?;
    put_lease(c.etcd(), c.prefix(), subnet, host.ens32_ip(), &mac).await?;
    std::fs::write(host.subnet_file(), subnet_env(network, subnet, MTU))
        .with_context(|| format!("write {}", host.subnet_file().display()))?;
    Ok(mac)
}

/// flanneld's IPv6 VXLAN device (dual stack).
pub const DEVICE_V6: &str = "flannel-v6.1";

/// The lease value flanneld writes for a dual-stack vxlan node: `PublicIPv6` and `BackendV6Data`.
pub fn dual_lease_value(
    public_ip: Ipv4Addr,
    public_ipv6: std::net::Ipv6Addr,
    vtep_mac: &str,
    vtep_mac6: &str,
) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ipv6}","BackendType":"vxlan","BackendData":{{"VNI":{VNI},"VtepMAC":"{vtep_mac}"}},"BackendV6Data":{{"VNI":{VNI},"VtepMAC":"{vtep_mac6}"}}}}"#
    )
}

/// flannel-v6.1 as flanneld creates it over the IPv6 underlay on ens32, holding `<own>/128`.
pub fn vxlan_device_v6(local: std::net::Ipv6Addr, own: ipnet::Ipv6Net) -> Vec<Vec<String>> {
    vec![
        argv(format!(
            "ip link add {DEVICE_V6} type vxlan id {VNI} local {local} dev ens32 \
             dstport {VXLAN_PORT} nolearning"
        )),
        argv(format!(
            "ip -6 addr add {}/128 dev {DEVICE_V6} nodad",
            own.network()
        )),
        argv(format!("ip link set {DEVICE_V6} up")),
    ]
}

/// flanneld's three IPv6 entries for a dual-stack vxlan peer, on flannel-v6.1.
pub fn vxlan_peer_v6(
    subnet: ipnet::Ipv6Net,
    public_ipv6: std::net::Ipv6Addr,
    vtep_mac: &str,
) -> Vec<Vec<String>> {
    let gw = subnet.network();
    vec![
        argv(format!(
            "ip -6 neigh replace {gw} dev {DEVICE_V6} lladdr {vtep_mac} nud permanent"
        )),
        argv(format!(
            "bridge fdb replace {vtep_mac} dev {DEVICE_V6} dst {public_ipv6} self permanent"
        )),
        argv(format!(
            "ip -6 route replace {subnet} via {gw} dev {DEVICE_V6} onlink"
        )),
    ]
}

/// [`host_by_hand`] for a dual-stack flanneld host: flannel.1 and flannel-v6.1, the `v4&v6` lease
/// with flanneld's value, and the subnet file with its IPv6 lines. Returns both MACs.
pub async fn dual_host_by_hand(
    c: &Cluster,
    host: &Host,
    (network, subnet): (&str, Ipv4Net),
    (network6, subnet6): (&str, ipnet::Ipv6Net),
) -> anyhow::Result<(String, String)> {
    let ns = host.netns();
    run(
        ns.name(),
        &vxlan_device(host.ens32_ip(), subnet, None, MTU, &[]),
    )
    .await?;
    run(ns.name(), &vxlan_device_v6(host.ens32_ipv6(), subnet6)).await?;
    let mac = device_mac(ns).await?;
    let out = ns.ip(&["-j", "link", "show", DEVICE_V6]).await?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parse ip -j link")?;
    let mac6 = v[0]["address"].as_str().unwrap_or_default().to_owned();
    let key = format!(
        "{}&{}-{}",
        lease_key(c.prefix(), subnet),
        subnet6.network(),
        subnet6.prefix_len()
    );
    let value = dual_lease_value(host.ens32_ip(), host.ens32_ipv6(), &mac, &mac6);
    c.etcd().etcdctl(&["put", &key, &value]).await?;
    let env = subnet_env(network, subnet, MTU).replacen(
        "FLANNEL_MTU",
        &format!(
            "FLANNEL_IPV6_NETWORK={network6}\nFLANNEL_IPV6_SUBNET={}/{}\nFLANNEL_MTU",
            std::net::Ipv6Addr::from(u128::from(subnet6.network()) + 1),
            subnet6.prefix_len()
        ),
        1,
    );
    std::fs::write(host.subnet_file(), env)
        .with_context(|| format!("write {}", host.subnet_file().display()))?;
    Ok((mac, mac6))
}

fn argv(line: String) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

/// flannel.1 as flanneld creates it on a host whose underlay address `local` is on `ens32` and
/// that holds `own`: with `mac` when given (a restart keeps the advertised MAC), `mtu`, and any
/// `extra` vxlan options (`ttl inherit`).
pub fn vxlan_device(
    local: Ipv4Addr,
    own: Ipv4Net,
    mac: Option<&str>,
    mtu: u32,
    extra: &[&str],
) -> Vec<Vec<String>> {
    let address = mac.map(|m| format!("address {m} ")).unwrap_or_default();
    vec![
        argv(format!(
            "ip link add {DEVICE} {address}type vxlan id {VNI} local {local} dev ens32 \
             dstport {VXLAN_PORT} nolearning {}",
            extra.join(" ")
        )),
        argv(format!("ip link set {DEVICE} mtu {mtu}")),
        argv(format!("ip addr add {}/32 dev {DEVICE}", own.network())),
        argv(format!("ip link set {DEVICE} up")),
    ]
}

/// flanneld's three entries for a vxlan peer, in its order: neighbour, fdb entry, onlink route.
pub fn vxlan_peer(subnet: Ipv4Net, public_ip: Ipv4Addr, vtep_mac: &str) -> Vec<Vec<String>> {
    let gw = subnet.network();
    vec![
        argv(format!(
            "ip neigh replace {gw} dev {DEVICE} lladdr {vtep_mac} nud permanent"
        )),
        argv(format!(
            "bridge fdb replace {vtep_mac} dev {DEVICE} dst {public_ip} self permanent"
        )),
        argv(format!(
            "ip route replace {subnet} via {gw} dev {DEVICE} onlink"
        )),
    ]
}

/// flanneld's host-gw route (also vxlan's DirectRouting route) to a peer; `dev` pins the device.
pub fn host_gw_peer(subnet: Ipv4Net, public_ip: Ipv4Addr, dev: Option<&str>) -> Vec<Vec<String>> {
    let dev = dev.map(|d| format!(" dev {d}")).unwrap_or_default();
    vec![argv(format!(
        "ip route replace {subnet} via {public_ip}{dev}"
    ))]
}

/// `program -n <ns> args...` for each command (`ip` and `bridge` both take `-n`).
fn in_ns(ns: &str, cmd: &[String]) -> (String, Vec<String>) {
    let (program, args) = cmd.split_first().expect("a command has a program");
    let mut full = vec!["-n".to_owned(), ns.to_owned()];
    full.extend(args.iter().cloned());
    (program.clone(), full)
}

/// Run `cmds` in namespace `ns`, stopping at the first failure (named with its output).
pub async fn run(ns: &str, cmds: &[Vec<String>]) -> anyhow::Result<()> {
    for cmd in cmds {
        let (program, args) = in_ns(ns, cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::netns::run(&program, &args).await?;
    }
    Ok(())
}

/// [`run`] for synchronous tests.
pub fn run_blocking(ns: &str, cmds: &[Vec<String>]) -> anyhow::Result<()> {
    for cmd in cmds {
        let (program, args) = in_ns(ns, cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::netns::run_blocking(&program, &args)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_value_is_flanneld_s_bytes() {
        // Observed on flanneld v0.20.2 (FLANNEL-COMPAT.md): 122 bytes, no trailing newline.
        let v = lease_value(Ipv4Addr::new(172, 31, 250, 21), "a6:f8:8a:19:15:7a");
        assert_eq!(
            v,
            r#"{"PublicIP":"172.31.250.21","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"a6:f8:8a:19:15:7a"}}"#
        );
        assert_eq!(v.len(), 122);
        assert_eq!(
            lease_key("/coreos.com/network", "10.1.54.0/24".parse().unwrap()),
            "/coreos.com/network/subnets/10.1.54.0-24"
        );
    }

    #[test]
    fn peer_commands_are_flannel_compat_s() {
        let cmds = vxlan_peer(
            "10.1.54.0/24".parse().unwrap(),
            Ipv4Addr::new(172, 16, 15, 22),
            "0e:00:00:00:00:01",
        );
        let lines: Vec<String> = cmds.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            lines,
            [
                "ip neigh replace 10.1.54.0 dev flannel.1 lladdr 0e:00:00:00:00:01 nud permanent",
                "bridge fdb replace 0e:00:00:00:00:01 dev flannel.1 dst 172.16.15.22 self permanent",
                "ip route replace 10.1.54.0/24 via 10.1.54.0 dev flannel.1 onlink",
            ]
        );
        let (program, args) = in_ns("h1", &cmds[1]);
        assert_eq!(
            (program.as_str(), &args[..2]),
            ("bridge", &["-n".to_owned(), "h1".to_owned()][..])
        );
    }
}
