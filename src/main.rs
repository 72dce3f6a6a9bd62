//! The `crm-mailsync` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crm_mailsync::config::{self, EXIT_CONFIG};
use crm_mailsync::crm::import;
use crm_mailsync::model::format_time;
use crm_mailsync::store::{ActivityQuery, SledStore, Store, StoreError};
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
    /// Dry-run: parse, filter, correlate and persist .eml files, Maildir folders
    /// or mbox files against a scratch store; one JSON decision per line.
    Replay {
        /// Configuration file (TOML): correlation settings and the mailbox used.
        #[arg(long, short)]
        config: PathBuf,
        /// JSON lines {"file": …, "regarding": "kind:id"} tracked before the inputs.
        #[arg(long)]
        seeds: Option<PathBuf>,
        /// Output file (JSON lines); "-" for standard output.
        #[arg(long, short)]
        output: PathBuf,
        /// Mailbox whose addresses and tracked folders apply (default: the first).
        #[arg(long)]
        mailbox: Option<String>,
        /// Use this store instead of a scratch one (it is written to!).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Records file (CSV or JSON lines, as for `records import`) put in
        /// the store's directory first, so parties and the track filter see them.
        #[arg(long)]
        records: Option<PathBuf>,
        /// .eml files, Maildir folders, mbox files or directories of them.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Inspect recorded email activities (offline: reads the store directly).
    Activities {
        #[command(subcommand)]
        command: ActivitiesCommand,
    },
    /// The CRM record directory (users, queues, contacts, accounts, leads, …).
    Records {
        #[command(subcommand)]
        command: RecordsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RecordsCommand {
    /// Upsert records from a CSV (header row with at least kind,id,email,name;
    /// several addresses separated by `;`) or JSON lines file into the store,
    /// then resolve the parties they make resolvable. Offline: while the
    /// daemon runs, use PUT /api/v1/records/{kind}/{id}. Any invalid line:
    /// nothing is imported and the exit status is 65, unless --skip-invalid.
    Import {
        /// Configuration file (TOML), to find the store and [crm.parties].
        #[arg(
            long,
            short,
            env = "CRM_MAILSYNC_CONFIG",
            default_value = "config/demo.toml"
        )]
        config: PathBuf,
        /// Import the valid lines and only report the invalid ones.
        #[arg(long)]
        skip_invalid: bool,
        /// File format; by default from the extension (.csv, .jsonl, .ndjson).
        #[arg(long, value_parser = ["csv", "jsonl"])]
        format: Option<String>,
        /// RECORDS.csv or RECORDS.jsonl.
        file: PathBuf,
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
        Command::Replay {
            config,
            seeds,
            output,
            mailbox,
            store,
            records,
            inputs,
        } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match replay(&cfg, seeds, output, mailbox, store, records, inputs) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("crm-mailsync replay: {e}");
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
        Command::Records {
            command:
                RecordsCommand::Import {
                    config,
                    skip_invalid,
                    format,
                    file,
                },
        } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            import_records(&cfg, &file, format.as_deref(), skip_invalid)
        }
    }
}

/// Invalid input data (sysexits EX_DATAERR).
const EXIT_DATAERR: u8 = 65;
/// The store is in use by the daemon: try again later (sysexits EX_TEMPFAIL).
const EXIT_TEMPFAIL: u8 = 75;

fn records_format(
    file: &std::path::Path,
    format: Option<&str>,
) -> Result<import::RecordsFormat, String> {
    match format {
        Some("csv") => Ok(import::RecordsFormat::Csv),
        Some(_) => Ok(import::RecordsFormat::Jsonl),
        None => import::RecordsFormat::of_path(file).ok_or_else(|| {
            format!(
                "{}: cannot tell the format from the name; use a .csv or .jsonl file or --format",
                file.display()
            )
        }),
    }
}

