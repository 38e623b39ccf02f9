//! etcd with TLS client certificates, and with username/password authentication: a real etcd 3.4
//! started by the test, certificates made by the test with the openssl CLI, and `weft config
//! set/get`, `weft leases` and `weft agent` as real processes.
//!
//! Each scenario runs in a network namespace of its own: etcd listens on that namespace's
//! 127.0.0.1:2379, the agent runs there too (on a veth `ext0` as its external interface), and
//! every `weft` command runs there through `ip netns exec`. Nothing touches the machine's network.
//!
//! A wrong certificate or password must give a clear error (exit 78, EX_CONFIG, with the flag to
//! fix) within seconds, not a retry loop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use weft_tests::{tail, weft_bin, Agent, Netns, Relay};

const CONFIG: &str = r#"{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}"#;
const ENDPOINT_TLS: &str = "https://127.0.0.1:2379";
const ENDPOINT_PLAIN: &str = "http://127.0.0.1:2379";
/// A refusal must be reported within this; a retry loop or a hang fails the test.
const PROMPT: Duration = Duration::from_secs(5);
/// EX_CONFIG: what weft exits with when a certificate or a credential is wrong.
const EX_CONFIG: i32 = 78;

// ---------------------------------------------------------------------------------------------------
// Certificates

/// Two CAs ("ca" trusted by etcd, "other" not), etcd's server certificate for 127.0.0.1, a client
/// certificate from "ca" and a "rogue" one from "other". Files `<name>.pem` and `<name>-key.pem`.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn generate() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("weft-pki-")
            .tempdir()
            .expect("temp dir for certificates");
        let pki = Pki { dir };
        pki.ca("ca");
        pki.ca("other");
        pki.leaf("server", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth");
        pki.leaf("client", "ca", "DNS:weft-client", "clientAuth");
        pki.leaf("rogue", "other", "DNS:weft-client", "clientAuth");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `openssl <args>` in the directory; `args` split at whitespace.
    fn openssl(&self, args: &str) {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ca(&self, name: &str) {
        self.openssl(&format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
             -keyout {name}-key.pem -out {name}.pem -subj /CN=weft-test-{name}-CA"
        ));
    }

    fn leaf(&self, name: &str, ca: &str, san: &str, usage: &str) {
        let ext = format!("subjectAltName={san}\nextendedKeyUsage={usage}\n");
        std::fs::write(self.path(&format!("{name}.ext")), ext).expect("write extension file");
        self.openssl(&format!(
            "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout {name}-key.pem -out {name}.csr -subj /CN=weft-test-{name}"
        ));
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}-key.pem -CAcreateserial \
             -out {name}.pem -days 2 -extfile {name}.ext"
        ));
    }

    /// `--etcd-cafile CA --etcd-certfile CERT --etcd-keyfile CERT-key`.
    fn flags(&self, ca: &str, cert: &str) -> Vec<String> {
        vec![
            "--etcd-cafile".into(),
            self.p(&format!("{ca}.pem")),
            "--etcd-certfile".into(),
            self.p(&format!("{cert}.pem")),
            "--etcd-keyfile".into(),
            self.p(&format!("{cert}-key.pem")),
        ]
    }
}

// ---------------------------------------------------------------------------------------------------
// etcd in a namespace of its own

/// A namespace with `ext0` (a veth whose peer stays inside, 192.168.211.1/24: the agent's external interface) and a real
/// etcd on its 127.0.0.1:2379. Dropped: etcd killed, namespace and data removed.
struct Site {
    etcd: Child,
    ns: Netns,
    dir: tempfile::TempDir,
    endpoint: &'static str,
    /// Flags etcdctl needs to get in (certificates or the root user).
    etcdctl_auth: Vec<String>,
}

