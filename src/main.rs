//! The `transfer-worker` binary: parse, set up logging, run, map the outcome
//! to an exit code. The command line is in [`cli`] (one file per command),
//! the tools (bench, lab, demo) in [`tools`]; the worker and the producer API
//! are the library's.

#![deny(dead_code)]

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

mod cli;
mod tools;

use cli::{Cli, LogFormat};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn")))
        .with_writer(std::io::stderr)
        // If stderr's reader goes away, log lines are dropped; the fallback
        // (an `eprintln!` of the write error) would panic the task that logged.
        .log_internal_errors(false);
    match cli.log_format {
        // One JSON object per line: timestamp, level, target, fields (the
        // message among them) and the span the line was logged in.
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).init(),
        // Colour only on a terminal: a log file gets no escape codes.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cli::run(cli));
    // Tasks still running (an abandoned SQS call, a blocked read) are not
    // waited for beyond this: the process is done.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => std::process::ExitCode::from(cli::ExitCode::Done as u8),
        Err(e) => {
            // Not eprintln!: it panics if stderr is closed.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            std::process::ExitCode::from(cli::exit_code(&e) as u8)
        }
    }
}
