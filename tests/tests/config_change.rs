//! A changed network config is applied by the running agent, without a service manager to start
//! it again: same process, new config in the subnet file and on `flannel.1`, the eBPF datapath
//! adopted and carrying traffic. Root only: `cargo xtask test` runs it.

use std::time::Duration;

use weft_tests::attack::{self, Datapath};
use weft_tests::{poll, Host, SubnetEnv};

/// How long an agent may take to notice the change (it compares at every reconcile, 1 s here)
/// and to come back with the new config.
const APPLIED: Duration = Duration::from_secs(30);

fn subnet_env(host: &Host) -> Result<SubnetEnv, String> {
    let path = host.subnet_file();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    SubnetEnv::parse(&text).map_err(|e| format!("{e:#}"))
}

async fn flannel_mtu(host: &Host) -> Result<u32, String> {
    let out = host
        .netns()
        .ip(&["-j", "link", "show", "flannel.1"])
        .await
        .map_err(|e| format!("{e:#}"))?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    v[0]["mtu"]
        .as_u64()
        .map(|m| m as u32)
        .ok_or_else(|| format!("no mtu in {out}"))
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn a_changed_config_is_applied_by_the_running_agent() {
    let c = attack::start(Datapath::Ebpf, 2, 1, &["--reconcile-interval", "1s"]).await;
    let pids: Vec<Option<u32>> = c.hosts().iter().map(|h| h.agent()?.pid()).collect();
    let before: Vec<SubnetEnv> = c
        .hosts()
        .iter()
        .map(|h| subnet_env(h).expect("subnet file at start"))
        .collect();
    assert_ne!(
        before[0].mtu, 1350,
        "the start must not have the MTU the test sets"
    );

    // Backend.MTU 1400: flannel.1 and FLANNEL_MTU become 1400 - 50.
    c.write_config(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","MTU":1400}}"#)
        .await;
    for (h, old) in c.hosts().iter().zip(&before) {
        poll::until(
            &format!("{}: FLANNEL_MTU 1350 and flannel.1 mtu 1350", h.name()),
            APPLIED,
            || async {
                let env = subnet_env(h)?;
                let mtu = flannel_mtu(h).await?;
                poll::check(env.mtu == 1350 && mtu == 1350, (env.mtu, mtu))
            },
        )
        .await;
        let env = subnet_env(h).expect("subnet file");
        assert_eq!(env.subnet, old.subnet, "{}: the lease was kept", h.name());
    }
    for (h, pid) in c.hosts().iter().zip(&pids) {
        let agent = h.agent().expect("agent");
        assert_eq!(
            agent.exit_status(),
            None,
            "{}: the agent exited on a config change; log:\n{}",
            h.name(),
            agent.log()
        );
        assert_eq!(agent.pid(), *pid, "{}: same process", h.name());
        assert!(
            agent.log().contains("starting over"),
            "{}: no restart of the run loop in the log:\n{}",
            h.name(),
            agent.log()
        );
        // The pinned datapath was adopted again, every program attached with the peer in its map.
        attack::wait_ebpf_ready(h, 1).await;
    }
    attack::legit_traffic_flows(&c, Datapath::Ebpf, "after the config change").await;
}