impl Site {
    async fn start(
        tag: &str,
        endpoint: &'static str,
        etcd_flags: &[String],
        etcdctl_auth: Vec<String>,
    ) -> Site {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = Netns::create(&format!("weft-tls-{}-{tag}{n}", std::process::id()))
            .await
            .expect("create the namespace");
        ns.add_interface("ext0", "192.168.211.1/24")
            .await
            .expect("set up ext0");
        let dir = tempfile::Builder::new()
            .prefix("weft-tls-etcd-")
            .tempdir()
            .expect("temp dir for etcd");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let peer = "http://127.0.0.1:2380";
        let etcd = Command::new("ip")
            .args(["netns", "exec", ns.name(), "etcd", "--name", "tls"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                endpoint,
                "--advertise-client-urls",
                endpoint,
            ])
            .args([
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
            ])
            .args(["--initial-cluster", &format!("tls={peer}")])
            .args(etcd_flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("run etcd (apt-get install etcd-server)");
        let mut site = Site {
            etcd,
            ns,
            dir,
            endpoint,
            etcdctl_auth,
        };
        site.wait_healthy().await;
        site
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.etcdctl(&["endpoint", "health"]).await.status.success() {
                return;
            }
            if let Ok(Some(status)) = self.etcd.try_wait() {
                panic!("etcd exited ({status}):\n{}", self.etcd_log());
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy:\n{}",
                self.etcd_log()
            );
            // Pacing between two looks; the deadline decides.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn etcd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    async fn etcdctl(&self, args: &[&str]) -> Output {
        self.ns
            .command(
                "env",
                &["ETCDCTL_API=3", "etcdctl", "--endpoints", self.endpoint],
            )
            .args(&self.etcdctl_auth)
            .args(["--dial-timeout", "2s", "--command-timeout", "5s"])
            .args(args)
            .output()
            .await
            .expect("run etcdctl")
    }

    async fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args).await;
        assert!(
            out.status.success(),
            "etcdctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `weft <args>` inside the namespace, with how long it took. No WEFT_*/FLANNELD_* from the
    /// test's environment leaks in.
    async fn weft(&self, args: &[&str]) -> (Output, Duration) {
        let start = Instant::now();
        let mut cmd = self.ns.command(
            weft_bin().expect("weft binary").to_str().expect("utf-8"),
            args,
        );
        for (k, _) in std::env::vars_os() {
            if k.to_str()
                .is_some_and(|k| k.starts_with("WEFT_") || k.starts_with("FLANNELD_"))
            {
                cmd.env_remove(k);
            }
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("weft {} hung for 30 s", args.join(" ")))
            .expect("run weft");
        (out, start.elapsed())
    }

    /// `weft <args>` must succeed; its stdout.
    async fn weft_ok(&self, args: &[&str]) -> String {
        let (out, _) = self.weft(args).await;
        assert!(
            out.status.success(),
            "weft {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `weft <args>` must fail promptly with EX_CONFIG and a message containing every `needle`.
    async fn weft_refused(&self, args: &[&str], needles: &[&str]) {
        let (out, took) = self.weft(args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(EX_CONFIG),
            "weft {}: {err}",
            args.join(" ")
        );
        assert!(
            took < PROMPT,
            "weft {} took {took:?} to fail: {err}",
            args.join(" ")
        );
        for n in needles {
            assert!(
                err.contains(n),
                "weft {}: expected {n:?} in: {err}",
                args.join(" ")
            );
        }
    }

    /// `weft agent` here with `etcd_flags`, on ext0, files in the site's directory.
    fn agent(&self, name: &str, etcd_flags: &[String], extra: &[&str]) -> Agent {
        self.agent_via(self.endpoint, name, etcd_flags, extra)
    }

    /// [`Site::agent`] reaching etcd at `endpoint` (a relay) instead of etcd's own.
    fn agent_via(
        &self,
        endpoint: &str,
        name: &str,
        etcd_flags: &[String],
        extra: &[&str],
    ) -> Agent {
        let mut args: Vec<String> = ["--etcd-endpoints", endpoint, "--iface", "ext0"]
            .map(String::from)
            .to_vec();
        args.extend_from_slice(etcd_flags);
        args.extend(["--datapath", "kernel", "--subnet-file"].map(String::from));
        args.push(self.subnet_file(name).display().to_string());
        args.push("--docker-opts-file".into());
        args.push(
            self.dir
                .path()
                .join(format!("{name}.docker"))
                .display()
                .to_string(),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        Agent::spawn(
            self.ns.name(),
            args,
            &self.dir.path().join(format!("{name}.log")),
            false,
        )
        .expect("start weft agent")
    }

    /// `weft leases --json` with `etcd_flags`.
    async fn leases(&self, etcd_flags: &[String]) -> String {
        self.weft_ok(&with(
            &["leases", "--json", "--etcd-endpoints", self.endpoint],
            etcd_flags,
        ))
        .await
    }

    fn subnet_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.env"))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        if std::thread::panicking() {
            eprintln!("----- etcd log -----\n{}", tail(&self.etcd_log(), 30));
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `args` followed by `more`, as the `&[&str]` the helpers take.
fn with<'a>(args: &[&'a str], more: &'a [String]) -> Vec<&'a str> {
    args.iter()
        .copied()
        .chain(more.iter().map(String::as_str))
        .collect()
}

/// Wait for `path` to exist; its contents.
/// etcd over TLS demanding client certificates signed by `pki`'s "ca".
async fn client_cert_site(pki: &Pki, tag: &str) -> Site {
    Site::start(
        tag,
        ENDPOINT_TLS,
        &[
            "--cert-file".into(),
            pki.p("server.pem"),
            "--key-file".into(),
            pki.p("server-key.pem"),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            pki.p("ca.pem"),
        ],
        vec![
            format!("--cacert={}", pki.p("ca.pem")),
            format!("--cert={}", pki.p("client.pem")),
            format!("--key={}", pki.p("client-key.pem")),
        ],
    )
    .await
}

async fn wait_file(path: &Path, agent: &Agent) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                return text;
            }
        }
        if let Some(status) = agent.exit_status() {
            panic!(
                "agent exited ({status}) before writing {}:\n{}",
                path.display(),
                agent.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {} after 30 s:\n{}",
            path.display(),
            agent.log()
        );
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent must exit by itself with EX_CONFIG within [`PROMPT`], its log naming the problem.
async fn agent_refused(agent: &Agent, needles: &[&str]) {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = agent.exit_status() {
            break s;
        }
        assert!(
            start.elapsed() < PROMPT,
            "the agent still runs after {PROMPT:?} with bad credentials:\n{}",
            agent.log()
        );
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = agent.log();
    assert_eq!(status.code(), Some(EX_CONFIG), "{log}");
    for n in needles {
        assert!(log.contains(n), "expected {n:?} in the agent log:\n{log}");
    }
}

/// The agent's lease as `weft leases --json` shows it: (subnet, public IP, seconds left).
fn lease_of(json: &str, public_ip: &str) -> Option<(String, i64)> {
    let v: serde_json::Value = serde_json::from_str(json).expect("weft leases --json");
    v.as_array()?.iter().find_map(|l| {
        (l["public_ip"] == public_ip).then(|| {
            (
                l["subnet"].as_str().unwrap_or_default().to_string(),
                l["expires_in_secs"].as_i64().unwrap_or(-1),
            )
        })
    })
}

// ---------------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn client_certificates() {
    let pki = Pki::generate();
    let site = client_cert_site(&pki, "cert").await;
    let good = pki.flags("ca", "client");
    // Without the client certificate etcd refuses etcdctl too: the server really demands one.
    let bare = site
        .ns
        .command(
            "env",
            &[
                "ETCDCTL_API=3",
                "etcdctl",
                "--endpoints",
                ENDPOINT_TLS,
                "--dial-timeout",
                "2s",
            ],
        )
        .arg(format!("--cacert={}", pki.p("ca.pem")))
        .args(["get", "/x"])
        .output()
        .await
        .expect("etcdctl");
    assert!(
        !bare.status.success(),
        "etcd must demand a client certificate"
    );

    let out = site
        .weft_ok(
            &[
                with(&["config", "set", "--etcd-endpoints", ENDPOINT_TLS], &good),
                vec![CONFIG],
            ]
            .concat(),
        )
        .await;
    assert!(out.contains("/coreos.com/network/config"), "{out}");
    let got = site
        .weft_ok(&with(
            &["config", "get", "--etcd-endpoints", ENDPOINT_TLS],
            &good,
        ))
        .await;
    assert_eq!(got.trim(), CONFIG);
    assert_eq!(
        site.etcdctl_ok(&["get", "--print-value-only", "/coreos.com/network/config"])
            .await
            .trim(),
        CONFIG
    );

    let agent = site.agent("a", &good, &[]);
    let env = wait_file(&site.subnet_file("a"), &agent).await;
    assert!(env.contains("FLANNEL_NETWORK=10.7.0.0/16"), "{env}");
    let leases = site
        .weft_ok(&with(
            &["leases", "--json", "--etcd-endpoints", ENDPOINT_TLS],
            &good,
        ))
        .await;
    let (subnet, ttl) =
        lease_of(&leases, "192.168.211.1").expect("the agent's lease in weft leases");
    assert!(
        env.contains(&format!("FLANNEL_SUBNET={}", subnet.replace(".0/", ".1/"))),
        "{env} vs {subnet}"
    );
    assert!(ttl > 80_000, "a fresh 24 h lease, {ttl} s left");
    let table = site
        .weft_ok(&with(&["leases", "--etcd-endpoints", ENDPOINT_TLS], &good))
        .await;
    assert!(
        table.contains(&subnet) && table.contains("192.168.211.1"),
        "{table}"
    );
    agent.stop().await.expect("stop the agent");

    // A client certificate from a CA etcd does not trust.
    let rogue = pki.flags("ca", "rogue");
    let rogue_cert = pki.p("rogue.pem");
    site.weft_refused(
        &with(&["config", "get", "--etcd-endpoints", ENDPOINT_TLS], &rogue),
        &[
            "refused the TLS connection",
            "client certificate",
            &rogue_cert,
            "--trusted-ca-file",
        ],
    )
    .await;
    // Trusting the wrong CA for etcd's own certificate.
    let other_ca = pki.flags("other", "client");
    site.weft_refused(
        &with(&["leases", "--etcd-endpoints", ENDPOINT_TLS], &other_ca),
        &[
            "etcd's certificate is not trusted",
            "UnknownIssuer",
            "--etcd-cafile",
            &pki.p("other.pem"),
        ],
    )
    .await;
    // No client certificate at all.
    let ca_only = vec!["--etcd-cafile".to_string(), pki.p("ca.pem")];
    site.weft_refused(
        &with(
            &["config", "get", "--etcd-endpoints", ENDPOINT_TLS],
            &ca_only,
        ),
        &["client certificate", "--etcd-certfile and --etcd-keyfile"],
    )
    .await;
    // TLS files with a plain http:// endpoint is a usage error caught before connecting.
    let (out, _) = site
        .weft(&with(
            &["config", "get", "--etcd-endpoints", ENDPOINT_PLAIN],
            &good,
        ))
        .await;
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be https://"));

    // The agent does not retry a certificate etcd rejects: it stops with the reason.
    let agent = site.agent("rogue", &rogue, &[]);
    agent_refused(&agent, &["client certificate", &rogue_cert]).await;
    let agent = site.agent("other", &other_ca, &[]);
    agent_refused(&agent, &["etcd's certificate is not trusted"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn username_and_password() {
    // A 1 s token TTL: the agent's renewals (every 3 s with a 9 s lease) always find the token
    // expired, so they only work when the client re-authenticates.
    let mut site = Site::start(
        "auth",
        ENDPOINT_PLAIN,
        &["--auth-token-ttl".into(), "1".into()],
        Vec::new(),
    )
    .await;
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "weft:s3cret"],
        &["role", "add", "weft"],
        &[
            "role",
            "grant-permission",
            "weft",
            "--prefix=true",
            "readwrite",
            "/coreos.com/network",
        ],
        &["user", "grant-role", "weft", "weft"],
        &["user", "add", "reader:r3ad"],
        &["role", "add", "reader"],
        &[
            "role",
            "grant-permission",
            "reader",
            "--prefix=true",
            "read",
            "/coreos.com/network",
        ],
        &["user", "grant-role", "reader", "reader"],
        &["auth", "enable"],
    ] {
        site.etcdctl_ok(args).await;
    }
    site.etcdctl_auth = vec!["--user=root:rootpw".into()];
    let creds = |user: &str, pw: &str| {
        vec![
            "--etcd-username".to_string(),
            user.to_string(),
            "--etcd-password".to_string(),
            pw.to_string(),
        ]
    };
    let good = creds("weft", "s3cret");
    let set = |flags: &[String]| -> Vec<String> {
        ["config", "set", "--etcd-endpoints", ENDPOINT_PLAIN]
            .map(String::from)
            .into_iter()
            .chain(flags.iter().cloned())
            .chain([CONFIG.to_string()])
            .collect()
    };
    site.weft_ok(&strs(&set(&good))).await;
    let got = site
        .weft_ok(&with(
            &["config", "get", "--etcd-endpoints", ENDPOINT_PLAIN],
            &good,
        ))
        .await;
    assert_eq!(got.trim(), CONFIG);

    // Wrong password, unknown user, no credentials, and a user without write permission.
    site.weft_refused(
        &with(
            &["config", "get", "--etcd-endpoints", ENDPOINT_PLAIN],
            &creds("weft", "wrong"),
        ),
        &[
            "refused access",
            "authentication failed",
            "--etcd-username (weft) and --etcd-password",
        ],
    )
    .await;
    site.weft_refused(
        &with(
            &["leases", "--etcd-endpoints", ENDPOINT_PLAIN],
            &creds("mallory", "x"),
        ),
        &["authentication failed", "mallory"],
    )
    .await;
    site.weft_refused(
        &["config", "get", "--etcd-endpoints", ENDPOINT_PLAIN],
        &[
            "authentication enabled",
            "pass --etcd-username and --etcd-password",
        ],
    )
    .await;
    let (out, took) = site.weft(&strs(&set(&creds("reader", "r3ad")))).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && took < PROMPT,
        "a read-only user must not store the config: {err}"
    );
    assert!(err.contains("permission denied"), "{err}");

    let agent = site.agent("bad", &creds("weft", "wrong"), &[]);
    agent_refused(&agent, &["authentication failed", "--etcd-password"]).await;

    let agent = site.agent("a", &good, &["--subnet-lease-ttl", "9s"]);
    let env = wait_file(&site.subnet_file("a"), &agent).await;
    let (subnet, _) = lease_of(&site.leases(&good).await, "192.168.211.1").expect("lease listed");
    assert!(
        env.contains(&subnet.replace(".0/", ".1/")),
        "{env} vs {subnet}"
    );
    // Past the lease's TTL: only renewals (each with an expired token) keep it. An observation
    // window, not a wait: the lease must survive all of it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (after, ttl) = lease_of(&site.leases(&good).await, "192.168.211.1")
        .unwrap_or_else(|| panic!("the lease expired: renewals failed\n{}", agent.log()));
    assert_eq!(after, subnet, "{}", agent.log());
    assert!(
        ttl > 3,
        "{ttl} s left: the last renewal is older than it should be\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        !log.contains("keeping our lease"),
        "a renewal failed:\n{log}"
    );
    assert!(agent.exit_status().is_none(), "{log}");
}

/// A reset of the TLS connection to etcd in the middle of the lease watch is a reconnect, not
/// a rejected client certificate: the agent keeps running and keeps its lease and subnet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn tls_reset_mid_watch_is_a_reconnect() {
    let pki = Pki::generate();
    let site = client_cert_site(&pki, "reset").await;
    let good = pki.flags("ca", "client");
    site.weft_ok(
        &[
            with(&["config", "set", "--etcd-endpoints", ENDPOINT_TLS], &good),
            vec![CONFIG],
        ]
        .concat(),
    )
    .await;
    // etcd's certificate names 127.0.0.1, so the relay's endpoint verifies as etcd's own.
    let relay = Relay::in_namespace(&site.ns, 2479, ENDPOINT_TLS.into());
    let via = format!("https://127.0.0.1:{}", relay.port());
    // Connections dropped as they open, before any TLS handshake: an outage to wait out,
    // not a certificate etcd rejected.
    relay.cut(true);
    let agent = site.agent_via(&via, "a", &good, &["--subnet-lease-ttl", "9s"]);
    weft_tests::poll::until(
        "the agent waiting for etcd",
        Duration::from_secs(10),
        || async {
            assert!(
                agent.exit_status().is_none(),
                "the agent exited:\n{}",
                agent.log()
            );
            let log = agent.log();
            weft_tests::poll::check(log.matches("unreachable").count() >= 3, log)
        },
    )
    .await;
    // Then two connections closed right after the handshake, which TLS 1.3 also shows for a
    // rejected client certificate: once or twice is a reset, to retry.
    relay.close_after_handshake(2);
    relay.cut(false);
    let env = wait_file(&site.subnet_file("a"), &agent).await;
    let (subnet, _) = lease_of(&site.leases(&good).await, "192.168.211.1").expect("lease listed");
    assert!(
        env.contains(&subnet.replace(".0/", ".1/")),
        "{env} vs {subnet}"
    );
    // The agent's log shows `watch` once the lease watch is set up and whenever it breaks.
    let logged = |what: &'static str, needle: &'static str, times: usize| {
        let agent = &agent;
        async move {
            weft_tests::poll::until(what, Duration::from_secs(15), || async {
                let log = agent.log();
                assert!(agent.exit_status().is_none(), "the agent exited:\n{log}");
                weft_tests::poll::check(log.matches(needle).count() >= times, log)
            })
            .await
        }
    };
    logged("the agent ready", "INFO weft::agent: ready", 1).await;
    // Ready comes before the watch stream is open; a cut before it would break no watch.
    logged("its lease watch running", "lease watch established", 1).await;
    for round in 1..=3 {
        // Mid-watch: the watch stream (and anything else in flight) loses its connection.
        relay.cut(true);
        relay.cut(false);
        let noticed = "lease watch broke; reconnecting";
        logged("the watch to notice the reset", noticed, round).await;
        let resumed = "lease watch re-established";
        logged("the watch to come back", resumed, round).await;
    }
    // Past the lease's TTL: only renewals over the new connections keep it. An observation
    // window, not a wait: the lease must survive all of it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let log = agent.log();
    let (after, ttl) = lease_of(&site.leases(&good).await, "192.168.211.1")
        .unwrap_or_else(|| panic!("the lease expired: renewals failed\n{log}"));
    assert_eq!(after, subnet, "{log}");
    assert!(ttl > 3, "{ttl} s left: renewals stopped\n{log}");
    assert!(agent.exit_status().is_none(), "{log}");
    assert!(!log.contains("client certificate"), "{log}");
    assert!(
        log.contains("closed the TLS connection after the handshake"),
        "the closes after the handshake did not happen:\n{log}"
    );
}
