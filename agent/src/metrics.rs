//! The agent's metrics registry and its Prometheus text rendering.
//!
//! [`Metrics`] is a set of atomics shared (behind an `Arc`) by every task that has something to count:
//! the lease watcher sets [`Metrics::set_leases`], the etcd store bumps [`Metrics::etcd_reconnects`], and
//! so on. The datapath registers a [`DatapathStats`] provider whose per-CPU counters are read (and summed
//! by the provider) only when `/metrics` is scraped, so the fast path never pays for metrics.
//!
//! ```no_run
//! use std::sync::Arc;
//! use weft::metrics::Metrics;
//!
//! let metrics = Arc::new(Metrics::default());
//! metrics.set_datapath_mode("ebpf");
//! metrics.peers_added.inc();
//! print!("{}", metrics.render());
//! ```

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the eBPF datapath reports at scrape time. Implemented by the datapath module, which is the only
/// one allowed to read maps.
pub trait DatapathStats: Send + Sync {
    /// Datapath counters by name (e.g. `"encap_packets"`), each already summed over all CPUs.
    fn counters(&self) -> Vec<(String, u64)>;

    /// Number of entries in each map, by map name.
    fn map_entries(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// Everything `/metrics` exposes. Create one, wrap it in an `Arc`, hand clones to the tasks.
#[derive(Default)]
pub struct Metrics {
    /// Leases currently known from etcd, our own included.
    pub leases: Gauge,
    /// Times the etcd connection or watch had to be re-established.
    pub etcd_reconnects: Counter,
    /// Successful renewals of our own lease.
    pub lease_renewals: Counter,
    /// Kernel, map or firewall state that drifted and was put back by a reconcile pass.
    pub reconcile_repairs: Counter,
    /// Reconcile passes in which a step failed (each failure is logged); the
    /// pass still ran every other step.
    pub reconcile_errors: Counter,
    /// Peers programmed into the datapath.
    pub peers_added: Counter,
    /// Peers removed from the datapath.
    pub peers_removed: Counter,
    datapath_mode: RwLock<Option<String>>,
    datapath_stats: RwLock<Option<Arc<dyn DatapathStats>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("leases", &self.leases)
            .field("etcd_reconnects", &self.etcd_reconnects)
            .field("lease_renewals", &self.lease_renewals)
            .field("reconcile_repairs", &self.reconcile_repairs)
            .field("reconcile_errors", &self.reconcile_errors)
            .field("peers_added", &self.peers_added)
            .field("peers_removed", &self.peers_removed)
            .finish_non_exhaustive()
    }
}

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Metrics {
    pub fn set_leases(&self, n: usize) {
        self.leases.set(n as u64);
    }

    /// Record which datapath is active (`"ebpf"`, `"kernel"`, ...); exposed as a labelled gauge.
    pub fn set_datapath_mode(&self, mode: impl Into<String>) {
        // A poisoned lock only means a writer panicked mid-assignment of an Option; the value is still whole.
        *self
            .datapath_mode
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(mode.into());
    }

    /// Register the provider of eBPF counters and map sizes; replaces any earlier one.
    pub fn set_datapath_stats(&self, stats: Arc<dyn DatapathStats>) {
        *self
            .datapath_stats
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(stats);
    }

    /// The whole registry in Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "weft_leases",
            "gauge",
            "Subnet leases known from etcd, our own included.",
        );
        sample(&mut out, "weft_leases", None, self.leases.get());

        let mode = self
            .datapath_mode
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        family(
            &mut out,
            "weft_datapath_mode",
            "gauge",
            "Datapath in use: 1 for the active mode.",
        );
        if let Some(mode) = mode {
            sample(&mut out, "weft_datapath_mode", Some(("mode", &mode)), 1);
        }

        let counters: [(&str, &str, &Counter); 6] = [
            (
                "weft_etcd_reconnects_total",
                "Times the etcd connection or watch was re-established.",
                &self.etcd_reconnects,
            ),
            (
                "weft_lease_renewals_total",
                "Successful renewals of this node's subnet lease.",
                &self.lease_renewals,
            ),
            (
                "weft_reconcile_repairs_total",
                "Drifted kernel, map or firewall state put back by reconcile.",
                &self.reconcile_repairs,
            ),
            (
                "weft_reconcile_errors_total",
                "Reconcile passes in which a step failed (see the log); the other steps still ran.",
                &self.reconcile_errors,
            ),
            (
                "weft_peers_added_total",
                "Peers programmed into the datapath.",
                &self.peers_added,
            ),
            (
                "weft_peers_removed_total",
                "Peers removed from the datapath.",
                &self.peers_removed,
            ),
        ];
        for (name, help, c) in counters {
            family(&mut out, name, "counter", help);
            sample(&mut out, name, None, c.get());
        }

        let stats = self
            .datapath_stats
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (maps, ebpf) = stats.map_or_else(Default::default, |s| (s.map_entries(), s.counters()));
        family(
            &mut out,
            "weft_map_entries",
            "gauge",
            "Entries in each eBPF map.",
        );
        for (map, n) in &maps {
            sample(&mut out, "weft_map_entries", Some(("map", map)), *n);
        }
        family(
            &mut out,
            "weft_datapath_events_total",
            "counter",
            "eBPF datapath counters, summed over CPUs.",
        );
        for (counter, n) in &ebpf {
            sample(
                &mut out,
                "weft_datapath_events_total",
                Some(("counter", counter)),
                *n,
            );
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing into a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, label: Option<(&str, &str)>, value: u64) {
    let _ = match label {
        Some((k, v)) => writeln!(out, "{name}{{{k}=\"{}\"}} {value}", escape_label(v)),
        None => writeln!(out, "{name} {value}"),
    };
}

/// Label values escape backslash, double quote and newline (exposition format 0.0.4).
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl DatapathStats for Fixed {
        fn counters(&self) -> Vec<(String, u64)> {
            vec![("encap_packets".into(), 7), ("drop \"bad\"".into(), 1)]
        }
        fn map_entries(&self) -> Vec<(String, u64)> {
            vec![("PEERS".into(), 3)]
        }
    }

    #[test]
    fn renders_counters_labels_and_provider() {
        let m = Metrics::default();
        m.set_leases(4);
        m.set_datapath_mode("ebpf");
        m.peers_added.add(2);
        m.set_datapath_stats(Arc::new(Fixed));
        let text = m.render();
        assert!(
            text.contains("# TYPE weft_leases gauge\nweft_leases 4\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_datapath_mode{mode=\"ebpf\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("weft_peers_added_total 2\n"), "{text}");
        assert!(
            text.contains("weft_map_entries{map=\"PEERS\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_datapath_events_total{counter=\"encap_packets\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_datapath_events_total{counter=\"drop \\\"bad\\\"\"} 1\n"),
            "{text}"
        );
    }
}
