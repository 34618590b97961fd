//! `outbox-sim`: runs seeds of the simulator.
//!
//! ```text
//! outbox-sim --seeds 200            # seeds 1..=200
//! outbox-sim --minutes 30           # as many seeds as fit
//! outbox-sim --seed 1234 --trace    # one seed, its whole trace
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
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
    /// Seeds run at once, each on a thread of its own (default: one per
    /// core). Each run is deterministic whatever runs beside it.
    #[arg(long)]
    jobs: Option<usize>,
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
    let mut longest_unled = (std::time::Duration::ZERO, 0u64);
    let mut failed = Vec::new();
    let jobs = cli
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let next = AtomicU64::new(cli.first);
    let stop = AtomicBool::new(false);
    let last = cli.first.saturating_add(count);
    let (sender, results) = mpsc::channel();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let sender = sender.clone();
            let (next, stop) = (&next, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= last || budget.is_some_and(|b| started.elapsed() >= b) {
                        break;
                    }
                    if sender.send(outbox_sim::run(seed)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);
        for outcome in results {
            run += 1;
            checks += outcome.checks;
            items += outcome.accepted_items;
            if outcome.longest_unled > longest_unled.0 {
                longest_unled = (outcome.longest_unled, outcome.seed);
            }
            for (kind, n) in &outcome.faults {
                *faults.entry(*kind).or_default() += n;
            }
            if !outcome.passed() {
                let seed = outcome.seed;
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
                if cli.stop_at_failure {
                    stop.store(true, Ordering::SeqCst);
                }
            }
            match budget {
                Some(_) => bar.set_position(started.elapsed().as_secs()),
                None => bar.inc(1),
            }
            bar.set_message(format!("{} failed", failed.len()));
        }
    });
    failed.sort_unstable();
    bar.finish_and_clear();
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!(
        "{run} seeds in {:.1} min ({:.0} seeds/min): {} passed, {} failed; {items} items accepted, {checks} checks",
        minutes,
        run as f64 / minutes.max(1e-9),
        run - failed.len() as u64,
        failed.len()
    );
    println!(
        "longest a stream went unled while a replica could lead it: {:.1} s (seed {}; bound {} s)",
        longest_unled.0.as_secs_f64(),
        longest_unled.1,
        outbox_sim::run::TAKEOVER_BOUND.as_secs()
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
