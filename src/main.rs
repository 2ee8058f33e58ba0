//! The `framegate` command: argument parsing, logging and signal set-up around the library.
//! The only place `anyhow` appears.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use framegate::policy::Direction;
use framegate::{policy_test, Config, Gateway, ShutdownOutcome};

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
    #[arg(long, global = true)]
    with_samples: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration, compile every policy script, then exit.
    Check,
    /// Run a frame policy on one message (or a spec file of cases) without a gateway.
    PolicyTest(PolicyTestArgs),
}

#[derive(Debug, clap::Args)]
struct PolicyTestArgs {
    /// The Lua script (an on_client_frame / on_server_frame policy); optional with --schema.
    #[arg(required_unless_present_any = ["spec", "schema"])]
    script: Option<PathBuf>,
    /// The message body.
    #[arg(long, short, default_value = "")]
    message: String,
    /// Send the message as binary instead of text.
    #[arg(long)]
    binary: bool,
    /// Which way the message travels: client (on_client_frame) or server (on_server_frame).
    #[arg(long, value_enum, default_value_t = Way::Client)]
    direction: Way,
    /// The upgrade context as JSON, e.g. '{"user":"ann"}'.
    #[arg(long)]
    ctx: Option<String>,
    /// The route's MIME type hint.
    #[arg(long, default_value = "application/json")]
    mime: String,
    /// A TOML spec file of cases with expected decisions (see docs/policies.md).
    #[arg(long, conflicts_with_all = ["script", "schema"])]
    spec: Option<PathBuf>,
    /// A JSON Schema to validate the message against before the policy runs, as a route's
    /// [route.validate] does.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// What a message the schema refuses gets: close (1007), drop, or reply.
    #[arg(long, value_enum, default_value_t = Invalid::Close, requires = "schema")]
    on_invalid: Invalid,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Invalid {
    Close,
    Drop,
    Reply,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Way {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("FRAMEGATE_LOG") {
        Ok(spec) => tracing_subscriber::EnvFilter::try_new(&spec)
            .with_context(|| format!("invalid FRAMEGATE_LOG {spec:?}"))?,
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(Command::PolicyTest(args)) = &cli.command {
        return policy_test(args);
    }
    // Config errors already say file:line:column; print them as they are.
    let config = Config::load(&cli.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = Gateway::new(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(Command::Check) = cli.command {
        emit(&format!("{}: OK\n", cli.config.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Handlers first, so that a signal never finds the gateway unprepared.
        let mut signals = Signals::install().context("cannot install signal handlers")?;
        if cli.with_samples {
            start_samples().await?;
        }
        let running = gateway.start().await?;
        let tls = running.tls_addrs();
        for addr in running.local_addrs() {
            if tls.contains(&addr) {
                tracing::info!(%addr, "listening (TLS)");
            } else {
                tracing::info!(%addr, "listening");
            }
        }
        // Runs until SIGINT or SIGTERM; each SIGHUP reloads on the way (a failed reload is
        // logged by the gateway and changes nothing).
        while let Signal::Hup = signals.next().await {
            tracing::info!("SIGHUP received: reloading the configuration");
            let _ = running.reload().await;
        }
        let shutdown = running.shutdown();
        tokio::pin!(shutdown);
        tokio::select! {
            outcome = &mut shutdown => match outcome {
                ShutdownOutcome::Drained => tracing::info!("all connections closed; bye"),
                ShutdownOutcome::GraceExpired => tracing::warn!("shutdown grace expired with connections still open"),
            },
            _ = signals.stop_signal() => {
                tracing::warn!("second signal: exiting now");
                // At once: nothing may wait on a worker, not even the runtime's teardown.
                std::process::exit(1);
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGINT and SIGTERM stop the gateway; SIGHUP reloads its configuration (and never ends the
/// process, its default action).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Waits for the next signal.
    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Hup,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }

    /// Waits for SIGINT or SIGTERM; a SIGHUP now (during shutdown) is ignored.
    async fn stop_signal(&mut self) {
        while let Signal::Hup = self.next().await {
            tracing::info!("SIGHUP received during shutdown: ignored");
        }
    }
}

/// What a signal asks for.
enum Signal {
    Stop,
    Hup,
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

fn policy_test(args: &PolicyTestArgs) -> anyhow::Result<ExitCode> {
    if let Some(spec) = &args.spec {
        let report = policy_test::run_spec(spec).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut text = String::new();
        for line in &report.lines {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&format!(
            "{} passed, {} failed\n",
            report.passed, report.failed
        ));
        emit(&text)?;
        return Ok(if report.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let schema = args.schema.as_ref().map(|path| policy_test::SchemaTest {
        path: path.clone(),
        on_invalid: match args.on_invalid {
            Invalid::Close => framegate::config::OnInvalid::Close,
            Invalid::Drop => framegate::config::OnInvalid::Drop,
            Invalid::Reply => framegate::config::OnInvalid::Reply,
        },
    });
    let case = policy_test::Case {
        message: args.message.clone(),
        binary: args.binary,
        direction: match args.direction {
            Way::Client => Direction::ClientToUpstream,
            Way::Server => Direction::UpstreamToClient,
        },
        ctx: args.ctx.clone(),
    };
    let decision = policy_test::run(args.script.as_deref(), &args.mime, &case, schema.as_ref())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    emit(&decision.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// Writes a command's output to stdout. A reader that has gone (`| head -1`) is not an error:
/// what it did not want is dropped, as other command-line tools do (`print!` would panic).
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}
