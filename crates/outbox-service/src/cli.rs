//! Command-line options shared by both binaries.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use outbox_mongo::MongoConfig;

/// Exit status for bad configuration (BSD `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// Where MongoDB is and which collections to use.
#[derive(Args, Clone, Debug)]
pub struct MongoArgs {
    /// MongoDB connection string; the server must be a replica set (or mongos).
    #[arg(
        long,
        env = "MONGODB_URL",
        hide_env_values = true,
        default_value = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
    )]
    pub mongodb_url: String,
    /// Database name.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "batch_processing")]
    pub mongodb_database: String,
    /// Collection of batch documents.
    #[arg(long, env = "MONGODB_BATCH_COLLECTION", default_value = "batches")]
    pub batch_collection: String,
    /// Collection of item documents.
    #[arg(long, env = "MONGODB_ITEMS_COLLECTION", default_value = "batch_items")]
    pub items_collection: String,
    /// Collection holding the batch sequence counter.
    #[arg(
        long,
        env = "MONGODB_COUNTERS_COLLECTION",
        default_value = "outbox_counters"
    )]
    pub counters_collection: String,
    /// Collection of idempotency keys (expired by a TTL index).
    #[arg(
        long,
        env = "MONGODB_IDEMPOTENCY_COLLECTION",
        default_value = "idempotency_keys"
    )]
    pub idempotency_collection: String,
    /// How long to wait for a usable MongoDB server before answering 503, in milliseconds.
    #[arg(long, env = "MONGODB_SERVER_SELECTION_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub server_selection_timeout_ms: u64,
    /// Ingest transactions this process runs at once per stream; more queue in memory.
    /// A stream's transactions all write its sequence counter, so MongoDB serializes
    /// them anyway.
    #[arg(long, env = "MONGODB_TRANSACTION_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub transaction_concurrency: u16,
    /// Ingest transactions this process runs at once over every stream. Keep it below
    /// the connection pool size (maxPoolSize in MONGODB_URL; the writer and relay default to 100): a transaction
    /// takes a connection for each of its statements.
    #[arg(long, env = "MONGODB_MAX_TRANSACTIONS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_transactions: u16,
}

impl MongoArgs {
    /// The adapter's configuration, after checking the URL's scheme.
    ///
    /// # Errors
    /// When the URL is not a `mongodb://` or `mongodb+srv://` URL.
    pub fn to_config(&self, app_name: &str) -> Result<MongoConfig, String> {
        if !(self.mongodb_url.starts_with("mongodb://")
            || self.mongodb_url.starts_with("mongodb+srv://"))
        {
            // Not echoed: a connection string may carry a password.
            return Err("MONGODB_URL must start with mongodb:// or mongodb+srv://".to_owned());
        }
        let mut config = MongoConfig::new(&self.mongodb_url, &self.mongodb_database);
        config.batches_collection.clone_from(&self.batch_collection);
        config.items_collection.clone_from(&self.items_collection);
        config
            .counters_collection
            .clone_from(&self.counters_collection);
        config
            .idempotency_collection
            .clone_from(&self.idempotency_collection);
        config.server_selection_timeout = Duration::from_millis(self.server_selection_timeout_ms);
        config.transaction_concurrency = usize::from(self.transaction_concurrency);
        config.max_transactions = usize::from(self.max_transactions);
        config.app_name = app_name.to_owned();
        Ok(config)
    }
}

/// Log output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Logging options.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Parses the command line. `--help` and `--version` print and exit 0; any
/// other problem prints one line and exits [`EXIT_CONFIG`].
///
/// # Errors
/// The exit code to leave with when the program should stop here.
pub fn parse<T: Parser>() -> Result<T, ExitCode> {
    match T::try_parse() {
        Ok(config) => Ok(config),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let rendered = e.to_string();
            let line = rendered.lines().next().unwrap_or("invalid configuration");
            eprintln!("{line}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// Prints a configuration problem found after parsing and returns exit 64.
pub fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_CONFIG)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::MongoArgs;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        mongo: MongoArgs,
    }

    /// A connection string may carry a password: a bad one is not echoed,
    /// and `--help` never shows the environment's value.
    #[test]
    fn the_connection_string_is_never_shown() {
        let secret = "postgres://admin:hunter2@db.example/x";
        let probe = Probe::try_parse_from(["probe", "--mongodb-url", secret]).unwrap();
        let error = probe.mongo.to_config("probe").unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
        let help = Probe::command().render_long_help().to_string();
        assert!(help.contains("MONGODB_URL"), "{help}");
        let arg = Probe::command()
            .get_arguments()
            .find(|a| a.get_id() == "mongodb_url")
            .map(clap::Arg::is_hide_env_values_set);
        assert_eq!(arg, Some(true));
    }
}
