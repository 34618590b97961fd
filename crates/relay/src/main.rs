use std::process::ExitCode;

use outbox_service::{cli, shutdown, telemetry};
use relay::{Application, Cli, Command};
use tracing::error;

mod tail;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(Command::Tail(args)) = cli.command {
        return tail::run(args).await;
    }
    let config = cli.config;
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
    tracing::info!(message = "relay admin listening", address = %app.admin_addr());
    match app.run(shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(message = "relay failed", error = %e);
            ExitCode::FAILURE
        }
    }
}
