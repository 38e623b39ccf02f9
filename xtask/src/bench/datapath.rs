//! The datapath benchmark: rounds over the modes, the measurements, the eBPF check, the outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::{bail, Context as _};
use rand::seq::SliceRandom as _;

use super::{Options, Variants};
use crate::bench::bpf;
use crate::bench::chart::{self, Series};
use crate::bench::counters::{self, Counters, HostPath, RoundCheck};
use crate::bench::measure::{self, Servers, Test};
use crate::bench::programs::{self, LiveCost, Programs, Watched};
use crate::bench::report::{self, EbpfCounters, Report, Settings, VariantReport};
use crate::bench::stats::{metric_by_key, ModeSummary, Modes, Sample};
use crate::bench::targets::{self, Comparison};
use crate::bench::topology::{Builds, Family, Mode, Offload, Routing, Testbed};

struct Bed {
    /// `--programs`, ebpf mode: the live floor, attached on host 1 for the timing runs only.
    floor: Option<bpf::LiveFloor>,
    bed: Testbed,
    servers: Servers,
    /// `--programs`, ebpf mode: weft's programs on each host (label, prog id -> name).
    watched: Vec<Watched>,
}

pub async fn run(opts: &Options, builds: &Builds) -> anyhow::Result<()> {
    let routing = if opts.hand_routed {
        Routing::Hand
    } else {
        Routing::Agent
    };
    let mut modes = opts.modes.clone();
    modes.sort();
    modes.dedup();
    if routing == Routing::Hand && modes.iter().any(|m| m.is_ebpf()) {
        println!("--hand-routed: no ebpf mode without the agent; measuring the others");
        modes.retain(|m| !m.is_ebpf());
    }
    if opts.rounds == 0 || modes.is_empty() {
        bail!("nothing to measure: --rounds must be at least 1 and --modes not empty");
    }
    if opts.programs && !modes.contains(&Mode::Ebpf) {
        bail!("--programs measures the ebpf mode's programs: add ebpf to --modes");
    }
    if opts.programs && opts.family == Family::V6 {
        bail!("--programs times IPv4 packets only; drop it with --family 6");
    }
    let max_rounds = opts.max_rounds.max(opts.rounds);
    let variants: Vec<Offload> = match opts.offload {
        Variants::Both => vec![Offload::On, Offload::Off],
        Variants::On => vec![Offload::On],
        Variants::Off => vec![Offload::Off],
    };
    let started = Instant::now();
    let loadavg_start = loadavg();
    let stats_sysctl = bpf::stats_sysctl_on();
    if stats_sysctl == Some(true) {
        println!(
            "warning: kernel.bpf_stats_enabled is 1: every eBPF program on this machine reads the \
             clock twice per run, so the ebpf modes' figures carry that cost in every test. Unless \
             something else needs it: sysctl -w kernel.bpf_stats_enabled=0"
        );
    }

    let mut beds = BTreeMap::new();
    let mut congestion_control = BTreeMap::new();
    let mut live_floor_missing = None;
    for &mode in &modes {
        println!("==> set up {mode}");
        let bed = Testbed::start(mode, routing, opts.family, builds.for_mode(mode)?)
            .await
            .with_context(|| format!("set up the {mode} test bed"))?;
        let mut used = BTreeSet::new();
        for end in [&bed.client, &bed.server, &bed.host_client] {
            used.insert(
                end.congestion_control(opts.congestion_control.as_deref())
                    .await?,
            );
        }
        congestion_control.insert(
            mode.name().to_owned(),
            used.into_iter().collect::<Vec<_>>().join(", "),
        );
        let servers = Servers::start(&bed.server).await?;
        let mut watched = Vec::new();
        let mut floor = None;
        // The baseline's programs are timed too: a regression shows against the same rounds.
        if opts.programs && matches!(mode, Mode::Ebpf | Mode::EbpfBase) {
            for host in bed.hosts() {
                watched.push(Watched {
                    host: host_label(host.index()),
                    baseline: mode == Mode::EbpfBase,
                    programs: programs::weft_programs(host, &bed.weft).await?,
                });
            }
        }
        if opts.programs && mode == Mode::Ebpf {
            // Attached once here to find out now whether it can be; then for each timing run.
            let floor_ok = async {
                let f = bpf::LiveFloor::load()?;
                f.attach(bed.hosts()[0].netns(), FLOOR_DEVICE).await?;
                anyhow::Ok(f)
            };
            match floor_ok.await {
                Ok(f) => {
                    // Host 1's list: the floor's statistics are read with its programs'.
                    watched[0]
                        .programs
                        .insert(f.prog_id, bpf::FLOOR_NAME.to_owned());
                    floor = Some(f);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    println!("warning: the live floor is not measured: {why}");
                    live_floor_missing = Some(why);
                }
            }
        }
        beds.insert(
            mode,
            Bed {
                floor,
                bed,
                servers,
                watched,
            },
        );
    }

    let mut ebpf = EbpfCounters {
        source: "weft status --json (in each host namespace)",
        ..Default::default()
    };
    let path = opts.family.path_counters();
    if let Some(b) = beds.get(&Mode::Ebpf) {
        for host in b.bed.hosts() {
            let c = counters::read_ebpf_counters(host, path, &b.bed.weft).await?;
            ebpf.before.insert(host_label(host.index()), c);
        }
    }

    let Measured {
        samples,
        offloads,
        live,
        checks,
        rounds,
    } = run_rounds(opts, &modes, &variants, max_rounds, &mut beds).await?;
    ebpf.rounds = checks;

    if let Some(b) = beds.get(&Mode::Ebpf) {
        for host in b.bed.hosts() {
            let c = counters::read_ebpf_counters(host, path, &b.bed.weft).await?;
            ebpf.after.insert(host_label(host.index()), c);
        }
    }
    ebpf.all_rounds_through_ebpf =
        !ebpf.rounds.is_empty() && ebpf.rounds.iter().all(|c| c.through_ebpf);
    let programs = match (opts.programs, beds.get(&Mode::Ebpf)) {
        (true, Some(b)) => Some(program_costs(b, live, live_floor_missing).await?),
        _ => None,
    };
    drop(beds);

    let by_variant = |v: Offload| -> Modes {
        samples
            .iter()
            .filter(|((variant, _), _)| *variant == v)
            .map(|((_, mode), s)| (mode.name().to_owned(), ModeSummary::of(s.clone())))
            .collect()
    };
    let first = variants[0];
    let main_modes = by_variant(first);
    let no_offload = (variants.len() > 1).then(|| VariantReport {
        comparison: compare_variant(&samples, Offload::Off, opts.family),
        modes: by_variant(Offload::Off),
    });

    let report = Report {
        family: opts.family.number(),
        rounds,
        comparison: compare_variant(&samples, first, opts.family),
        modes: main_modes,
        ebpf_counters: ebpf,
        variant: first.name(),
        no_offload,
        programs,
        settings: Settings {
            loadavg_start,
            loadavg_end: loadavg(),
            baseline: baseline_setting(opts, &modes, builds),
            bpf_stats_enabled: stats_sysctl,
            tcp_congestion_control: congestion_control,
            ..settings(opts, max_rounds, routing, offloads)
        },
    };
    write_outputs(&report, opts, started)
}

