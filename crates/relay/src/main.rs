use std::process::ExitCode;

use outbox_service::{cli, shutdown, telemetry};
use relay::{Application, Cli, Command, Config};
use tracing::error;

fn main() -> ExitCode {
    let cli: Cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let config = cli.config;
    let log = match &cli.command {
        Some(Command::Tail(args)) => &args.log,
        Some(Command::ShardPlan(args)) => &args.log,
        None => {
            if let Err(problem) = config.validate() {
                return cli::config_error(problem);
            }
            &config.log
        }
    };
    // Before the runtime: the span exporter (when configured) blocks, and
    // flushes when `_tracing` is dropped after the runtime is gone.
    let _tracing = match telemetry::init_tracing(log, "outbox-relay") {
        Ok(tracing) => tracing,
        Err(e) => return cli::config_error(e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(message = "cannot start the async runtime", error = %e);
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Tail(args)) => runtime.block_on(relay::tail::run(&args.source)),
        Some(Command::ShardPlan(args)) => runtime.block_on(shard_plan(&args)),
        None => runtime.block_on(serve(config)),
    }
}

/// `outbox-relay shard-plan`: the sharding plan for the stored streams.
async fn shard_plan(args: &relay::config::ShardPlanArgs) -> ExitCode {
    match relay::sharding::run(args).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outbox-relay shard-plan: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let bound = config.shutdown_bound();
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            error!(message = "cannot start", error = format!("{e:#}"));
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(message = "relay admin listening", address = %app.admin_addr());
    // After SIGTERM the relay exits within `bound` whatever MongoDB or
    // Pub/Sub do: a store command that hangs cannot keep it alive (its
    // leases then expire, and the successor kills its orphan).
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown::signal().await;
        let _ = stopping.send(());
    };
    let overdue = async move {
        if stopped.await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(bound).await;
    };
    tokio::select! {
        result = app.run(signal) => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(message = "relay failed", error = %e);
                ExitCode::FAILURE
            }
        },
        () = overdue => {
            error!(
                message = "not stopped within the shutdown bound; exiting anyway (the leases expire)",
                bound_seconds = bound.as_secs()
            );
            // Now: dropping the runtime would wait for blocking work
            // (a DNS lookup) without a bound.
            std::process::exit(1)
        }
    }
}
