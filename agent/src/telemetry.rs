//! Log output: `tracing` events to stderr, readable text by default or one JSON object per line.
//!
//! `RUST_LOG` filters (default `info`). Records emitted through the `log` crate, which is how aya
//! reports, are bridged into tracing, so they are filtered and formatted like everything else. The
//! eBPF programs' own log lines (their drops, with addresses) arrive as debug events under the target
//! [`PROGRAM_LOG_TARGET`] (see `datapath/log.rs`); the programs only write them when that target's
//! debug events are shown: `--ebpf-log` adds the directive, `RUST_LOG=debug` includes it.
//!
//! ```no_run
//! weft::telemetry::init(weft::telemetry::LogFormat::Text, false).expect("logging set up once");
//! tracing::info!(subnet = "10.1.54.0/24", vtep = "172.16.15.22", "peer added");
//! ```

use std::io::IsTerminal as _;
use std::str::FromStr;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

/// Filter used when `RUST_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "info";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("RUST_LOG={value:?} is not a valid filter: {source}; use e.g. RUST_LOG=info or RUST_LOG=weft=debug,aya=warn")]
    Filter {
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("unknown log format {value:?}; use \"text\" or \"json\"")]
    Format { value: String },
    #[error("install the log subscriber: {source}; logging was already set up in this process")]
    Install {
        #[source]
        source: tracing_subscriber::util::TryInitError,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable single lines; colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(TelemetryError::Format {
                value: s.to_owned(),
            }),
        }
    }
}

/// The filter from `RUST_LOG`, or [`DEFAULT_FILTER`].
pub fn env_filter() -> Result<EnvFilter, TelemetryError> {
    let value = std::env::var("RUST_LOG").unwrap_or_default();
    parse_filter(if value.trim().is_empty() {
        DEFAULT_FILTER
    } else {
        &value
    })
}

pub fn parse_filter(value: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder()
        .parse(value)
        .map_err(|source| TelemetryError::Filter {
            value: value.to_owned(),
            source,
        })
}

/// The `tracing` target of the eBPF programs' own log lines (`datapath/log.rs`).
pub const PROGRAM_LOG_TARGET: &str = "weft::ebpf";

/// `filter` with the eBPF programs' log lines shown (`--ebpf-log`), whatever else it hides.
pub fn with_program_logs(filter: EnvFilter) -> EnvFilter {
    filter.add_directive(
        format!("{PROGRAM_LOG_TARGET}=debug")
            .parse()
            .expect("a target=level directive parses"),
    )
}

/// Install the global subscriber writing to stderr, and the `log` bridge; `program_logs` shows the
/// eBPF programs' log lines ([`with_program_logs`]). Call once, early in main.
pub fn init(format: LogFormat, program_logs: bool) -> Result<(), TelemetryError> {
    let ansi = std::io::stderr().is_terminal();
    let mut filter = env_filter()?;
    if program_logs {
        filter = with_program_logs(filter);
    }
    subscriber(format, filter, std::io::stderr, ansi)
        .try_init()
        .map_err(|source| TelemetryError::Install { source })
}

/// The subscriber [`init`] installs, writing to `writer`; exposed so tests can capture output.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        // Flattened so fields sit next to "message" at the top level, which is what log shippers index.
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn capture(format: LogFormat, filter: &str, f: impl FnOnce()) -> String {
        capture_with(format, parse_filter(filter).unwrap(), f)
    }

    fn capture_with(format: LogFormat, filter: EnvFilter, f: impl FnOnce()) -> String {
        let out = Capture::default();
        let sub = subscriber(format, filter, out.clone(), false);
        // set_default also installs the process-wide `log` -> tracing bridge (idempotent).
        let _guard = tracing_subscriber::util::SubscriberInitExt::set_default(sub);
        f();
        out.text()
    }

    #[test]
    fn json_lines_carry_fields() {
        let text = capture(LogFormat::Json, "info", || {
            tracing::info!(subnet = "10.1.54.0/24", vtep = "172.16.15.22", "peer added");
        });
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "peer added");
        assert_eq!(line["subnet"], "10.1.54.0/24");
        assert_eq!(line["level"], "INFO");
    }

    #[test]
    fn text_is_readable_and_filtered() {
        let text = capture(LogFormat::Text, "info", || {
            tracing::info!(subnet = "10.1.54.0/24", "peer removed");
            tracing::debug!("hidden");
        });
        assert!(text.contains(" INFO "), "{text}");
        assert!(
            text.contains("peer removed subnet=\"10.1.54.0/24\""),
            "{text}"
        );
        assert!(!text.contains("hidden"), "{text}");
    }

    #[test]
    fn log_crate_records_are_bridged() {
        let text = capture(LogFormat::Text, "info,aya=warn", || {
            log::warn!(target: "aya::programs", "program detached");
            log::info!(target: "aya::maps", "filtered out");
        });
        assert!(text.contains("program detached"), "{text}");
        assert!(!text.contains("filtered out"), "{text}");
    }

    #[test]
    fn ebpf_log_shows_the_programs_lines_and_nothing_else() {
        // The flag wins over a RUST_LOG that names the target.
        let filter = with_program_logs(parse_filter("warn,weft::ebpf=off").unwrap());
        let text = capture_with(LogFormat::Text, filter, || {
            tracing::debug!(target: PROGRAM_LOG_TARGET, "decap drop: VXLAN from 10.9.9.9");
            tracing::debug!(target: "weft::backend", "hidden");
            tracing::info!("hidden too");
        });
        assert!(text.contains("decap drop: VXLAN from 10.9.9.9"), "{text}");
        assert!(!text.contains("hidden"), "{text}");
    }

    #[test]
    fn bad_inputs_name_the_fix() {
        let e = parse_filter("weft=loud").unwrap_err().to_string();
        assert!(e.contains("RUST_LOG=\"weft=loud\""), "{e}");
        assert!("yaml".parse::<LogFormat>().is_err());
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
    }
}