/// What the rounds gathered.
#[derive(Default)]
struct Measured {
    samples: BTreeMap<(Offload, Mode), Vec<Sample>>,
    /// `ethtool -k` of the underlay per mode and variant.
    offloads: BTreeMap<String, String>,
    live: Vec<LiveCost>,
    checks: Vec<RoundCheck>,
    rounds: usize,
}

/// `--rounds` rounds, then more while a target is inconclusive, up to `max_rounds`. Each round
/// measures every mode once, in a fresh order, and each mode in every variant, in a fresh order.
async fn run_rounds(
    opts: &Options,
    modes: &[Mode],
    variants: &[Offload],
    max_rounds: usize,
    beds: &mut BTreeMap<Mode, Bed>,
) -> anyhow::Result<Measured> {
    let mut m = Measured::default();
    let mut rng = rand::rng();
    let mut round = 0;
    loop {
        round += 1;
        let mut order = modes.to_vec();
        order.shuffle(&mut rng);
        let names: Vec<&str> = order.iter().map(|mode| mode.name()).collect();
        println!(
            "==> round {round} (of {} to {max_rounds}): {}",
            opts.rounds,
            names.join(", ")
        );
        for mode in order {
            let b = beds.get_mut(&mode).context("every mode has a test bed")?;
            let mut vs = variants.to_vec();
            vs.shuffle(&mut rng);
            for variant in vs {
                b.bed.set_offload(variant).await?;
                m.offloads.insert(
                    format!("{mode} {}", variant.name()),
                    b.bed.offload_state().await?,
                );
                let (sample, check) = measure_mode(b, round, variant, opts, &mut m.live)
                    .await
                    .with_context(|| format!("round {round}, {mode}, {}", variant.name()))?;
                let fallback = opts.family.path_counters().fallback_device;
                print_sample(mode, variant, &sample, check.as_ref(), fallback);
                if let Some(check) = check {
                    m.checks.push(check);
                }
                m.samples.entry((variant, mode)).or_default().push(sample);
            }
        }
        if round < opts.rounds {
            continue;
        }
        let open: usize = variants
            .iter()
            .map(|&v| compare_variant(&m.samples, v, opts.family).inconclusive())
            .sum();
        // Below the rounds a verdict needs, added rounds could not settle anything.
        if open == 0 || round >= max_rounds || max_rounds < targets::MIN_ROUNDS_FOR_VERDICT {
            if open > 0 {
                println!(
                    "==> {open} targets still inconclusive after {round} rounds (--max-rounds {max_rounds})"
                );
            }
            m.rounds = round;
            return Ok(m);
        }
        println!("==> {open} targets inconclusive after {round} rounds: one more round");
    }
}

