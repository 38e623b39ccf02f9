//! weft's test harness: a simulated cluster on one machine, as root.
//!
//! - [`Etcd`]: a real etcd per test, on 127.0.0.1 ([`Etcd::start_local`]) or on a cluster's underlay.
//!
//! Every name (namespace, temp dir) carries the test process id and a counter so tests run in
//! parallel, and every handle cleans up what it made on drop, also when the test panics.

pub mod etcd;

pub use etcd::Etcd;
