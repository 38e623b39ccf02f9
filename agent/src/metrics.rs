//! The agent's metrics, kept in a prometheus-client [`Registry`] and rendered in the Prometheus text
//! format 0.0.4.
//!
//! [`Metrics`] is shared (behind an `Arc`) by every task that has something to count: the lease
//! watcher sets [`Metrics::set_leases`], the etcd store bumps [`Metrics::etcd_reconnects`], and so
//! on. The datapath registers a [`DatapathStats`] provider whose per-CPU counters are read (and summed
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

use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A monotonically increasing count (a prometheus-client counter with the `add` the callers use).
#[derive(Debug, Default, Clone)]
pub struct Counter(prometheus_client::metrics::counter::Counter);

impl Counter {
    pub fn inc(&self) {
        self.0.inc();
    }

    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }

    pub fn get(&self) -> u64 {
        self.0.get()
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

type Labels = Vec<(&'static str, String)>;

/// The registered [`DatapathStats`] provider, read at scrape time.
#[derive(Clone, Default)]
struct StatsSlot(Arc<RwLock<Option<Arc<dyn DatapathStats>>>>);

/// Everything `/metrics` exposes. Create one, wrap it in an `Arc`, hand clones to the tasks.
#[derive(Debug)]
pub struct Metrics {
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
    leases: Gauge,
    datapath_mode: Family<Labels, Gauge>,
    reconcile_duration: Histogram,
    etcd_round_trip: Histogram,
    datapath_stats: StatsSlot,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        // The registry adds the final period to each help text, and `_total` to each counter's name.
        let leases = Gauge::default();
        registry.register(
            "weft_leases",
            "Subnet leases known from etcd, our own included",
            leases.clone(),
        );
        let datapath_mode = Family::<Labels, Gauge>::default();
        registry.register(
            "weft_datapath_mode",
            "Datapath in use: 1 for the active mode",
            datapath_mode.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.0.clone());
            c
        };
        let etcd_reconnects = counter(
            "weft_etcd_reconnects",
            "Times the etcd connection or watch was re-established",
        );
        let lease_renewals = counter(
            "weft_lease_renewals",
            "Successful renewals of this node's subnet lease",
        );
        let reconcile_repairs = counter(
            "weft_reconcile_repairs",
            "Drifted kernel, map or firewall state put back by reconcile",
        );
        let reconcile_errors = counter(
            "weft_reconcile_errors",
            "Reconcile passes in which a step failed (see the log); the other steps still ran",
        );
        let peers_added = counter("weft_peers_added", "Peers programmed into the datapath");
        let peers_removed = counter("weft_peers_removed", "Peers removed from the datapath");
        // 1 ms .. 8 s: a pass over a few peers takes milliseconds, one over thousands with a slow
        // netlink socket takes seconds.
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "weft_reconcile_duration_seconds",
            "Time one reconcile pass took",
            reconcile_duration.clone(),
        );
        // 0.5 ms .. 4 s: loopback etcd answers in under a millisecond, a distant or loaded one in seconds.
        let etcd_round_trip = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "weft_etcd_round_trip_seconds",
            "Time an etcd request (lease renewal) took to answer",
            etcd_round_trip.clone(),
        );
        let datapath_stats = StatsSlot::default();
        registry.register_collector(Box::new(datapath_stats.clone()));
        Self {
            etcd_reconnects,
            lease_renewals,
            reconcile_repairs,
            reconcile_errors,
            peers_added,
            peers_removed,
            leases,
            datapath_mode,
            reconcile_duration,
            etcd_round_trip,
            datapath_stats,
            registry,
        }
    }
}

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

impl Metrics {
    pub fn set_leases(&self, n: usize) {
        self.leases.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Record which datapath is active (`"ebpf"`, `"kernel"`, ...); exposed as a labelled gauge.
    pub fn set_datapath_mode(&self, mode: impl Into<String>) {
        self.datapath_mode.clear();
        self.datapath_mode
            .get_or_create(&vec![("mode", mode.into())])
            .set(1);
    }

    /// Register the provider of eBPF counters and map sizes; replaces any earlier one.
    pub fn set_datapath_stats(&self, stats: Arc<dyn DatapathStats>) {
        // A poisoned lock only means a writer panicked mid-assignment of an Option; the value is still whole.
        *self
            .datapath_stats
            .0
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(stats);
    }

    /// Record how long one reconcile pass took.
    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Record how long one etcd request took.
    pub fn observe_etcd(&self, took: Duration) {
        self.etcd_round_trip.observe(took.as_secs_f64());
    }

    /// The whole registry in Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String fails only if an encoder does, and ours do not.
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::warn!("render metrics: {e}");
        }
        out
    }
}

impl std::fmt::Debug for StatsSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathStats")
    }
}

impl Collector for StatsSlot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (maps, events) =
            stats.map_or_else(Default::default, |s| (s.map_entries(), s.counters()));
        let mut family = encoder.encode_descriptor(
            "weft_map_entries",
            "Entries in each eBPF map.",
            None,
            MetricType::Gauge,
        )?;
        for (map, n) in &maps {
            let gauge = ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX));
            gauge.encode(family.encode_family(&[("map", map.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "weft_datapath_events",
            "eBPF datapath counters, summed over CPUs.",
            None,
            MetricType::Counter,
        )?;
        for (counter, n) in &events {
            // IPv6's counters are IPv4's names behind "ipv6: " (weft_common::counter6).
            let (ip, name) = counter
                .strip_prefix("ipv6: ")
                .map_or(("ipv4", counter.as_str()), |name| ("ipv6", name));
            ConstCounter::new(*n)
                .encode(family.encode_family(&[("counter", name), ("family", ip)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl DatapathStats for Fixed {
        fn counters(&self) -> Vec<(String, u64)> {
            vec![
                ("encap_packets".into(), 7),
                ("drop \"bad\"".into(), 1),
                ("ipv6: encap_packets".into(), 3),
            ]
        }
        fn map_entries(&self) -> Vec<(String, u64)> {
            vec![("PEERS".into(), 3)]
        }
    }

    #[test]
    fn renders_counters_labels_histograms_and_provider() {
        let m = Metrics::default();
        m.set_leases(4);
        m.set_datapath_mode("kernel");
        m.set_datapath_mode("ebpf");
        m.peers_added.add(2);
        m.observe_reconcile(Duration::from_millis(3));
        m.set_datapath_stats(Arc::new(Fixed));
        let text = m.render();
        for want in [
            "# HELP weft_leases Subnet leases known from etcd, our own included.\n",
            "# TYPE weft_leases gauge\nweft_leases 4\n",
            "weft_datapath_mode{mode=\"ebpf\"} 1\n",
            "# TYPE weft_peers_added_total counter\nweft_peers_added_total 2\n",
            "weft_reconcile_duration_seconds_bucket{le=\"0.002\"} 0\n",
            "weft_reconcile_duration_seconds_bucket{le=\"0.004\"} 1\n",
            "weft_reconcile_duration_seconds_count 1\n",
            "weft_etcd_round_trip_seconds_count 0\n",
            "weft_map_entries{map=\"PEERS\"} 3\n",
            "# TYPE weft_datapath_events_total counter\n",
            "weft_datapath_events_total{counter=\"encap_packets\",family=\"ipv4\"} 7\n",
            "weft_datapath_events_total{counter=\"drop \\\"bad\\\"\",family=\"ipv4\"} 1\n",
            "weft_datapath_events_total{counter=\"encap_packets\",family=\"ipv6\"} 3\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(!text.contains("mode=\"kernel\""), "{text}");
    }
}