/// BPF_PROG_TEST_RUN of the ebpf bed's programs, with the live costs gathered in the rounds.
async fn program_costs(
    b: &Bed,
    live: Vec<LiveCost>,
    live_floor_missing: Option<String>,
) -> anyhow::Result<Programs> {
    let hosts = b.bed.hosts();
    let (client, server) = b
        .bed
        .containers
        .as_ref()
        .context("the ebpf test bed has containers")?;
    let test_run = programs::test_runs(&programs::Endpoints {
        sender: &hosts[0],
        receiver: &hosts[1],
        client,
        server,
    })
    .await
    .context("BPF_PROG_TEST_RUN timings")?;
    Ok(Programs {
        target_ns: programs::TARGET_NS,
        live,
        live_floor_missing,
        test_run,
    })
}

/// report.json, report.svg, report.md and the terminal's tables; an error when an ebpf round did
/// not go through eBPF (its figures are then not eBPF figures).
fn write_outputs(report: &Report, opts: &Options, started: Instant) -> anyhow::Result<()> {
    let rounds = report.rounds;
    let first = if report.variant == Offload::Off.name() {
        Offload::Off
    } else {
        Offload::On
    };
    let family = opts.family;
    let [json_path, svg_path, md_path] = report_paths(opts);
    report.write(&json_path)?;
    let mut series = vec![Series {
        name: first.name(),
        modes: &report.modes,
    }];
    if let Some(no) = &report.no_offload {
        series.push(Series {
            name: Offload::Off.name(),
            modes: &no.modes,
        });
    }
    chart::draw(
        &svg_path,
        &chart_title(rounds as u64, opts.seconds, family),
        &series,
    )?;

    println!(
        "{}",
        report::table(
            &format!("{}underlay: {}", family_prefix(family), describe(first)),
            rounds,
            &report.modes,
            &report.comparison
        )
    );
    if let Some(no) = &report.no_offload {
        println!(
            "{}",
            report::table(
                &format!(
                    "{}underlay: {}",
                    family_prefix(family),
                    describe(Offload::Off)
                ),
                rounds,
                &no.modes,
                &no.comparison
            )
        );
    }
    if let Some(p) = &report.programs {
        println!("{}", programs::summary(p));
    }
    std::fs::write(&md_path, markdown_report(report, first, rounds))
        .with_context(|| format!("write {}", md_path.display()))?;
    println!(
        "report: {}\nchart:  {}\ntable:  {}\ntook {:.0} s, {rounds} rounds; load average {} at the start, {} at the end",
        json_path.display(),
        svg_path.display(),
        md_path.display(),
        started.elapsed().as_secs_f64(),
        report.settings.loadavg_start,
        report.settings.loadavg_end
    );
    println!("{}", conditions(report));
    let ebpf = &report.ebpf_counters;
    if !ebpf.rounds.is_empty() {
        if ebpf.all_rounds_through_ebpf && !opts.tests.contains(&Test::Udp64) {
            println!(
                "eBPF counters: in every round of {} both programs carried the tests and {} sent under {:.0} % of what they encapsulated",
                ebpf_modes(&ebpf.rounds),
                family.path_counters().fallback_device,
                (1.0 - counters::MIN_SHARE) * 100.0,
            );
        } else if ebpf.all_rounds_through_ebpf {
            println!(
                "eBPF counters: every round of {} encapsulated and decapsulated >= {:.0} % of its {}UDP packets in eBPF",
                ebpf_modes(&ebpf.rounds),
                counters::MIN_SHARE * 100.0,
                match family {
                    Family::V4 => "",
                    Family::V6 => "IPv6 ",
                }
            );
        } else {
            let bad: Vec<String> = ebpf
                .rounds
                .iter()
                .filter(|c| !c.through_ebpf)
                .map(|c| {
                    format!(
                        "round {} {} {}: {} UDP packets received, {} encapsulated, {} decapsulated, {} tx {:?}",
                        c.round,
                        c.mode,
                        c.variant,
                        c.udp_received,
                        c.sender_encapsulated,
                        c.receiver_decapsulated,
                        family.path_counters().fallback_device,
                        c.sender_flannel1_tx
                    )
                })
                .collect();
            bail!(
                "an eBPF mode did NOT go through eBPF in every round (kernel fallback?); its figures are \
                 not eBPF figures:\n  {}",
                bad.join("\n  ")
            );
        }
    }
    Ok(())
}

