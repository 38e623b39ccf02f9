//! The programs' own log lines (aya-log): each drop with its reason and its
//! addresses, at debug level, emitted as `tracing` events under [`TARGET`].
//!
//! The log calls are compiled into the programs and switched by
//! `AYA_LOG_LEVEL`, a read-only global fixed when the object is loaded. Off,
//! the verifier sees a constant and prunes the log code as dead: a drop site
//! keeps at most the load of the constant and a jump. On, each drop reserves
//! a record in the object's ring buffer (`AYA_LOGS`), which a task reads
//! while the [`super::Datapath`] lives. Logging is on when the subscriber shows debug events of [`TARGET`]:
//! `--ebpf-log` adds that directive, `RUST_LOG=debug` (or `weft=debug`)
//! includes it.
//!
//! The ring buffer belongs to one loaded object. Every agent start (and every
//! repair) loads a new object whose programs replace the pinned ones in their
//! links, so an agent that adopted a predecessor's pins reads what its own
//! programs write from the moment its links are switched. Before that, and
//! during a layout migration until [`super::Datapath::finish_migration`], the
//! predecessor's programs forward and write into their own buffer, which
//! nothing reads: those lines are lost, never misattributed.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{unix::AsyncFd, Interest};

use crate::telemetry::PROGRAM_LOG_TARGET as TARGET;

/// `AYA_LOG_LEVEL` values: nothing, or debug and above.
static OFF: u8 = 0;
static DEBUG: u8 = aya_log::Level::Debug as u8;

#[derive(Debug, thiserror::Error)]
enum LogError {
    #[error("no async runtime to read them on")]
    NoRuntime,
    #[error("open the programs' log buffer: {0}")]
    Init(#[from] aya_log::Error),
    #[error("watch the programs' log buffer: {0}")]
    Poll(#[from] std::io::Error),
}

/// The `AYA_LOG_LEVEL` to load the programs with (see the module docs).
pub(super) fn program_level() -> &'static u8 {
    let wanted = tracing::enabled!(target: TARGET, tracing::Level::DEBUG);
    // Without a runtime nothing could read the records (a test loading the
    // object by itself): the programs would fill their buffer for nobody.
    if wanted && tokio::runtime::Handle::try_current().is_ok() {
        &DEBUG
    } else {
        &OFF
    }
}

/// Reads the programs' log records until dropped.
pub(super) struct Reader(tokio::task::JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts reading `ebpf`'s log records when it was loaded with `level` on.
/// A reader that cannot start costs the log lines, never the datapath.
pub(super) fn start(ebpf: &mut Ebpf, level: &u8) -> Option<Reader> {
    if *level == OFF {
        return None;
    }
    spawn(ebpf)
        .inspect_err(|e| {
            tracing::warn!(error = %e, "the eBPF programs' log lines cannot be read and are lost; forwarding is not affected")
        })
        .ok()
}

fn spawn(ebpf: &mut Ebpf) -> Result<Reader, LogError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| LogError::NoRuntime)?;
    // AsyncFd registers with the reactor of the runtime it is created in.
    let _entered = runtime.enter();
    let logger = EbpfLogger::init_with_logger(ebpf, Bridge)?;
    // SAFETY: the logger owns the ring buffer map's fd; it stays open, and
    // `as_raw_fd` returns it, for as long as the AsyncFd owns the logger.
    let mut ring = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    tracing::info!(
        target: TARGET,
        "the eBPF programs log each packet they drop (debug level)"
    );
    Ok(Reader(runtime.spawn(async move {
        loop {
            match ring.readable_mut().await {
                Ok(mut ready) => {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the eBPF programs' log lines stopped");
                    return;
                }
            }
        }
    })))
}

/// Turns aya-log's `log` records into `tracing` events under [`TARGET`],
/// so one filter (and one output format) covers them.
struct Bridge;

impl ::log::Log for Bridge {
    fn enabled(&self, _: &::log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &::log::Record<'_>) {
        // `event!` needs a constant level: one call site per level.
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(target: TARGET, $level, module = record.target(), "{}", record.args())
            };
        }
        match record.level() {
            ::log::Level::Error => emit!(tracing::Level::ERROR),
            ::log::Level::Warn => emit!(tracing::Level::WARN),
            ::log::Level::Info => emit!(tracing::Level::INFO),
            ::log::Level::Debug => emit!(tracing::Level::DEBUG),
            ::log::Level::Trace => emit!(tracing::Level::TRACE),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::util::SubscriberInitExt as _;

    /// The level the programs would be loaded with under `filter`.
    fn level_under(filter: &str, runtime: bool) -> u8 {
        let subscriber = crate::telemetry::subscriber(
            crate::telemetry::LogFormat::Text,
            crate::telemetry::parse_filter(filter).unwrap(),
            std::io::sink,
            false,
        );
        let _guard = subscriber.set_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _entered = runtime.then(|| rt.enter());
        *program_level()
    }

    #[test]
    fn programs_log_only_when_debug_is_shown_for_their_target() {
        assert_eq!(level_under("info", true), OFF);
        assert_eq!(level_under("info,weft::backend=debug", true), OFF);
        assert_eq!(level_under("warn,weft::ebpf=debug", true), DEBUG);
        assert_eq!(level_under("weft=debug", true), DEBUG);
        assert_eq!(level_under("debug", true), DEBUG);
    }

    #[test]
    fn without_a_runtime_the_programs_stay_silent() {
        assert_eq!(level_under("debug", false), OFF);
    }
}
