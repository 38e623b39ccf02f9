//! weft's eBPF programs: entry points only. Each maps its module's verdict to
//! an action and a counter; see encap.rs and decap.rs for the logic.
#![no_std]
#![no_main]

mod decap;
mod decap6;
mod encap;
mod encap6;
mod maps;
mod maps6;
mod nexthop;
mod parse;
mod parse6;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// GPL-compatible: bpf_fib_lookup and bpf_redirect_neigh are GPL-only helpers.
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[classifier]
pub fn weft_tc_encap(ctx: TcContext) -> i32 {
    encap::encapsulate(&ctx).finish(TC_ACT_OK, TC_ACT_SHOT)
}

#[classifier]
pub fn weft_tc_host_encap(ctx: TcContext) -> i32 {
    encap::encapsulate_host(&ctx).finish(TC_ACT_OK, TC_ACT_SHOT)
}

#[xdp]
pub fn weft_xdp_decap(ctx: XdpContext) -> u32 {
    decap::xdp_decapsulate(&ctx).finish(xdp_action::XDP_PASS as i32, xdp_action::XDP_DROP as i32)
        as u32
}

#[classifier]
pub fn weft_tc_decap(ctx: TcContext) -> i32 {
    decap::tc_decapsulate(&ctx).finish(TC_ACT_OK, TC_ACT_SHOT)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