/// The comparison of one variant's modes so far.
fn compare_variant(
    samples: &BTreeMap<(Offload, Mode), Vec<Sample>>,
    v: Offload,
    family: Family,
) -> Comparison {
    let modes: Modes = samples
        .iter()
        .filter(|((variant, _), _)| *variant == v)
        .map(|((_, mode), s)| (mode.name().to_owned(), ModeSummary::of(s.clone())))
        .collect();
    let mut judged = targets::targets(family, v == Offload::On);
    if modes.contains_key(targets::EBPF_BASE) {
        judged.extend(targets::baseline_targets());
    }
    // A metric whose test did not run (`--tests`) has no verdict to wait for.
    let measured = |key: &str| {
        metric_by_key(key)
            .is_some_and(|m| modes.values().any(|s| (m.get)(&s.medians()).is_finite()))
    };
    judged.retain(|t| measured(t.metric));
    targets::compare(&modes, judged, v.name())
}

/// report.json, report.svg and report.md in the output directory (`--family 6`: report6.*).
fn report_paths(opts: &Options) -> [std::path::PathBuf; 3] {
    let stem = opts.family.report_stem();
    ["json", "svg", "md"].map(|ext| opts.out_dir().join(format!("{stem}.{ext}")))
}

/// Redraw the chart from an earlier run's report.json (`--family 6`: report6.json).
pub fn replot(opts: &Options) -> anyhow::Result<()> {
    let [json_path, svg, _] = report_paths(opts);
    let text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("read {}", json_path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", json_path.display()))?;
    let modes = |v: &serde_json::Value| -> anyhow::Result<Modes> {
        serde_json::from_value(v.clone()).context("read `modes`")
    };
    let main = modes(&v["modes"])?;
    let no = match v.get("no_offload") {
        Some(n) => Some(modes(&n["modes"])?),
        None => None,
    };
    let mut series = vec![Series {
        name: v["variant"].as_str().unwrap_or(Offload::On.name()),
        modes: &main,
    }];
    if let Some(no) = &no {
        series.push(Series {
            name: Offload::Off.name(),
            modes: no,
        });
    }
    chart::draw(
        &svg,
        &chart_title(
            v["rounds"].as_u64().unwrap_or(0),
            v["settings"]["seconds_per_test"].as_u64().unwrap_or(0),
            opts.family,
        ),
        &series,
    )?;
    println!("chart: {}", svg.display());
    Ok(())
}

fn chart_title(rounds: u64, seconds: u64, family: Family) -> String {
    format!(
        "weft datapaths across two hosts (netns){}, {rounds} rounds x {seconds} s, medians; bare = host to host, no overlay",
        match family {
            Family::V4 => "",
            Family::V6 => ", IPv6",
        }
    )
}

/// What the terminal tables and report.md say first: nothing for IPv4, as before.
fn family_prefix(family: Family) -> &'static str {
    match family {
        Family::V4 => "",
        Family::V6 => "IPv6 containers over the IPv6 underlay; ",
    }
}

