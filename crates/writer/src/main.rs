use std::process::ExitCode;

use outbox_service::{cli, shutdown, telemetry};
use tracing::error;
use writer::{Application, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config = match cli::parse() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(problem) = config.validate() {
        return cli::config_error(problem);
    }
    if let Err(e) = telemetry::init_tracing(&config.log) {
        return cli::config_error(e);
    }
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
