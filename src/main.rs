//! The `spike` executable: logging, argument parsing, dispatch, and turning errors into a
//! one-line message and an exit status (0 success, 1 runtime error, 2 usage or configuration).

use std::process::ExitCode;

use clap::Parser;
use spike::entry::cli::{BackupCommand, Cli, Command, MigrateCommand, PkiCommand};
use spike::platform::CommandError;
use spike::platform::env::ProcessEnv;
use tracing_subscriber::filter::Targets;

/// The static (musl) release build allocates with mimalloc: see Cargo.toml.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `SPIKE_SYSTEM_LOG_LEVEL`: a level (`info`), or per-target levels such as
/// `spike=debug,hyper=warn`; unset or empty means `default`. Checked here because tracing's own
/// parser takes any unknown word for a target name and would silently turn logging — the audit
/// lines included — off.
fn log_filter(text: Option<&str>, default: &str) -> Result<Targets, String> {
    const VAR: &str = "SPIKE_SYSTEM_LOG_LEVEL";
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let text = text
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or(default)
        .to_ascii_lowercase();
    for item in text.split(',') {
        let (target, level) = match item.split_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, item.trim()),
        };
        let target_ok = target.is_none_or(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
        });
        if !target_ok || !LEVELS.contains(&level) {
            return Err(format!(
                "{VAR}: {item:?} is not a level or TARGET=LEVEL (levels: {})",
                LEVELS.join(", ")
            ));
        }
    }
    text.parse()
        .map_err(|e| format!("{VAR}: {text:?} is not a valid filter ({e})"))
}

fn init_logging(default: &str) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // A plain target filter, not `EnvFilter`, which compiles regular expressions at every
    // start: code no server otherwise runs (a Keeper never does), mapped into every process.
    let filter = log_filter(
        std::env::var("SPIKE_SYSTEM_LOG_LEVEL").ok().as_deref(),
        default,
    )?;
    let json = match std::env::var("SPIKE_SYSTEM_LOG_FORMAT")
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "" | "text" => false,
        "json" => true,
        other => {
            return Err(format!(
                "SPIKE_SYSTEM_LOG_FORMAT: {other:?} is not text or json"
            ));
        }
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer).init();
    }
    Ok(())
}

/// Every subcommand fails with the one [`CommandError`], which carries its exit status.
type Failure = CommandError;

fn usage(e: impl std::fmt::Display) -> Failure {
    CommandError::usage(e)
}

fn runtime(e: impl std::fmt::Display) -> Failure {
    CommandError::failed(e)
}

/// Why a server (Nexus, Keeper) stopped, as far as its exit status goes.
enum Stopped {
    /// The SPIFFE agent gave it no identity: 3.
    AgentAway,
    /// Its configuration cannot work (a store proven unsafe): 2, as any configuration error.
    Configuration,
    /// Anything else: 1.
    Failed,
}

/// How a server that stopped on `e` exits.
fn server_failure(why: Stopped, e: impl std::fmt::Display) -> Failure {
    match why {
        Stopped::AgentAway => CommandError::NoIdentity(e.to_string()),
        Stopped::Configuration => usage(e),
        Stopped::Failed => runtime(e),
    }
}

