//! Flags, environment variables and help.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use relay::config::TailSource;

const EXAMPLES: &str = "\
Examples:
  outboxctl submit orders.json                 store one batch, print its id and sequence
  outboxctl submit --wait day-*.ndjson         one batch a file, then follow each to the end
  outboxctl watch 4f1c2a9e0b7d3c58             live progress until the batch is committed
  outboxctl status                             the relay cluster at a glance (--json for scripts)
  outboxctl pending --limit 20                 the batches not yet committed
  outboxctl items 4f1c2a9e0b7d3c58 --limit 50  a batch's items with their Pub/Sub ids
  outboxctl retry 4f1c2a9e0b7d3c58             drain a failed batch again
  outboxctl pause / outboxctl resume           stop and restart draining the stream
  outboxctl --stream orders submit day.ndjson  a batch into the stream `orders`
  outboxctl stream list                        every stream: topic, leader, state, backlog
  outboxctl stream create orders --topic orders --ordering-key field:/customer/id
  outboxctl stream apply -f streams.yaml       make the declared streams true (GitOps)
  outboxctl tail --count 10                    what a subscription receives
  outboxctl completions bash > ~/.local/share/bash-completion/completions/outboxctl

Exit codes:
  0  done
  1  refused by the server (the problem's code is printed), or the batch failed
  2  wrong usage, or a file that cannot be read
  3  the server cannot be reached or is unavailable (nothing was changed by this call,
     or, for submit, retrying the same command is safe)";

/// Submit batches to batch-outbox and steer its relay.
#[derive(Parser, Debug)]
#[command(name = "outboxctl", version, about, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    /// Print JSON instead of tables and progress bars.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The writer's base URL.
    #[arg(
        long,
        env = "OUTBOX_WRITER_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub writer_url: String,
    /// A relay's admin base URL.
    #[arg(
        long,
        env = "OUTBOX_ADMIN_URL",
        default_value = "http://127.0.0.1:9090",
        global = true
    )]
    pub admin_url: String,
    /// The writer's API key, when it requires one (WRITER_API_KEYS).
    #[arg(long, env = "OUTBOX_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// The relays' admin token (every admin command needs it when they have one).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,
    /// Seconds one HTTP request may take.
    #[arg(long, default_value = "60", value_parser = seconds, global = true)]
    pub timeout: Duration,
    /// The stream to work with.
    #[arg(long, env = "OUTBOX_STREAM", default_value = "default", global = true)]
    pub stream: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Send each file as one batch (JSON array, NDJSON or CSV); on a terminal, files of
    /// 1 MiB and more show an upload bar.
    Submit(SubmitArgs),
    /// Follow a batch until it is committed, with a progress bar.
    Watch(WatchArgs),
    /// The stream (leader, epoch, paused or halted, current batch, backlog, last error)
    /// and the cluster: which replica leads which stream.
    Status,
    /// Batches not yet committed, in sequence order.
    Pending(PageArgs),
    /// One batch: status and item counts.
    Batch { batch_id: String },
    /// A batch's items, in order, with their status and Pub/Sub message id.
    Items {
        batch_id: String,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Put a failed batch back to draining from its first unsent item.
    Retry { batch_id: String },
    /// Pause draining the stream (every replica) within about a second.
    Pause,
    /// Resume draining the stream.
    Resume,
    /// Define and list streams.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Publish a range of committed batches again, in order, and follow
    /// replay jobs (`--stream` names the stream).
    #[command(subcommand)]
    Replay(ReplayCommand),
    /// Print what a Pub/Sub subscription receives, one JSON line a message.
    Tail(TailSource),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Every stream with its topic, leader, state and backlog.
    List,
    /// One stream's definition and live state.
    Show { name: String },
    /// Define a new stream (refused when it exists: use update).
    Create {
        name: String,
        #[command(flatten)]
        definition: DefinitionArgs,
    },
    /// Change a stream's definition: what is given replaces what is stored.
    Update {
        name: String,
        #[command(flatten)]
        definition: DefinitionArgs,
    },
    /// Make the streams a file declares true: create the missing ones,
    /// update the changed ones (JSON or YAML: a list of streams, or
    /// `{streams: [...]}`, each `{name, topic, ordering_key, ...}`).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReplayCommand {
    /// Start a replay of batches FROM..=TO (their batch_sequence).
    Start(ReplayStartArgs),
    /// The stream's replay jobs, newest first.
    List,
    /// One job's state and progress.
    Show { replay_id: String },
    /// Follow a job with a progress bar until it is done.
    Watch { replay_id: String },
    /// Pause a running job (within about a second).
    Pause { replay_id: String },
    /// Run a paused or failed job again from where it stopped.
    Resume { replay_id: String },
    /// Stop a job for good.
    Cancel { replay_id: String },
}

