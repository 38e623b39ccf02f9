//! A netlink dump nobody waits for any more is not read to its end. Needs root.
//!
//! The agent drops a reconcile pass when a lease event arrives, with the pass's dumps in
//! flight (thousands of routes, neighbours, fdb entries at 5000 peers). netlink-proto's
//! connection task used to go on reading such a dump to its last message, on a core the agent
//! needed, and logged "failed to forward response back to the handle" for every message
//! (136,086 lines in one bench run). Here a dump of many routes is dropped while the kernel
//! still says it is running; the connection must stop within a datagram or two, and no reply
//! it still forwards may find its stream gone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use weft::netlink::Netlink;
use weft_tests::netns::Netns;
use weft_tests::poll;

/// Routes in the namespace: a dump that takes long enough to be seen running (most of a
/// second or more in a debug build) and far more messages than a few datagrams hold.
const ROUTES: usize = 100_000;

/// netlink-proto logs through `log`; this counts its "failed to forward" warnings.
static FORWARD_WARNINGS: AtomicUsize = AtomicUsize::new(0);

struct CountForwardWarnings;

impl log::Log for CountForwardWarnings {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if record
            .args()
            .to_string()
            .contains("failed to forward response")
        {
            FORWARD_WARNINGS.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

/// The route netlink sockets of user space in the calling thread's namespace, from the
/// kernel's `/proc/net/netlink`: (port id, whether a dump is running on it).
fn route_sockets() -> Vec<(u32, bool)> {
    let table = std::fs::read_to_string("/proc/thread-self/net/netlink")
        .expect("read /proc/thread-self/net/netlink");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (eth, pid, dump) = (cols.get(1)?, cols.get(2)?, cols.get(6)?);
            let pid: u32 = pid.parse().ok()?;
            // Port 0 is the kernel's own socket.
            (*eth == "0" && pid != 0).then(|| (pid, *dump != "0"))
        })
        .collect()
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn a_dropped_dump_is_not_read_to_its_end() {
    log::set_logger(&CountForwardWarnings).expect("the only logger of this test binary");
    log::set_max_level(log::LevelFilter::Warn);
    let ns = Netns::create_blocking(&format!("wft-dump-{}", std::process::id()))
        .expect("create the namespace");
    ns.ip_blocking(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .expect("add the veth pair v0, v1");
    for dev in ["v0", "v1"] {
        ns.ip_blocking(&["link", "set", dev, "up"])
            .expect("set the veth pair up");
    }
    let batch: String = (0..ROUTES)
        .map(|i| {
            let (a, b, c) = (1 + i / 65536, (i / 256) % 256, i % 256);
            format!("route add 10.{a}.{b}.{c}/32 dev v0\n")
        })
        .collect();
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), batch).expect("write the route batch");
    let path = file.path().to_str().expect("a UTF-8 temp path").to_owned();
    ns.ip_blocking(&["-batch", &path])
        .expect("add the routes with ip -batch");

    let (whole, finished, warnings, closed_after) = ns
        .spawn_thread(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async {
                // How long reading the whole dump takes here: a connection that read on to the
                // end after the drop would close about that long after it.
                let started = Instant::now();
                let all = Netlink::connect()?.routes_v4().await?.len();
                anyhow::ensure!(
                    all >= ROUTES,
                    "the dump listed {all} routes, expected {ROUTES}"
                );
                let whole = started.elapsed();
                let nl = Netlink::connect()?;
                let dump = tokio::spawn(async move { nl.routes_v4().await.map(|r| r.len()) });
                poll::until(
                    "the route dump to be running",
                    Duration::from_secs(60),
                    || {
                        let seen = route_sockets();
                        async move { poll::check(seen.iter().any(|(_, dump)| *dump), seen) }
                    },
                )
                .await;
                let before = FORWARD_WARNINGS.load(Ordering::Relaxed);
                // Drops the stream and the last Netlink clone, as a dropped reconcile pass does.
                dump.abort();
                let dropped = Instant::now();
                let finished = dump.await.ok();
                poll::until(
                    "the dump's socket to close",
                    Duration::from_secs(60),
                    || {
                        let seen = route_sockets();
                        async move { poll::check(seen.is_empty(), seen) }
                    },
                )
                .await;
                let warnings = FORWARD_WARNINGS.load(Ordering::Relaxed) - before;
                anyhow::Ok((whole, finished, warnings, dropped.elapsed()))
            })
        })
        .join()
        .expect("the namespace thread")
        .expect("run the dump");
    eprintln!("{warnings} \"failed to forward\" warnings after the drop; socket closed {closed_after:?} after it; the whole dump takes {whole:?}");
    assert!(
        finished.is_none(),
        "the dump ended ({finished:?}) before it was dropped: nothing was tested"
    );
    // Half: the close is seen at the next look at /proc/net/netlink (every poll::INTERVAL,
    // 100 ms), and a connection reading on would close only after most of the dump.
    assert!(
        closed_after < whole / 2,
        "the dropped dump's socket closed {closed_after:?} after the drop, while reading the whole \
         dump takes {whole:?}: its connection read on instead of stopping within a datagram or two"
    );
    // None: the connection task may hold a datagram's worth of replies (about 620 of these
    // routes) when the caller gives up; the dropped dump's reply stream stays with that task
    // (`Abandoned` in `weft::netlink`), so every reply still reaches a live stream. Before:
    // 1,872 warnings in a debug run with the stream dropped under the task, 79,320 when the
    // connection read on to the end of the dump.
    assert_eq!(
        warnings, 0,
        "after dropping a dump of {ROUTES} routes, its connection logged {warnings} \
         \"failed to forward\" warnings (replies reaching a dropped stream); the socket closed \
         {closed_after:?} after the drop"
    );
}
