//! Multi-host test harness.