fn main() -> ExitCode {
    if let Err(e) = spike::platform::survive_hangups() {
        eprintln!("spike: cannot set up SIGHUP handling: {e}");
        return ExitCode::from(1);
    }
    let cli = Cli::parse();
    // Servers and the commands units run log their progress; a command an operator or a
    // script runs prints its answer, and only warnings beside it (not, say, every SVID the
    // agent hands it).
    let (name, default_level) = match &cli.command {
        Command::Nexus => ("spike nexus", "info"),
        Command::Keeper => ("spike keeper", "info"),
        Command::Dev(_) => ("spike dev", "info"),
        Command::Pki { .. } => ("spike pki", "info"),
        Command::Migrate { .. } => ("spike migrate", "info"),
        Command::Backup { .. } => ("spike backup", "info"),
        Command::Completions { .. } => ("spike", "warn"),
        Command::Secret { .. }
        | Command::Policy { .. }
        | Command::Cipher { .. }
        | Command::Recover { .. }
        | Command::Operator { .. }
        | Command::Audit { .. } => ("spike", "warn"),
    };
    if let Err(msg) = init_logging(default_level) {
        eprintln!("{name}: {msg}");
        return ExitCode::from(2);
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn runtime_builder() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(runtime)
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Nexus => {
            let cfg = spike::nexus::NexusConfig::from_source(&ProcessEnv).map_err(usage)?;
            runtime_builder()?
                .block_on(spike::nexus::run(cfg, spike::platform::shutdown_signal()))
                .map_err(|e| {
                    let why = if e.is_agent_unavailable() {
                        Stopped::AgentAway
                    } else if e.is_configuration() {
                        Stopped::Configuration
                    } else {
                        Stopped::Failed
                    };
                    server_failure(why, e)
                })
        }
        Command::Keeper => {
            let cfg = spike::keeper::KeeperConfig::from_source(&ProcessEnv).map_err(usage)?;
            // A Keeper answers a few requests per interval: one thread is plenty and keeps its
            // memory small.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(runtime)?
                .block_on(spike::keeper::run(cfg, spike::platform::shutdown_signal()))
                .map_err(|e| {
                    let why = if e.is_agent_unavailable() {
                        Stopped::AgentAway
                    } else {
                        Stopped::Failed
                    };
                    server_failure(why, e)
                })
        }
        Command::Dev(args) => runtime_builder()?.block_on(spike::entry::dev::run(args)),
        Command::Pki { command } => pki(command),
        Command::Migrate {
            command: MigrateCommand::FromSpike(args),
        } => runtime_builder()?.block_on(spike::migrate::from_spike(args.request())),
        Command::Backup { command } => backup(command),
        Command::Secret { format, command } => client(spike::client::secret::run(format, command)),
        Command::Policy { format, command } => client(spike::client::policy::run(format, command)),
        Command::Cipher { format, command } => client(spike::client::cipher::run(format, command)),
        Command::Recover { command } => client(spike::client::recover::run(command)),
        Command::Operator { format, command } => {
            client(spike::client::operator::run(format, command))
        }
        Command::Audit { command } => spike::client::audit::run(command),
        Command::Completions { shell } => {
            use std::io::Write;
            std::io::stdout()
                .write_all(&spike::entry::cli::completions(shell))
                .map_err(runtime)
        }
    }
}

/// Runs a client command (`secret`, `policy`, `cipher`); the logic is in `spike::client`.
fn client(
    command: impl std::future::Future<Output = spike::client::run::Result<()>>,
) -> Result<(), Failure> {
    spike::client::run::block_on(command)
}

fn backup(command: BackupCommand) -> Result<(), Failure> {
    use spike::backup::{self, Check, Destination, KeySource};
    let key =
        |dir: Option<std::path::PathBuf>| dir.map_or(KeySource::Keepers, KeySource::RecoverDir);
    match command {
        BackupCommand::Create {
            out,
            dir,
            keep,
            force,
            recover_dir,
        } => {
            let to = match (out, dir) {
                (Some(path), _) => Destination::File { path, force },
                (None, Some(dir)) => Destination::Dir { dir, keep },
                (None, None) => return Err(usage("give --out FILE or --dir DIR")),
            };
            runtime_builder()?.block_on(backup::create(to, key(recover_dir)))
        }
        BackupCommand::Verify {
            file,
            recover_dir,
            structure_only,
            accept_unauthenticated,
        } => {
            let check = if structure_only {
                Check::StructureOnly
            } else {
                Check::Full(key(recover_dir))
            };
            runtime_builder()?.block_on(backup::verify(&file, check, accept_unauthenticated))
        }
        BackupCommand::Restore {
            file,
            recover_dir,
            accept_unauthenticated,
        } => runtime_builder()?.block_on(backup::restore(
            &file,
            key(recover_dir),
            accept_unauthenticated,
        )),
    }
}

fn pki(command: PkiCommand) -> Result<(), Failure> {
    use spike::identity::{SpiffeId, pki};
    match command {
        PkiCommand::Init { dir, trust_domain } => {
            pki::init(&dir, &trust_domain).map_err(runtime)?;
            eprintln!(
                "created CA for trust domain {trust_domain} in {}",
                dir.display()
            );
            Ok(())
        }
        PkiCommand::Issue {
            dir,
            spiffe_id,
            out,
            dns,
            ip,
        } => {
            let id = SpiffeId::parse(&spiffe_id).map_err(usage)?;
            pki::issue(&dir, &id, &out, &dns, &ip).map_err(runtime)?;
            eprintln!("issued SVID for {id} in {}", out.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn log_levels_are_checked() {
        for ok in [
            None,
            Some(""),
            Some("info"),
            Some("DEBUG"),
            Some("spike=debug,hyper=warn"),
            Some("off"),
        ] {
            assert!(log_filter(ok, "info").is_ok(), "{ok:?}");
        }
        for bad in [
            "warning",
            "verbose",
            "spike=loud",
            "=info",
            "info,",
            "a b=info",
        ] {
            let err = log_filter(Some(bad), "info").unwrap_err();
            assert!(err.starts_with("SPIKE_SYSTEM_LOG_LEVEL"), "{bad}: {err}");
        }
    }
}
