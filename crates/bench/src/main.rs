//! `outbox-bench`: the numbers in docs/BENCHMARKS.md. Each subcommand starts
//! the release binaries it measures against a fresh database, measures the
//! raw ceiling in the same run, and prints a table. `scripts/bench.sh` starts
//! MongoDB (or its stand-in) and the Pub/Sub emulator and runs all three.

mod big_batch;
mod budget;
mod claim_check;
mod conflicts;
mod latency;
mod parse_bombs;
mod process;
mod relay_drain;
mod report;
mod results;
mod rtt;
mod stats;
mod streams;
mod writer;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writer items/s and latency per batch size and client count, beside
    /// the same documents inserted in a transaction straight through the driver.
    Writer(writer::WriterArgs),
    /// Relay drain rate for a backlog, beside raw pipelined publishing and
    /// raw bulk marking of the same items.
    Relay(relay_drain::RelayArgs),
    /// Writer commit to Pub/Sub acknowledgement of each batch's last item,
    /// at a steady rate.
    Latency(latency::LatencyArgs),
    /// Where the writer takes the sequence: conflicts per stored batch on
    /// the in-memory model of MongoDB's transactions (no services needed).
    Conflicts(conflicts::ConflictArgs),
    /// A batch at the writer's limits beside small batches, in three
    /// designs (one transaction; one whose deadline bounds waiting only;
    /// staged items and a short transaction), on the model and the writer.
    BigBatch(big_batch::BigBatchArgs),
    /// Claim-check: 1, 10 and 50 MiB items by reference (writer, relay,
    /// resolution; items/s, MB/s, peak memory).
    ClaimCheck(claim_check::ClaimCheckArgs),
    /// Drain rate against round-trip time to MongoDB and Pub/Sub (a
    /// delaying proxy), the writer's latency, the seed's algorithm beside ours.
    Rtt(rtt::RttArgs),
    /// MongoDB commands per 1,000 items drained and per stored batch.
    Budget(budget::BudgetArgs),
    /// Aggregate drain rate with the backlog spread over 1 to 8 streams
    /// and 1 to 3 relays; the writer on one stream or several.
    Streams(streams::StreamArgs),
    /// The writer's peak memory and CPU time under bodies built to make a
    /// parser work hard (CSV header, empty cells, small values, slow body).
    ParseBombs(parse_bombs::ParseBombArgs),
    /// The recorded results as docs/BENCHMARKS.md's tables and SVG charts.
    Report(report::ReportArgs),
}

/// Where the services and binaries are.
#[derive(Args, Clone, Debug)]
pub struct Env {
    #[arg(long, env = "MONGODB_URL")]
    pub mongodb_url: String,
    /// `standin` when MongoDB is the nx-27017 stand-in (no change streams).
    #[arg(long, env = "MONGODB_FLAVOR", default_value = "external")]
    pub mongodb_flavor: String,
    #[arg(long, env = "PUBSUB_EMULATOR_HOST", default_value = "127.0.0.1:8085")]
    pub pubsub_emulator_host: String,
    /// Directory of outbox-writer and outbox-relay.
    #[arg(long, env = "OUTBOX_BIN_DIR", default_value = "target/release")]
    pub bin_dir: PathBuf,
}

impl Env {
    pub fn change_stream(&self) -> bool {
        self.mongodb_flavor != "standin"
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Writer(args) => writer::run(args).await,
        Command::Relay(args) => relay_drain::run(args).await,
        Command::Latency(args) => latency::run(args).await,
        Command::Conflicts(args) => {
            // A runtime of its own per measurement, with the paused clock.
            tokio::task::spawn_blocking(move || conflicts::run(args)).await?;
            Ok(())
        }
        Command::BigBatch(args) => big_batch::run(args).await,
        Command::ClaimCheck(args) => claim_check::run(args).await,
        Command::Streams(args) => streams::run(args).await,
        Command::Rtt(args) => rtt::run(args).await,
        Command::Budget(args) => budget::run(args).await,
        Command::ParseBombs(args) => parse_bombs::run(args).await,
        Command::Report(args) => report::run(&args),
    }
}
