//! What the tests of weft's headroom device (ebpf_datapath.rs, docker.rs) share: reading a link
//! as the agent's netlink does, with the `needed_headroom` that iproute2 6.1 does not print.

/// The headroom device's name.
pub const DEVICE: &str = "weft-headroom";
/// What encapsulation adds in front of an IPv4 packet (outer Ethernet, IPv4, UDP, VXLAN).
pub const VXLAN_OVERHEAD: u16 = 50;

/// Link `name` in namespace `ns` (a name or a namespace file's path) as weft's netlink reads
/// it, with what `ip` may not print (`IFLA_HEADROOM`); `None` when there is none.
pub async fn link_in(ns: &str, name: &str) -> Option<weft::netlink::LinkInfo> {
    let name = name.to_owned();
    let thread = weft_tests::netns::spawn_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let nl = weft::netlink::Netlink::connect().expect("netlink");
            nl.link_by_name(&name).await.expect("get link")
        })
    });
    tokio::task::spawn_blocking(move || thread.join().expect("netlink thread"))
        .await
        .expect("join")
}
