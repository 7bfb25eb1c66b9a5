//! One voice for what `far` tells its user on stderr: its own lines and the log events of the
//! components it embeds (far-host, the status channel) both read `far: ...`, with no time
//! stamps, module paths or colour codes. `FAR_LOG` picks which events show (default: warnings).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// A line of `far`'s own.
pub fn say(message: impl fmt::Display) {
    eprintln!("far: {message}");
}

/// Sends log events at `default` and above (or as `FAR_LOG` says) to stderr in `far`'s voice.
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAR_LOG")
                .unwrap_or_else(|_| default.into()),
        )
        .with_ansi(false)
        .event_format(Voice)
        .with_writer(std::io::stderr)
        .init();
}

struct Voice;

impl<S, N> FormatEvent<S, N> for Voice
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            _ => "",
        };
        write!(writer, "far: {level}")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
