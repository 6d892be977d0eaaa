//! `colony`: the agent and the command line client. See `colony --help`.

mod cli;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let agent = matches!(cli.command, Command::Agent(_));
    init_logging(if agent { "info" } else { "warn" });
    let result = match cli.command {
        Command::Agent(args) => run_agent(args),
        Command::Keygen(args) => cli::keygen(&args),
        Command::Job(args) => cli::run_job_command(args),
        Command::Node(args) => cli::run_node_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if error.downcast_ref::<cli::Unsuccessful>().is_none() {
                eprintln!("error: {error:#}");
            }
            ExitCode::from(cli::exit_code_of(&error))
        }
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the default level.
fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

fn run_agent(args: cli::AgentArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("colony")
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(cli::run_agent(args))
}