/// The test's result when it is chosen (`--tests`); a future not awaited never starts.
async fn when<T>(
    chosen: bool,
    test: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Option<T>> {
    Ok(match chosen {
        true => Some(test.await?),
        false => None,
    })
}

/// One round of one mode: TCP 1 stream, TCP 4 streams, ping-pong, 64-byte UDP, then TCP 1 stream
/// and ping-pong from host 1's own namespace; for ebpf with the datapath counters read around it;
/// with `--programs`, then the timing run ([`timing_run`]).
async fn measure_mode(
    b: &mut Bed,
    round: usize,
    variant: Offload,
    opts: &Options,
    live: &mut Vec<LiveCost>,
) -> anyhow::Result<(Sample, Option<RoundCheck>)> {
    let (secs, runs) = (opts.seconds, |t: Test| opts.tests.contains(&t));
    let ebpf = b.bed.mode.is_ebpf();
    let path = b.bed.family.path_counters();
    let weft = b.bed.weft.clone();
    let hosts = b.bed.hosts();
    let (sender, receiver) = (&hosts[0], &hosts[1]);
    let before = if ebpf {
        Some((
            counters::read_ebpf_counters(sender, path, &weft).await?,
            counters::read_ebpf_counters(receiver, path, &weft).await?,
            counters::fallback_tx_packets(sender, path).await,
        ))
    } else {
        None
    };
    let (client, server) = (&b.bed.client, &b.bed.server);
    let tcp1 = when(runs(Test::Tcp1), measure::tcp(client, server, 1, secs)).await?;
    let tcp4 = when(runs(Test::Tcp4), measure::tcp(client, server, 4, secs)).await?;
    let rr = when(
        runs(Test::Rr),
        measure::rr(client, server, &mut b.servers, secs),
    )
    .await?;
    let udp = when(runs(Test::Udp64), measure::udp64(client, server, secs)).await?;
    // In bare the client is host 1's namespace already: the host-originated test is the main one.
    // Which path host 1's own traffic took (ebpf): encapsulations and flannel.1 (flannel-v6.1)
    // packets during the host-originated tests.
    let host_before = if ebpf {
        Some((
            counters::read_ebpf_counters(sender, path, &weft).await?,
            counters::fallback_tx_packets(sender, path).await,
        ))
    } else {
        None
    };
    let (host_tcp1_gbps, host_rr_p50_us) = if !runs(Test::Host) {
        (f64::NAN, f64::NAN)
    } else if b.bed.mode == Mode::Bare {
        (
            tcp1.as_ref().map_or(f64::NAN, |t| t.gbps),
            rr.as_ref().map_or(f64::NAN, |r| r.p50_us),
        )
    } else {
        let host = &b.bed.host_client;
        let t = measure::tcp(host, server, 1, secs)
            .await
            .context("host 1 to the remote container, TCP")?;
        let r = measure::rr(host, server, &mut b.servers, secs)
            .await
            .context("host 1 to the remote container, ping-pong")?;
        (t.gbps, r.p50_us)
    };
    // A test that did not run leaves NaN: no figure, left out of medians and ratios.
    let sample = Sample {
        round,
        tcp1_gbps: tcp1.as_ref().map_or(f64::NAN, |t| t.gbps),
        tcp4_gbps: tcp4.as_ref().map_or(f64::NAN, |t| t.gbps),
        rr_p50_us: rr.as_ref().map_or(f64::NAN, |r| r.p50_us),
        rr_p99_us: rr.as_ref().map_or(f64::NAN, |r| r.p99_us),
        rr_tps: rr.as_ref().map_or(f64::NAN, |r| r.tps),
        udp64_pps: udp.as_ref().map_or(f64::NAN, |u| u.pps()),
        cpu_s_per_gb: tcp1
            .as_ref()
            .map_or(f64::NAN, |t| t.cpu_seconds / (t.bytes as f64 / 1e9)),
        host_tcp1_gbps,
        host_rr_p50_us,
    };
    let check = match before {
        Some((s0, r0, f0)) => {
            let s1: Counters = counters::read_ebpf_counters(sender, path, &weft).await?;
            let r1 = counters::read_ebpf_counters(receiver, path, &weft).await?;
            let f1 = counters::fallback_tx_packets(sender, path).await;
            let flannel_tx = f0.zip(f1).map(|(a, b)| b.saturating_sub(a));
            let mut check = RoundCheck::new(
                path,
                round,
                variant.name(),
                udp.as_ref().map(|u| u.received),
                counters::delta(&s0, &s1),
                counters::delta(&r0, &r1),
                flannel_tx,
            );
            check.mode = b.bed.mode.name();
            if let Some((h0, hf0)) = host_before {
                let during = counters::delta(&h0, &s1);
                let of = |name| counters::find(&during, name).unwrap_or(0.0);
                check.host_tests = Some(HostPath {
                    encapsulated: of(path.encapsulated) + of(path.host_encapsulated),
                    flannel1_tx: hf0.zip(f1).map(|(a, b)| b.saturating_sub(a)),
                });
            }
            if b.bed.family == Family::V6 || udp.is_none() {
                check.judge_container_tests();
            }
            Some(check)
        }
        None => None,
    };
    if !b.watched.is_empty() && runs(Test::Udp64) {
        timing_run(b, secs, live).await?;
    }
    Ok((sample, check))
}

/// The device on host 1 the live floor is attached to: every packet encapsulation redirects
/// leaves through it.
const FLOOR_DEVICE: &str = "ens32";

/// `--programs`: one more 64-byte UDP test, with run-time statistics on (and in the ebpf bed the
/// live floor attached) for it alone, adding the programs' statistics into `live`. Its packet
/// rate is no metric: the tests the metrics come from ran without either.
async fn timing_run(b: &Bed, secs: u64, live: &mut Vec<LiveCost>) -> anyhow::Result<()> {
    let _stats = bpf::StatsEnabled::enable()?;
    let _floor = match &b.floor {
        Some(f) => Some(f.attach(b.bed.hosts()[0].netns(), FLOOR_DEVICE).await?),
        None => None,
    };
    let before = programs::run_stats().await?;
    measure::udp64(&b.bed.client, &b.bed.server, secs)
        .await
        .context("the timing run (64-byte UDP)")?;
    let after = programs::run_stats().await?;
    for w in &b.watched {
        programs::accumulate(live, w, &before, &after);
    }
    Ok(())
}

fn print_sample(
    mode: Mode,
    variant: Offload,
    s: &Sample,
    check: Option<&RoundCheck>,
    fallback: &str,
) {
    let verdict = match check {
        Some(c) if c.through_ebpf => format!(
            " [eBPF counters ok{}]",
            c.host_tests.as_ref().map_or(String::new(), |h| format!(
                "; host tests: {:.0} encapsulated, {} on {fallback}",
                h.encapsulated,
                h.flannel1_tx.map_or("-".to_owned(), |n| n.to_string())
            ))
        ),
        Some(c) => format!(
            " [NOT through eBPF: {} encapsulated, {} decapsulated of {} UDP packets{}]",
            c.sender_encapsulated,
            c.receiver_decapsulated,
            c.udp_received,
            c.container_tests_fallback_tx
                .map_or(String::new(), |n| format!(
                    "; {n} packets on {fallback} during the container tests"
                ))
        ),
        None => String::new(),
    };
    println!(
        "    {:<13}{:<11} tcp1 {:>6.2} Gbit/s  tcp4 {:>6.2} Gbit/s  rr p50 {:>6.1} µs p99 {:>7.1} µs {:>7.0}/s  udp64 {:>8.0} pkt/s  cpu {:>5.2} s/GB  host: tcp1 {:>6.2} Gbit/s rr p50 {:>6.1} µs{verdict}",
        mode.name(),
        variant.name(),
        s.tcp1_gbps,
        s.tcp4_gbps,
        s.rr_p50_us,
        s.rr_p99_us,
        s.rr_tps,
        s.udp64_pps,
        s.cpu_s_per_gb,
        s.host_tcp1_gbps,
        s.host_rr_p50_us
    );
}

/// The eBPF modes the checks cover, in the order they first ran: "ebpf, ebpf-base".
fn ebpf_modes(checks: &[RoundCheck]) -> String {
    let mut modes: Vec<&str> = Vec::new();
    for c in checks {
        if !modes.contains(&c.mode) {
            modes.push(c.mode);
        }
    }
    modes.join(", ")
}

/// report.json's `settings.baseline`: which build ebpf-base ran, when it ran.
fn baseline_setting(opts: &Options, modes: &[Mode], builds: &Builds) -> Option<String> {
    let bin = builds
        .base
        .as_ref()
        .filter(|_| modes.contains(&Mode::EbpfBase))?;
    Some(match std::env::var_os(super::BASE_BIN_VAR) {
        Some(_) => format!("{} ({})", super::BASE_BIN_VAR, bin.display()),
        None => format!("{} ({})", opts.baseline, bin.display()),
    })
}

fn host_label(index: usize) -> String {
    format!("host{}", index + 1)
}

fn describe(o: Offload) -> &'static str {
    match o {
        Offload::On => "veth defaults (TSO/GSO on), GRO on at ens32",
        Offload::Off => "TSO/GSO off on both ends of each wire, GRO on at ens32",
    }
}

