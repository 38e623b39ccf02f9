//! Types shared between the eBPF programs and the agent through BPF maps.
//!
//! Every type is `#[repr(C)]` with explicit padding and a size assertion, and
//! names the byte order of multi-byte fields (`_be` = network order).
#![no_std]
