//! Operations on the harness (3 hosts, a real etcd, `weft agent` as processes): `--ip-masq` towards a
//! "world" outside the overlay, `/readyz` and `/metrics` of running agents, the interface choice
//! flags, and the systemd unit's command lines run by hand inside a host.
//!
//! ```text
//!  switch ns: br0 172.16.15.1/24 (etcd)
//!     |-- host1 ens32 .21   host2 ens32 .22   host3 ens32 .23   (agents, containers on docker0)
//!     |-- world eth0 172.16.15.100   (a machine outside the overlay, made by these tests)
//! ```

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use weft_tests::{cluster, prometheus, weft_bin, Agent, Cluster, Host, Netns};

const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WORLD_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 15, 100);
const HEALTHZ_PORT: &str = "8285";

/// A namespace on the underlay switch with 172.16.15.100: an address outside the overlay.
async fn world(c: &Cluster) -> Netns {
    let world = Netns::create(&format!("{}-world", c.name()))
        .await
        .expect("create the world namespace");
    let sw = c.switch();
    sw.add_veth_into("port-w", "eth0", world.name())
        .await
        .expect("veth to the world");
    sw.ip(&["link", "set", "port-w", "master", "br0", "up"])
        .await
        .expect("port-w on br0");
    world
        .ip(&["addr", "add", &format!("{WORLD_IP}/24"), "dev", "eth0"])
        .await
        .expect("world address");
    world
        .ip(&["link", "set", "eth0", "up"])
        .await
        .expect("world up");
    world
}

/// Accept one TCP connection on the world's `port` and return the source address it came from.
fn world_listener(world: &Netns, port: u16) -> std::thread::JoinHandle<anyhow::Result<Ipv4Addr>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = world.spawn_thread(move || {
        let l = TcpListener::bind((WORLD_IP, port)).context("listen in the world")?;
        l.set_nonblocking(true)?;
        tx.send(()).ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match l.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false)?;
                    let mut hello = String::new();
                    s.read_to_string(&mut hello)?;
                    anyhow::ensure!(hello == "hello\n", "got {hello:?}");
                    return match peer.ip() {
                        std::net::IpAddr::V4(ip) => Ok(ip),
                        other => anyhow::bail!("IPv6 peer {other}"),
                    };
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    anyhow::ensure!(Instant::now() < deadline, "nobody connected to the world");
                    // Pacing between two looks; the deadline decides.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the world listener did not start");
    handle
}

