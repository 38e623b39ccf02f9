//! weft's test harness: a simulated cluster on one machine, as root.
//!
//! ```no_run
//! # async fn scenario() -> anyhow::Result<()> {
//! let c = weft_tests::cluster(3).await;
//! c.write_config(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#).await;
//! c.start_agents(&["--datapath", "kernel"])?;
//! c.add_containers(2).await?;
//! c.container(0).ping(c.container(4).ip()).await?;
//! c.container(0).tcp_transfer(&c.container(4), 1 << 20).await?;
//! # Ok(()) }
//! ```
//!
//! - [`Etcd`]: a real etcd per test, on 127.0.0.1 ([`Etcd::start_local`]) or on a cluster's underlay.
//! - [`Cluster`], [`Host`], [`Container`]: namespaces wired like hosts on one L2 network running Docker.
//! - [`Dockerd`]: a real dockerd per host, started from the agent's Docker options.
//! - [`Agent`]: `weft agent` as a real process inside a host, its log printed when the test panics.
//! - [`poll`]: waiting on observable state with a deadline, never on a fixed sleep.
//! - [`netns`], [`bpffs`], [`packet`], [`flanneld`]: namespaces, a private bpffs, hand-built frames,
//!   and flanneld's own kernel setup and lease bytes (the reference weft is compared with).
//! - [`Relay`]: a TCP relay between agents and etcd that a test cuts to reset their connections.
//! - [`nspawn::Machine`]: a Debian machine with a real systemd (`systemd-nspawn --boot`) inside a host.
//! - [`prev_build::PrevBuild`]: weft built from an earlier commit, with that commit's eBPF object.
//!
//! Every name (namespace, temp dir) carries the test process id and a counter so tests run in
//! parallel, and every handle cleans up what it made on drop, also when the test panics. A test
//! should fail by panicking (`unwrap`, `assert!`) rather than by returning `Err`: only a panic makes
//! the agents print their logs.

pub mod agent;
pub mod attack;
pub mod bpffs;
pub mod cluster;
pub mod container;
pub mod docker;
pub mod etcd;
pub mod flanneld;
pub mod keep;
pub mod netns;
pub mod nspawn;
pub mod packet;
pub mod pinger;
pub mod poll;
pub mod prev_build;
pub mod prometheus;
pub mod relay;
pub mod status;

pub use agent::{weft_bin, Agent};
pub use cluster::{cluster, Cluster, ClusterOptions, Host, SubnetEnv};
pub use container::{ping_outcome, ping_summary, Container, Transfer};
pub use docker::{DockerContainer, Dockerd};
pub use etcd::{Etcd, EtcdCluster};
pub use keep::{Kept, KeptProcess};
pub use netns::Netns;
pub use pinger::{PingCount, Pinger};
pub use relay::Relay;

/// The last `n` lines of `text` (an agent's or etcd's log), for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits for every task of `set` and panics listing the ones that failed, as "`what`: N of M
/// failed" followed by their messages.
pub async fn assert_all_ok(set: tokio::task::JoinSet<Result<(), String>>, what: &str) {
    let results = set.join_all().await;
    let total = results.len();
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failures.is_empty(),
        "{what}: {} of {total} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
