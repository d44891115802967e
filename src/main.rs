//! The `transfer-worker` binary: parse, set up logging, run, map the outcome
//! to an exit code. The command line is in [`cli`] (one file per command),
//! the tools (bench, lab, demo) in [`tools`]; the worker and the producer API
//! are the library's.

#![deny(dead_code)]

use std::io::Write;
use std::time::Duration;

use clap::Parser;

mod cli;
mod exit;
mod tools;

use cli::Cli;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let telemetry = cli::telemetry::init(cli.log_format);
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
    // Spans still queued for the collector: a bounded wait, never a hang.
    telemetry.flush(Duration::from_secs(3));
    match result {
        Ok(()) => std::process::ExitCode::from(exit::ExitCode::Done as u8),
        Err(e) => {
            // Not eprintln!: it panics if stderr is closed.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            std::process::ExitCode::from(exit::exit_code(&e) as u8)
        }
    }
}