fn import_records(
    cfg: &config::Config,
    file: &std::path::Path,
    format: Option<&str>,
    skip_invalid: bool,
) -> ExitCode {
    let format = match records_format(file, format) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crm-mailsync records import: {e}");
            return ExitCode::from(EXIT_DATAERR);
        }
    };
    let parsed = match import::parse_file(file, format) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "crm-mailsync records import: cannot read {}: {e}",
                file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    for e in &parsed.errors {
        eprintln!("{}:{}: {}", file.display(), e.line, e.message);
    }
    if !parsed.errors.is_empty() && !skip_invalid {
        eprintln!(
            "crm-mailsync records import: {} invalid line(s); nothing imported (fix them, or pass --skip-invalid to import the {} valid record(s))",
            parsed.errors.len(),
            parsed.records.len()
        );
        return ExitCode::from(EXIT_DATAERR);
    }
    let path = cfg.store_path();
    let store = match SledStore::open_with_cache_mb(&path, cfg.daemon.store_cache_mb) {
        Ok(s) => s,
        Err(StoreError::Locked(_)) => {
            eprintln!(
                "crm-mailsync records import: the store at {} is locked by a running daemon; nothing imported.\nWhile the daemon runs, send the records through its admin API instead (PUT /api/v1/records/{{kind}}/{{id}}), or stop it first.",
                path.display()
            );
            return ExitCode::from(EXIT_TEMPFAIL);
        }
        Err(e) => {
            eprintln!(
                "crm-mailsync records import: cannot open the store at {}: {e}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let skipped = parsed.errors.len();
    match import::import_records(&store, parsed.records, &cfg.crm.parties, format_now()) {
        Ok(s) => {
            println!(
                "inserted={} updated={} unchanged={} invalid_skipped={skipped} activities_resolved={}",
                s.changes.inserted, s.changes.updated, s.changes.unchanged, s.resolved_activities
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crm-mailsync records import: {e}");
            ExitCode::FAILURE
        }
    }
}

fn format_now() -> i64 {
    crm_mailsync::model::now()
}

fn replay(
    cfg: &config::Config,
    seeds: Option<PathBuf>,
    output: PathBuf,
    mailbox: Option<String>,
    store_path: Option<PathBuf>,
    records: Option<PathBuf>,
    inputs: Vec<PathBuf>,
) -> Result<(), String> {
    use crm_mailsync::pipeline::PipelineContext;
    use crm_mailsync::replay::{self, ScratchDir};
    use std::io::IsTerminal;

    let mb = match &mailbox {
        Some(name) => cfg.mailboxes.iter().find(|m| &m.name == name),
        None => cfg.mailboxes.first(),
    }
    .ok_or_else(|| {
        format!(
            "no mailbox {:?} in the configuration",
            mailbox.unwrap_or_default()
        )
    })?;
    // Kept alive until the end of the run; removed on drop.
    let scratch = match &store_path {
        Some(_) => None,
        None => Some(ScratchDir::new().map_err(|e| e.to_string())?),
    };
    let dir = match (&store_path, &scratch) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) => s.0.clone(),
        (None, None) => return Err("no store".into()),
    };
    let store = SledStore::open_with_cache_mb(&dir, cfg.daemon.store_cache_mb)
        .map_err(|e| format!("store {}: {e}", dir.display()))?;
    if let Some(file) = &records {
        let parsed = import::parse_file(file, records_format(file, None)?)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        if let Some(e) = parsed.errors.first() {
            return Err(format!(
                "{}:{}: {} ({} invalid line(s); check with `records import`)",
                file.display(),
                e.line,
                e.message,
                parsed.errors.len()
            ));
        }
        import::import_records(&store, parsed.records, &cfg.crm.parties, format_now())
            .map_err(|e| e.to_string())?;
    }
    let mut ctx = PipelineContext::for_mailbox(cfg, mb);
    ctx.quarantine_dir = dir.join("replay-quarantine");
    let seeds = match seeds {
        Some(p) => replay::read_seeds(&p).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let inputs = replay::list_inputs(&inputs).map_err(|e| e.to_string())?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(inputs.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut out: Box<dyn std::io::Write> = if output.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        let f = std::fs::File::create(&output)
            .map_err(|e| format!("cannot create {}: {e}", output.display()))?;
        Box::new(std::io::BufWriter::new(f))
    };
    let now = chrono::Utc::now().timestamp();
    replay::run_to_writer(&store, &ctx, &seeds, &inputs, now, &mut out, &mut || {
        bar.inc(1)
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    Ok(())
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
    let store = match SledStore::open_with_cache_mb(&path, cfg.daemon.store_cache_mb) {
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
