//! The `crm-mailsync` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crm_mailsync::config::{self, EXIT_CONFIG};
use crm_mailsync::model::format_time;
use crm_mailsync::store::{ActivityQuery, SledStore, Store};
use crm_mailsync::{daemon, telemetry};

/// Server-side email synchronization for CRM systems: polls IMAP, POP3 and
/// Maildir mailboxes, ties every message to the right CRM record, and reports
/// on it through alerts, health endpoints and metrics.
#[derive(Debug, Parser)]
#[command(name = "crm-mailsync", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file (TOML). Environment variables CRM_MAILSYNC__SECTION__KEY override it.
        #[arg(
            long,
            short,
            env = "CRM_MAILSYNC_CONFIG",
            default_value = "config/demo.toml"
        )]
        config: PathBuf,
    },
    /// Validate a configuration file; prints every error with its key path, exits 64 on errors.
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Inspect recorded email activities (offline: reads the store directly).
    Activities {
        #[command(subcommand)]
        command: ActivitiesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ActivitiesCommand {
    /// List activities, newest first, one per line.
    List {
        /// Configuration file (TOML), to find the store.
        #[arg(
            long,
            short,
            env = "CRM_MAILSYNC_CONFIG",
            default_value = "config/demo.toml"
        )]
        config: PathBuf,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Only this mailbox.
        #[arg(long)]
        mailbox: Option<String>,
        /// At most this many (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
}

fn load_config(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|errs| {
        eprint!("{}: {errs}", path.display());
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match load_config(&file) {
            Ok(cfg) => {
                let summary: Vec<String> = config::summary(&cfg)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("{}: OK ({})", file.display(), summary.join(", "));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            telemetry::init_logging(cfg.daemon.log_format, &cfg.daemon.log_level);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(daemon::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "daemon failed");
                    eprintln!("crm-mailsync: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Activities {
            command:
                ActivitiesCommand::List {
                    config,
                    json,
                    mailbox,
                    limit,
                },
        } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            list_activities(&cfg, json, mailbox, limit)
        }
    }
}

fn list_activities(
    cfg: &config::Config,
    json: bool,
    mailbox: Option<String>,
    limit: usize,
) -> ExitCode {
    let path = cfg.store_path();
    if !path.exists() {
        eprintln!(
            "no store at {} yet: the daemon has not run with this configuration",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    let store = match SledStore::open(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open the store at {}: {e}\nWhile the daemon runs, use GET /api/v1/activities instead.", path.display());
            return ExitCode::FAILURE;
        }
    };
    let list = match store.activities(&ActivityQuery {
        mailbox,
        before: None,
        limit,
    }) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot read activities: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    for a in list {
        let line = if json {
            serde_json::to_string(&a).unwrap_or_default()
        } else {
            format!(
                "{id}\t{recv}\t{mailbox}\t{regarding}\t{method}\t{score:.2}\t{subject}",
                id = a.id,
                recv = format_time(a.received_at),
                mailbox = a.mailbox,
                regarding = a
                    .regarding
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "-".into()),
                method = a.method,
                score = a.score,
                subject = a.subject.replace(['\t', '\n', '\r'], " "),
            )
        };
        if writeln!(out, "{line}").is_err() {
            break; // closed pipe (e.g. `| head`)
        }
    }
    ExitCode::SUCCESS
}
