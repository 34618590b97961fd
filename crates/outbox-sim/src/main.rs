//! `outbox-sim`: runs seeds of the simulator.
//!
//! ```text
//! outbox-sim --seeds 200            # seeds 1..=200
//! outbox-sim --minutes 30           # as many seeds as fit
//! outbox-sim --seed 1234 --trace    # one seed, its whole trace
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(about = "Runs batch-outbox's deterministic simulator over seeds")]
struct Cli {
    /// How many seeds to run, from --first.
    #[arg(long, conflicts_with_all = ["minutes", "seed"])]
    seeds: Option<u64>,
    /// Run seeds for this many minutes.
    #[arg(long, conflicts_with = "seed")]
    minutes: Option<f64>,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// One seed only.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the seed's whole trace (with --seed), or every failing seed's.
    #[arg(long)]
    trace: bool,
    /// Stop at the first failing seed.
    #[arg(long)]
    stop_at_failure: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(seed) = cli.seed {
        let outcome = outbox_sim::run(seed);
        if cli.trace || !outcome.passed() {
            for line in outcome.trace.lines() {
                println!("{line}");
            }
        }
        println!(
            "seed {seed}: {} ({} items, {} checks, {} s of virtual time, trace {})",
            if outcome.passed() { "passed" } else { "FAILED" },
            outcome.accepted_items,
            outcome.checks,
            outcome.virtual_seconds,
            &outcome.trace.digest()[..16]
        );
        return if outcome.passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let started = Instant::now();
    let budget = cli.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let count = cli
        .seeds
        .unwrap_or(if budget.is_some() { u64::MAX } else { 100 });
    let bar = match budget {
        Some(budget) => ProgressBar::new(budget.as_secs()).with_style(
            ProgressStyle::with_template("{bar:40} {elapsed}/{len}s {msg}").expect("a template"),
        ),
        None => ProgressBar::new(count).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} seeds, {elapsed} {msg}")
                .expect("a template"),
        ),
    };
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut run, mut checks, mut items) = (0u64, 0usize, 0usize);
    let mut failed = Vec::new();
    for seed in cli.first.. {
        if run >= count || budget.is_some_and(|b| started.elapsed() >= b) {
            break;
        }
        let outcome = outbox_sim::run(seed);
        run += 1;
        checks += outcome.checks;
        items += outcome.accepted_items;
        for (kind, n) in &outcome.faults {
            *faults.entry(kind).or_default() += n;
        }
        if !outcome.passed() {
            bar.suspend(|| {
                println!("seed {seed} FAILED: {}", outcome.violations.join("; "));
                if cli.trace {
                    for line in outcome.trace.lines() {
                        println!("  {line}");
                    }
                }
                println!("  replay it: scripts/sim.sh --seed {seed} --trace");
            });
            failed.push(seed);
        }
        match budget {
            Some(_) => bar.set_position(started.elapsed().as_secs()),
            None => bar.inc(1),
        }
        bar.set_message(format!("{} failed", failed.len()));
        if !failed.is_empty() && cli.stop_at_failure {
            break;
        }
    }
    bar.finish_and_clear();
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!(
        "{run} seeds in {:.1} min ({:.0} seeds/min): {} passed, {} failed; {items} items accepted, {checks} checks",
        minutes,
        run as f64 / minutes.max(1e-9),
        run - failed.len() as u64,
        failed.len()
    );
    println!("faults injected:");
    for (kind, n) in &faults {
        println!("  {kind:<22} {n}");
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed seeds: {failed:?}");
        ExitCode::FAILURE
    }
}