/// Connect from `container` to the world and return the source address the world saw.
async fn source_seen_by_world(c: &Cluster, world: &Netns, container: usize, port: u16) -> Ipv4Addr {
    let listener = world_listener(world, port);
    let ctr = c.container(container);
    let out = ctr
        .exec(&[
            "bash",
            "-c",
            &format!("echo hello > /dev/tcp/{WORLD_IP}/{port}"),
        ])
        .await;
    assert!(
        out.status.success(),
        "container {} ({}) cannot reach the world {WORLD_IP}: {}",
        ctr.netns(),
        ctr.ip(),
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::task::spawn_blocking(move || listener.join())
        .await
        .expect("join")
        .expect("world thread")
        .expect("world listener")
}

/// flanneld's `iptables-save` lines for network N and subnet SN (FLANNEL-COMPAT.md).
fn flannel_listing(network: &str, subnet: &str) -> (Vec<String>, Vec<String>) {
    let m = r#"-m comment --comment "flanneld masq""#;
    let nat = vec![
        format!("-A POSTROUTING {m} -j FLANNEL-POSTRTG"),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {subnet} -d {network} {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {network} -d {subnet} {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {network} -d {subnet} {m} -j RETURN"),
        format!(
            "-A FLANNEL-POSTRTG -s {network} ! -d 224.0.0.0/4 {m} -j MASQUERADE --random-fully"
        ),
        format!("-A FLANNEL-POSTRTG ! -s {network} -d {network} {m} -j MASQUERADE --random-fully"),
    ];
    let f = r#"-m comment --comment "flanneld forward""#;
    let filter = vec![
        format!("-A FORWARD {f} -j FLANNEL-FWD"),
        format!("-A FLANNEL-FWD -s {network} {f} -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {network} {f} -j ACCEPT"),
    ];
    (nat, filter)
}

/// The FLANNEL lines of `iptables-save -t <table>` inside `host`.
async fn saved(host: &Host, table: &str) -> Vec<String> {
    host.exec_ok(&["iptables-save", "-t", table])
        .await
        .expect("iptables-save")
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains("FLANNEL"))
        .map(String::from)
        .collect()
}

/// `curl` inside the host: (HTTP status, body).
async fn http_get(host: &Host, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{HEALTHZ_PORT}{path}");
    let out = host
        .exec(&["curl", "-s", "-m", "2", "-w", "\n%{http_code}", &url])
        .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

async fn metrics(host: &Host) -> BTreeMap<String, f64> {
    let (code, body) = http_get(host, "/metrics").await;
    assert_eq!(code, 200, "/metrics on {}: {body}", host.name());
    prometheus::parse(&body).unwrap_or_else(|e| {
        panic!(
            "/metrics on {} is not valid Prometheus text: {e:#}\n{body}",
            host.name()
        )
    })
}

/// One series of a scrape; a missing series fails with the whole scrape.
fn val(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("/metrics has no series {series}: {m:#?}"))
}

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} (waited {timeout:?})");
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn ip_masq_readyz_and_metrics_on_running_agents() {
    let c = cluster(3).await;
    let world = world(&c).await;
    // Agents first, the network config later: they must wait, alive but not ready.
    let agents = c
        .start_agents(&[
            "--datapath",
            "kernel",
            "--ip-masq",
            "--healthz-ip",
            "127.0.0.1",
            "--healthz-port",
            HEALTHZ_PORT,
            "--subnet-lease-ttl",
            "6s",
        ])
        .expect("start agents");
    for a in &agents {
        a.wait_for_log("network config not found", Duration::from_secs(20))
            .await
            .expect("agent waits for the config");
    }
    for h in c.hosts() {
        assert_eq!(
            http_get(h, "/healthz").await.0,
            200,
            "{}: alive while waiting",
            h.name()
        );
        let (code, body) = http_get(h, "/readyz").await;
        assert_eq!(
            code,
            503,
            "{}: not ready before the config: {body}",
            h.name()
        );
    }
    let before = metrics(c.host(0)).await;
    assert_eq!(val(&before, "weft_leases"), 0.0);

    c.write_config(CONFIG).await;
    let subnets = c.wait_subnets().await.expect("subnets");
    for h in c.hosts() {
        eventually(
            Duration::from_secs(10),
            &format!("{} /readyz never 200", h.name()),
            || async { (http_get(h, "/readyz").await.0 == 200).then_some(()) },
        )
        .await;
    }
    c.add_containers(1).await.expect("containers");

    // The rules are flannel's, byte for byte.
    for (h, env) in c.hosts().iter().zip(&subnets) {
        let own =
            ipnet::Ipv4Net::new(env.subnet.network(), env.subnet.prefix_len()).expect("subnet");
        let (nat, filter) = flannel_listing("10.1.0.0/16", &own.to_string());
        assert_eq!(saved(h, "nat").await, nat, "{}", h.name());
        assert_eq!(saved(h, "filter").await, filter, "{}", h.name());
    }

    // Out of the overlay: masqueraded to the host's ens32 address. Inside it: the source is kept.
    for (i, h) in c.hosts().iter().enumerate() {
        let seen = source_seen_by_world(&c, &world, i, 9100 + i as u16).await;
        assert_eq!(
            seen,
            h.ens32_ip(),
            "container on {} seen by the world",
            h.name()
        );
    }
    let t = c
        .container(0)
        .tcp_transfer(&c.container(2), 64 * 1024)
        .await
        .expect("container to container across hosts");
    assert_eq!(
        t.peer.ip(),
        std::net::IpAddr::V4(c.container(0).ip()),
        "overlay traffic keeps its source"
    );

    // Metrics: peers and leases as the cluster has them, renewals counting (6 s leases renew every 2 s).
    let m1 = metrics(c.host(0)).await;
    assert_eq!(val(&m1, "weft_leases"), 3.0);
    assert_eq!(val(&m1, "weft_peers_added_total"), 2.0);
    assert_eq!(val(&m1, "weft_peers_removed_total"), 0.0);
    assert_eq!(
        val(&m1, "weft_datapath_mode{mode=\"kernel\"}"),
        1.0,
        "{m1:?}"
    );
    // A fourth host appears in etcd, then goes away.
    let key = format!("{}/subnets/10.1.250.0-24", c.prefix());
    c.etcd()
        .put(
            &key,
            r#"{"PublicIP":"172.16.15.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#,
        )
        .await;
    eventually(
        Duration::from_secs(10),
        "peers_added did not count the new lease",
        || async {
            let m = metrics(c.host(0)).await;
            (val(&m, "weft_peers_added_total") == 3.0 && val(&m, "weft_leases") == 4.0)
                .then_some(())
        },
    )
    .await;
    c.etcd().delete(&key).await;
    eventually(
        Duration::from_secs(10),
        "peers_removed did not count the deleted lease",
        || async {
            let m = metrics(c.host(0)).await;
            (val(&m, "weft_peers_removed_total") == 1.0 && val(&m, "weft_leases") == 3.0)
                .then_some(())
        },
    )
    .await;
    let renewals = val(&m1, "weft_lease_renewals_total");
    eventually(
        Duration::from_secs(10),
        "lease_renewals_total did not grow",
        || async {
            (metrics(c.host(0)).await["weft_lease_renewals_total"] >= renewals + 2.0).then_some(())
        },
    )
    .await;

    // An operator deletes the chain by hand: it comes back within the 5 s resync, and the world
    // again sees the host's address.
    let h = c.host(0);
    let repairs = val(&metrics(h).await, "weft_reconcile_repairs_total");
    let nat_before = saved(h, "nat").await;
    for args in [
        &[
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ][..],
        &["-F", "FLANNEL-POSTRTG"],
        &["-X", "FLANNEL-POSTRTG"],
    ] {
        let mut argv = vec!["iptables", "-w", "-t", "nat"];
        argv.extend_from_slice(args);
        h.exec_ok(&argv).await.expect("delete the chain by hand");
    }
    assert!(saved(h, "nat").await.is_empty());
    let deleted = Instant::now();
    eventually(
        Duration::from_secs(8),
        "the masquerade chain was not restored",
        || async { (saved(h, "nat").await == nat_before).then_some(()) },
    )
    .await;
    assert!(
        deleted.elapsed() < Duration::from_secs(7),
        "restored after {:?}",
        deleted.elapsed()
    );
    assert_eq!(
        source_seen_by_world(&c, &world, 0, 9200).await,
        h.ens32_ip()
    );
    let grew = val(&metrics(h).await, "weft_reconcile_repairs_total") - repairs;
    assert!(
        grew >= 8.0,
        "chain + 6 rules + jump restored, repairs grew by {grew}"
    );
    assert!(
        agents[0].log().contains("peer added"),
        "one log line per peer"
    );
}

/// The interface flags, as flanneld reads them. Each host gets a second interface `ens33`
/// (192.168.50.1/24 on host1), and its default route points there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn interface_choice() {
    let c = cluster(1).await;
    c.write_config(CONFIG).await;
    let h = c.host(0);
    h.netns()
        .add_interface("ens33", "192.168.50.1/24")
        .await
        .expect("second interface");
    let base: Vec<String> = {
        let all = h.agent_args();
        let at = all
            .iter()
            .position(|a| a == "--iface")
            .expect("--iface in agent_args");
        [&all[..at], &all[at + 2..]].concat()
    };
    let mut n = 0;
    let mut run = |flags: &[&str]| {
        n += 1;
        let mut args = base.clone();
        args.extend(["--datapath", "kernel"].map(String::from));
        args.extend(flags.iter().map(|s| s.to_string()));
        Agent::spawn(
            h.name(),
            args,
            &h.dir().join(format!("iface{n}.log")),
            false,
        )
        .expect("spawn")
    };
    let chosen = |agent: Agent, want: &'static str| async move {
        agent
            .wait_for_log("external interface", Duration::from_secs(10))
            .await
            .expect("interface chosen");
        let line = agent
            .log()
            .lines()
            .find(|l| l.contains("external interface"))
            .unwrap_or_default()
            .to_string();
        assert!(line.contains(want), "expected {want:?} in {line:?}");
        agent.kill();
    };
    chosen(run(&["--iface", "ens33"]), "iface=ens33 index").await;
    chosen(run(&["--iface", "172.16.15.21"]), "iface=ens32 index").await;
    chosen(
        run(&[
            "--iface",
            "wlan9",
            "--iface",
            "192.168.50.1",
            "--iface",
            "ens32",
        ]),
        "iface=ens33 index",
    )
    .await;
    chosen(
        run(&["--iface-regex", r"^192\.168\.50\."]),
        "addr=192.168.50.1",
    )
    .await;
    chosen(
        run(&["--iface-regex", "^nomatch$", "--iface-regex", "^ens3[3]$"]),
        "iface=ens33 index",
    )
    .await;

    // No flag and no default route: a clear error, exit 78.
    let refused = |agent: Agent, needles: &'static [&'static str]| async move {
        let status = eventually(Duration::from_secs(5), "the agent did not exit", || {
            let s = agent.exit_status();
            async move { s }
        })
        .await;
        let log = agent.log();
        assert_eq!(status.code(), Some(78), "{log}");
        for n in needles {
            assert!(log.contains(n), "expected {n:?} in:\n{log}");
        }
    };
    refused(run(&[]), &["no default IPv4 route", "pass --iface"]).await;
    refused(
        run(&["--iface", "wlan9"]),
        &[
            "no interface matches --iface wlan9",
            "ens32 (172.16.15.21)",
            "ens33 (192.168.50.1)",
        ],
    )
    .await;
    refused(
        run(&["--iface-regex", "^eth9$"]),
        &[
            "no interface matches --iface-regex ^eth9$",
            "ens32 (172.16.15.21)",
        ],
    )
    .await;

    // Default = the interface of the default route.
    h.netns()
        .ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.168.50.2",
            "dev",
            "ens33",
        ])
        .await
        .expect("default route");
    chosen(run(&[]), "iface=ens33 index").await;

    // --public-ip: advertised in the lease instead of the interface's address.
    let agent = run(&["--iface", "ens32", "--public-ip", "172.16.15.77"]);
    eventually(
        Duration::from_secs(20),
        "no lease with the --public-ip",
        || async {
            c.etcd()
                .get_prefix(&format!("{}/subnets/", c.prefix()))
                .await
                .iter()
                .any(|(_, v)| v.contains(r#""PublicIP":"172.16.15.77""#))
                .then_some(())
        },
    )
    .await;
    let line = agent.log();
    assert!(
        line.contains("public_ip=172.16.15.77") && line.contains("addr=172.16.15.21"),
        "{line}"
    );
    agent.kill();
}

/// systemd-style environment file: KEY=VALUE lines, `#` comments, values in single or double quotes.
fn read_env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .expect("env file")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let unquoted = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(v);
            (k.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

/// The unit's ExecStartPre and ExecStart, as systemd would run them with the env file, by hand in
/// a harness host: the config gets written, the agent comes up, writes the subnet file, gets ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn unit_command_lines_run_by_hand_in_a_host() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let unit = std::fs::read_to_string(dist.join("weft.service")).expect("dist/weft.service");
    let line = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in weft.service"))
            .to_string()
    };
    let bin = weft_bin().expect("weft binary").display().to_string();
    let c = cluster(1).await;
    let h = c.host(0);

    // dist/weft.env with this host's values filled in, as an operator edits it.
    let subnet_file = h.subnet_file().display().to_string();
    let docker = h.docker_opts_file().display().to_string();
    let template = std::fs::read_to_string(dist.join("weft.env")).expect("dist/weft.env");
    let mut env_text = String::new();
    for l in template.lines() {
        let l = match l.split_once('=').map(|(k, _)| k) {
            Some("WEFT_ETCD_ENDPOINTS") => format!("WEFT_ETCD_ENDPOINTS={}", h.etcd_endpoint()),
            Some("#WEFT_IFACE") => "WEFT_IFACE=ens32".to_string(),
            Some("#WEFT_NETWORK_CONFIG") => l.trim_start_matches('#').to_string(),
            _ => l.to_string(),
        };
        env_text.push_str(&l);
        env_text.push('\n');
    }
    env_text.push_str(&format!(
        "WEFT_SUBNET_FILE={subnet_file}\nWEFT_DOCKER_OPTS_FILE={docker}\nWEFT_DATAPATH=kernel\n"
    ));
    let env_file = h.dir().join("weft.env");
    std::fs::write(&env_file, &env_text).expect("write the env file");
    let vars = read_env_file(&env_file);
    assert!(
        vars.iter().any(|(k, _)| k == "WEFT_NETWORK_CONFIG"),
        "{env_text}"
    );

    // ExecStartPre: systemd turns `$$` into `$`, then runs /bin/sh -c '<script>'.
    let pre = line("ExecStartPre=")
        .replace("$$", "$")
        .replace("/usr/local/bin/weft", &bin);
    let (sh, rest) = pre.split_once(' ').expect("program");
    let (flag, script) = rest.split_once(' ').expect("flag");
    let out = h
        .netns()
        .command("env", &["-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
        .args(vars.iter().map(|(k, v)| format!("{k}={v}")))
        .args([sh, flag, script.trim_matches('\'')])
        .output()
        .await
        .expect("run ExecStartPre");
    assert!(
        out.status.success(),
        "ExecStartPre: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = c
        .etcd()
        .get(&format!("{}/config", c.prefix()))
        .await
        .expect("config stored");
    assert!(stored.contains("10.1.0.0/16"), "{stored}");

    // ExecStart with only the env file's variables (env -i, as systemd gives a clean environment).
    let start = line("ExecStart=").replace("/usr/local/bin/weft", &bin);
    let mut argv = start.split_whitespace();
    let program = argv.next().expect("program").to_string();
    let log = std::fs::File::create(h.dir().join("unit.log")).expect("log");
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            h.name(),
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ])
        .args(vars.iter().map(|(k, v)| format!("{k}={v}")))
        .arg(&program)
        .args(argv)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("run ExecStart");
    let read_log = || std::fs::read_to_string(h.dir().join("unit.log")).unwrap_or_default();
    let env = eventually(
        Duration::from_secs(30),
        "no subnet file from the unit's ExecStart",
        || {
            let exited = child.try_wait().ok().flatten();
            let text = std::fs::read_to_string(&subnet_file).ok();
            async move {
                if let Some(s) = exited {
                    panic!("ExecStart exited ({s}):\n{}", read_log());
                }
                text
            }
        },
    )
    .await;
    assert!(
        env.contains("FLANNEL_NETWORK=10.1.0.0/16") && env.contains("FLANNEL_IPMASQ=true"),
        "{env}"
    );
    eventually(
        Duration::from_secs(10),
        "/readyz on the env file's port never 200",
        || async { (http_get(h, "/readyz").await.0 == 200).then_some(()) },
    )
    .await;
    assert!(
        !saved(h, "nat").await.is_empty(),
        "WEFT_IP_MASQ=true installs the rules"
    );
    // SIGTERM, as `systemctl stop` sends it: a clean exit.
    // SAFETY: kill(2) on our own child (`ip netns exec` execs the agent, so this is the agent).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = eventually(Duration::from_secs(10), "the agent ignored SIGTERM", || {
        let s = child.try_wait().ok().flatten();
        async move { s }
    })
    .await;
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        read_log()
    );
}

#[test]
fn env_file_reader_unquotes_like_systemd() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("e");
    std::fs::write(&p, "# c\nA=1\nB='{\"x\": 1}'\n\nC=\"two words\"\n").expect("write");
    assert_eq!(
        read_env_file(&p),
        [("A", "1"), ("B", "{\"x\": 1}"), ("C", "two words")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
    );
}