fn markdown_report(report: &Report, first: Offload, rounds: usize) -> String {
    let ipv6 = match report.family {
        6 => "IPv6 containers over the IPv6 underlay. ",
        _ => "",
    };
    let mut md = format!(
        "{ipv6}Underlay: {}.\n\n{}",
        describe(first),
        report::markdown(rounds, &report.modes, &report.comparison)
    );
    if let Some(no) = &report.no_offload {
        md.push_str(&format!(
            "\nUnderlay: {}.\n\n{}",
            describe(Offload::Off),
            report::markdown(rounds, &no.modes, &no.comparison)
        ));
    }
    if let Some(p) = &report.programs {
        md.push_str(&format!(
            "\nPer packet in the eBPF programs:\n\n{}",
            programs::grid(p).markdown()
        ));
    }
    md.push_str(&format!("\n{}\n", conditions(report)));
    md
}

/// What the machine did to every mode alike: the TCP congestion control and whether run-time
/// statistics were on for every program.
fn conditions(report: &Report) -> String {
    let s = &report.settings;
    let cc: Vec<String> = s
        .tcp_congestion_control
        .iter()
        .map(|(mode, cc)| format!("{mode} {cc}"))
        .collect();
    let stats = match s.bpf_stats_enabled {
        Some(true) => "ON for the whole run (every eBPF program timed its runs)",
        Some(false) if report.programs.is_some() => "off outside the timing runs",
        Some(false) => "off",
        None => "unknown",
    };
    format!(
        "TCP congestion control: {}; kernel.bpf_stats_enabled: {stats}",
        cc.join(", ")
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn settings(
    opts: &Options,
    max_rounds: usize,
    routing: Routing,
    offloads: BTreeMap<String, String>,
) -> Settings {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    Settings {
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        seconds_per_test: opts.seconds,
        min_rounds: opts.rounds,
        max_rounds,
        interval_method: format!(
            "per-round ratio (both modes measured in the same round), median over rounds; 95 % \
             percentile bootstrap over rounds ({} resamples, seeded per ratio: reproducible); a \
             target is met when the whole interval clears it, not met when it misses it entirely, \
             otherwise inconclusive (always with fewer than {} rounds); rounds are added while any \
             target is inconclusive, up to max_rounds",
            crate::bench::stats::BOOTSTRAP_RESAMPLES,
            targets::MIN_ROUNDS_FOR_VERDICT
        ),
        container_mtu: opts.family.container_mtu(),
        routing: match routing {
            Routing::Agent => "weft agent",
            Routing::Hand => "by hand, as flanneld programs it (no agent)",
        },
        rr_tool: match opts.family {
            Family::V4 => format!(
                "sockperf ping-pong --tcp -m {} --full-rtt (round-trip times; transactions/s = messages of the valid period / its length)",
                measure::RR_MESSAGE_BYTES
            ),
            Family::V6 => format!(
                "xtask's own TCP ping-pong (Debian 12's sockperf 3.7 takes no IPv6 addresses): {} B \
                 messages, one in flight, TCP_NODELAY, blocking sockets; round trips after a 400 ms \
                 warm-up, nearest-rank p50/p99; transactions/s = round trips after the warm-up / \
                 the time left",
                measure::RR_MESSAGE_BYTES
            ),
        },
        udp_tool: format!(
            "iperf3 -u -l {} -b 0; received = sent - lost as the server counted",
            measure::UDP_PAYLOAD_BYTES
        ),
        cpu_method: "TCP 1 stream: iperf3 client + server CPU (getrusage, as iperf3 -J reports it) plus \
                     ksoftirqd threads' utime+stime, divided by the bytes received"
            .to_owned(),
        offloads,
        kernel,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg_start: String::new(),
        loadavg_end: String::new(),
        baseline: None,
        bpf_stats_enabled: None,
        tcp_congestion_control: BTreeMap::new(),
    }
}