#[derive(Args, Debug)]
pub struct ReplayStartArgs {
    /// The first batch sequence of the range.
    #[arg(long)]
    pub from: u64,
    /// The last batch sequence of the range (committed).
    #[arg(long)]
    pub to: u64,
    /// Where the copies go (default: the stream's topic).
    #[arg(long)]
    pub topic: Option<String>,
    /// The copies' ordering-key mode (default: the stream's).
    #[arg(long)]
    pub ordering_key: Option<String>,
    /// Items per second at most (default: no limit).
    #[arg(long)]
    pub max_items_per_second: Option<u32>,
    /// Follow the job with a progress bar until it is done.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Args, Debug, Default)]
pub struct DefinitionArgs {
    /// The Pub/Sub topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// global, batch, none or field:<json-pointer>.
    #[arg(long)]
    pub ordering_key: Option<String>,
    /// With field:, the key of items without the field.
    #[arg(long)]
    pub ordering_key_default: Option<String>,
    /// halt or dead-letter.
    #[arg(long)]
    pub on_poison: Option<String>,
    /// A file holding the JSON Schema every item must satisfy.
    #[arg(long)]
    pub schema: Option<PathBuf>,
    /// Drop the stream's schema.
    #[arg(long, conflicts_with = "schema")]
    pub no_schema: bool,
    /// An API key name allowed to write the stream (repeat for more).
    #[arg(long = "writer")]
    pub writers: Vec<String>,
    /// Let any writer in.
    #[arg(long, conflicts_with = "writers")]
    pub any_writer: bool,
    /// A claim-check store for the stream's large items: `gs://bucket/prefix`,
    /// `file:///path` or `memory://`.
    #[arg(long)]
    pub claim_check_url: Option<String>,
    /// With a claim-check store: payloads above this many bytes go there
    /// (default: only those too large for a Pub/Sub message).
    #[arg(long, requires = "claim_check_url")]
    pub claim_check_above_bytes: Option<u64>,
    /// Drop the stream's claim-check store (the writers' CLAIM_CHECK_URL
    /// applies, if set).
    #[arg(long, conflicts_with = "claim_check_url")]
    pub no_claim_check: bool,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Files to send, one batch each; `-` reads standard input.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The body format; by default from the extension (.json, .ndjson,
    /// .jsonl, .csv), else from the first character.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// The Idempotency-Key (one file only). By default derived from the
    /// file's content, so that running the command again stores nothing twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Then follow each batch until it is committed (as `watch` does).
    #[arg(long)]
    pub wait: bool,
    /// How often an unavailable writer is retried before giving up.
    #[arg(long, default_value = "3")]
    pub retries: u32,
    /// Stop at the first file that cannot be read or is refused (by
    /// default the others are still sent, and a summary says which were not).
    #[arg(long)]
    pub fail_fast: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Json,
    Ndjson,
    Csv,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    pub batch_id: String,
    /// Give up (exit 3) after this many seconds; by default wait for ever.
    #[arg(long, value_parser = seconds)]
    pub max_wait: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct PageArgs {
    /// Rows to read (1 to 1000).
    #[arg(long, default_value = "100", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Where to go on: the `next` value printed under the previous page.
    #[arg(long)]
    pub cursor: Option<String>,
}

fn seconds(raw: &str) -> Result<Duration, String> {
    raw.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{raw:?} is not a positive number of seconds"))
}
