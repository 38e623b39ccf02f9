//! `weft status` shows what the agent's last reconcile round could not do, and clears it once a
//! round succeeds. Root only: `cargo xtask test` runs it.
//!
//! The failure is a real one: the agent's XDP decapsulation link on ens32 is detached by hand and
//! another XDP program takes the interface (as a second datapath would), so every round's
//! re-attach fails with EBUSY until that program goes away.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use weft::datapath::{Datapath as Loaded, DecapHook};
use weft_common::program_names::XDP_DECAP;
use weft_tests::attack::{self, Datapath};
use weft_tests::netns::spawn_in;
use weft_tests::{poll, Host};

/// How long a reconcile round may take to show up in `weft status`: the agents reconcile every
/// second here.
const ROUND: Duration = Duration::from_secs(20);

fn failures(st: &Value) -> Vec<Value> {
    st["reconcile_failures"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Detaches the agent's XDP link on ens32 and attaches a program of another datapath (pinned
/// under `blocker`) in its place, retrying when the agent re-attached in between.
async fn take_ens32(host: &Host, blocker: PathBuf) {
    let link = host
        .bpf_pin_dir()
        .join("links")
        .join(format!("{XDP_DECAP}@ens32"));
    let link = link.display().to_string();
    poll::until("another XDP program on ens32", ROUND, || {
        let (host, link, blocker) = (host, link.clone(), blocker.clone());
        async move {
            host.exec_ok(&["bpftool", "link", "detach", "pinned", &link])
                .await
                .map_err(|e| format!("{e:#}"))?;
            spawn_in(&host.netns().path(), move || {
                let mut other = Loaded::load(&blocker).map_err(|e| e.to_string())?;
                other
                    .attach_decap("ens32", DecapHook::Xdp)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .join()
            .expect("blocker thread")
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn status_shows_the_last_rounds_failures_until_a_round_succeeds() {
    let c = attack::start(Datapath::EbpfXdp, 2, 1, &["--reconcile-interval", "1s"]).await;
    let host = c.host(0);
    let st = attack::status(host).await;
    assert!(failures(&st).is_empty(), "failures before any: {st:#}");

    let blocker = host
        .bpf_pin_dir()
        .with_file_name(format!("{}-blocker", host.name()));
    take_ens32(host, blocker.clone()).await;
    let failed = poll::until(
        "weft status to show the failed re-attach",
        ROUND,
        || async {
            let st = attack::status(host).await;
            let f = failures(&st);
            let attach = f.iter().find(|f| {
                let e = f["error"].as_str().unwrap_or_default();
                f["layer"] == "ebpf" && e.contains("decapsulation") && e.contains("ens32")
            });
            attach.cloned().ok_or_else(|| format!("{st:#}"))
        },
    )
    .await;
    eprintln!("weft status shows: {failed}");

    // The other program goes: the next round attaches ours and the failure is gone.
    spawn_in(&host.netns().path(), move || {
        Loaded::detach_and_unpin(&blocker)
    })
    .join()
    .expect("blocker cleanup thread")
    .expect("remove the other XDP program");
    poll::until(
        "the failure cleared and decap attached again",
        ROUND,
        || async {
            let st = attack::status(host).await;
            poll::check(
                failures(&st).is_empty() && weft_tests::status::ebpf_ready(&st, 1),
                &st,
            )
        },
    )
    .await;
    // The text form says so too.
    let bin = weft_tests::weft_bin().expect("weft binary");
    let pin = host.bpf_pin_dir().display().to_string();
    let text = host
        .exec_ok(&[&bin.display().to_string(), "status", "--bpf-pin-dir", &pin])
        .await
        .expect("weft status");
    assert!(text.contains("last reconcile: no failures"), "{text}");
}
