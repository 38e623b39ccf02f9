//! The programs by kind, and running them on a packet with BPF_PROG_TEST_RUN
//! (no interface needed; redirects are returned as a code, not performed).

use aya::{
    programs::{Program, TestRun, TestRunOptions},
    Ebpf,
};
use weft_common::program_names;

use super::{Datapath, DatapathError};

/// The programs in the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProgramKind {
    TcEncap,
    XdpDecap,
    TcDecap,
    /// On `flannel.N`'s (and `flannel-v6.N`'s) egress: the host's own traffic.
    TcHostEncap,
}

/// A test run's outcome: the program's return code and the packet it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutput {
    /// TC_ACT_* for TC programs, XDP_* for XDP.
    pub action: u32,
    pub packet: Vec<u8>,
}

impl ProgramKind {
    pub const ALL: [ProgramKind; 4] = [
        ProgramKind::TcEncap,
        ProgramKind::XdpDecap,
        ProgramKind::TcDecap,
        ProgramKind::TcHostEncap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProgramKind::TcEncap => program_names::TC_ENCAP,
            ProgramKind::XdpDecap => program_names::XDP_DECAP,
            ProgramKind::TcDecap => program_names::TC_DECAP,
            ProgramKind::TcHostEncap => program_names::TC_HOST_ENCAP,
        }
    }

    pub(super) fn program_mut(self, ebpf: &mut Ebpf) -> Result<&mut Program, DatapathError> {
        ebpf.program_mut(self.name())
            .ok_or(DatapathError::MissingProgram {
                program: self.name(),
            })
    }

    fn program(self, ebpf: &Ebpf) -> Result<&Program, DatapathError> {
        ebpf.program(self.name())
            .ok_or(DatapathError::MissingProgram {
                program: self.name(),
            })
    }

    pub(super) fn load(self, ebpf: &mut Ebpf) -> Result<(), DatapathError> {
        let program = self.name();
        let load_err = |source| DatapathError::LoadProgram {
            program,
            source: Box::new(source),
        };
        // The verifier gives up with EAGAIN when a signal arrives while it works
        // (SIGCHLD from a command the agent ran, say); libbpf retries too.
        let mut attempts = 0;
        loop {
            let loaded = match self.program_mut(ebpf)? {
                Program::SchedClassifier(p) => p.load(),
                Program::Xdp(p) => p.load(),
                _ => return Err(DatapathError::MissingProgram { program }),
            };
            match loaded {
                Err(aya::programs::ProgramError::LoadError { io_error, .. })
                    if io_error.kind() == std::io::ErrorKind::WouldBlock && attempts < 5 =>
                {
                    attempts += 1;
                }
                other => return other.map_err(load_err),
            }
        }
    }
}

/// The `__sk_buff` fields BPF_PROG_TEST_RUN lets a TC test run set (the
/// kernel refuses the others, VLAN metadata included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkbContext {
    /// The skb's device and ingress device (FIB lookups and port checks use it);
    /// 0 leaves the kernel's default (loopback).
    pub ifindex: u32,
    /// Marks the packet GSO with segments of this many payload bytes.
    pub gso_size: u32,
    pub gso_segs: u32,
}

impl SkbContext {
    /// `struct __sk_buff` as bytes: ingress_ifindex at 36, ifindex at 40,
    /// gso_segs at 164, gso_size at 176; the kernel requires the rest to be zero.
    fn to_bytes(self) -> [u8; 192] {
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&self.ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        ctx[164..168].copy_from_slice(&self.gso_segs.to_ne_bytes());
        ctx[176..180].copy_from_slice(&self.gso_size.to_ne_bytes());
        ctx
    }
}

impl Datapath {
    /// Runs `kind` once on `packet` (a full Ethernet frame) and returns its
    /// action and the resulting bytes. `ifindex` sets the skb's device for TC
    /// programs (FIB lookups use it); 0 leaves the kernel's default (loopback).
    pub fn test_run(
        &self,
        kind: ProgramKind,
        packet: &[u8],
        ifindex: u32,
    ) -> Result<TestRunOutput, DatapathError> {
        self.test_run_skb(
            kind,
            packet,
            SkbContext {
                ifindex,
                ..Default::default()
            },
        )
    }

    /// Like [`Datapath::test_run`], with more of the skb set for TC programs.
    pub fn test_run_skb(
        &self,
        kind: ProgramKind,
        packet: &[u8],
        skb: SkbContext,
    ) -> Result<TestRunOutput, DatapathError> {
        self.test_run_timed(kind, packet, skb).map(|(out, _)| out)
    }

    /// Like [`Datapath::test_run_skb`], with the time the kernel measured
    /// around the program: its own cost for this packet, without the
    /// redirect. One run per call (a repeated run would feed the program its
    /// own output: an encapsulated frame is not encapsulated again).
    pub fn test_run_timed(
        &self,
        kind: ProgramKind,
        packet: &[u8],
        skb: SkbContext,
    ) -> Result<(TestRunOutput, std::time::Duration), DatapathError> {
        let program = kind.name();
        // Room for the 50 bytes encapsulation adds, and then some.
        let mut out = vec![0u8; packet.len() + 256];
        let ctx = skb.to_bytes();
        let mut opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let run_err = |source| DatapathError::TestRun {
            program,
            source: Box::new(source),
        };
        let result = match kind.program(&self.ebpf)? {
            Program::SchedClassifier(p) => {
                if skb != SkbContext::default() {
                    opts.ctx_in = Some(&ctx);
                }
                p.test_run(opts)
            }
            Program::Xdp(p) => p.test_run(opts),
            _ => return Err(DatapathError::MissingProgram { program }),
        }
        .map_err(run_err)?;
        out.truncate(result.data_size_out as usize);
        let output = TestRunOutput {
            action: result.return_value,
            packet: out,
        };
        Ok((output, result.duration))
    }
}
