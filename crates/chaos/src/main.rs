use std::process::ExitCode;

use clap::Parser;

/// Runs chaos scenarios against the real binaries and prints what was
/// injected, what was lost (must be 0) and how long recovery took.
#[derive(Parser)]
#[command(name = "outbox-chaos", version)]
struct Cli {
    /// short: seconds each (what scripts/test.sh runs); full: the figures
    /// of docs/RELIABILITY.md.
    #[arg(long, value_enum, default_value = "full")]
    length: chaos::Length,
    /// Scenarios to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(chaos::SCENARIOS))]
    scenarios: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let names: Vec<String> = if cli.scenarios.is_empty() {
        chaos::SCENARIOS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        cli.scenarios
    };
    let mut reports = Vec::new();
    let mut failed = false;
    // SIGTERM or Ctrl-C drops the scenario in progress, whose processes
    // (stand-in, emulator, writers, relays) are killed with it.
    let stop = outbox_service::shutdown::signal();
    tokio::pin!(stop);
    for name in names {
        eprintln!("running {name} ({:?})", cli.length);
        let result = tokio::select! {
            result = chaos::run(&name, cli.length) => result,
            () = &mut stop => {
                eprintln!("{name} stopped by a signal");
                return ExitCode::from(130);
            }
        };
        match result {
            Ok(Some(report)) => {
                failed |= !report.invariants.held();
                reports.push(report);
            }
            Ok(None) => {}
            Err(error) => {
                eprintln!("{name} failed: {error:#}");
                failed = true;
            }
        }
    }
    print!("{}", chaos::table(&reports));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
