use std::process::ExitCode;

use outbox_service::{cli, shutdown, telemetry};
use tracing::error;
use writer::{Application, Config};

fn main() -> ExitCode {
    let config: Config = match cli::parse() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(problem) = config.validate() {
        return cli::config_error(problem);
    }
    // Before the runtime: the span exporter (when configured) blocks, and
    // flushes when `_tracing` is dropped after the runtime is gone.
    let _tracing = match telemetry::init_tracing(&config.log, "outbox-writer") {
        Ok(tracing) => tracing,
        Err(e) => return cli::config_error(e),
    };
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(serve(config)),
        Err(e) => {
            error!(message = "cannot start the async runtime", error = %e);
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            error!(message = "cannot start", error = format!("{e:#}"));
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(message = "writer listening", address = %app.local_addr());
    match app.run(shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(message = "server failed", error = %e);
            ExitCode::FAILURE
        }
    }
}
