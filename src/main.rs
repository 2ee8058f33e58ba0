//! The `framegate` command: argument parsing and logging set-up around the library. The only
//! place `anyhow` appears.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use framegate::{Config, Gateway, ShutdownOutcome};

/// A policy-scripted WebSocket gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file.
    #[arg(long, short, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Also start the built-in sample upstreams: echo on 127.0.0.1:9001 and a broadcast chat on
    /// 127.0.0.1:9002 (what the repository's config.toml points at).
    #[arg(long)]
    with_samples: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and everything it refers to, then exit.
    Check,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FRAMEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Config errors already say file:line:column; print them as they are.
    let config = Config::load(&cli.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = Gateway::new(config).with_context(|| format!("in {}", cli.config.display()))?;
    if let Some(Command::Check) = cli.command {
        println!("{}: OK", cli.config.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        if cli.with_samples {
            start_samples().await?;
        }
        let running = gateway.start().await?;
        for addr in running.local_addrs() {
            tracing::info!(%addr, "listening");
        }
        match running
            .run_until_signal()
            .await
            .context("cannot install signal handlers")?
        {
            ShutdownOutcome::Drained => tracing::info!("all connections closed; bye"),
            ShutdownOutcome::GraceExpired => {
                tracing::warn!("shutdown grace expired with connections still open")
            }
        }
        Ok(())
    })
}

async fn start_samples() -> anyhow::Result<()> {
    let echo: SocketAddr = "127.0.0.1:9001".parse()?;
    let chat: SocketAddr = "127.0.0.1:9002".parse()?;
    framegate::samples::spawn_echo(echo)
        .await
        .with_context(|| format!("sample echo upstream on {echo}"))?;
    framegate::samples::spawn_chat(chat)
        .await
        .with_context(|| format!("sample chat upstream on {chat}"))?;
    tracing::info!(%echo, %chat, "sample upstreams started");
    Ok(())
}
