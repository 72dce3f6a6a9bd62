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
    /// Queue an email for the mailbox to send: FILE.json is a request as for
    /// POST /api/v1/outgoing, FILE.eml a message whose subject, to/cc/bcc,
    /// bodies and attachments are taken (its From and other headers are
    /// not: the mailbox sends it). Writes to the store, or through the
    /// daemon's admin API while the daemon holds it. Prints the queued
    /// email as JSON. Exit status: 0 queued, 64 configuration or mailbox
    /// problem, 65 invalid input, 69 neither store nor API reachable.
    Send {
        /// Configuration file (TOML), to find the store, the mailbox and the admin API.
        #[arg(
            long,
            short,
            env = "CRM_MAILSYNC_CONFIG",
            default_value = "config/demo.toml"
        )]
        config: PathBuf,
        /// Configured mailbox that sends it (overrides the JSON's `mailbox`).
        #[arg(long)]
        mailbox: Option<String>,
        /// `kind:id` of the record it is regarding (overrides the JSON's `regarding`).
        #[arg(long)]
        regarding: Option<String>,
        /// FILE.json (an outgoing request) or FILE.eml (a message).
        file: PathBuf,
    },
    /// Tell the running daemon to read its configuration file again (as
    /// SIGHUP or POST /api/v1/reload do). The file is checked here first:
    /// every error is printed and the exit status is 64, nothing changes.
    /// Exit 0 reloaded, 69 the daemon's admin API cannot be reached, 70
    /// anything else.
    Reload {
        /// Configuration file (TOML): the one the daemon runs on.
        #[arg(
            long,
            short,
            env = "CRM_MAILSYNC_CONFIG",
            default_value = "config/demo.toml"
        )]
        config: PathBuf,
    },
    /// Test & Enable of one mailbox (or with --profile of every mailbox of
    /// a profile): incoming (connect, TLS, log in, open
    /// the inbox), outgoing where it sends (log in, send a test message to
    /// itself) and ACT where configured; prints each direction's status
    /// and cause. On success the mailbox is enabled. Runs against the
    /// store, or through the running daemon's admin API while the daemon
    /// holds it. Exit status: 0 passed and enabled, 1 a test failed or a
    /// mailbox could not be enabled, 64 configuration problem or unknown
    /// mailbox or profile, 69 the daemon holds the store and its API is
    /// unreachable, 70 anything else.
    TestEnable {
        /// Configuration file (TOML), to find the mailbox, the store and the admin API.
        #[arg(
            long,
            short,
            env = "CRM_MAILSYNC_CONFIG",
            default_value = "config/demo.toml"
        )]
        config: PathBuf,
        /// The job as JSON (as GET /api/v1/jobs/{id} shows it) instead of text.
        #[arg(long)]
        json: bool,
        /// Test every mailbox of this profile instead, as many at once as
        /// its max_concurrent_connections allows; prints each and a summary.
        #[arg(long, conflicts_with = "mailbox")]
        profile: Option<String>,
        /// The mailbox's name as configured.
        #[arg(required_unless_present = "profile")]
        mailbox: Option<String>,
        /// Take the mailbox over from another crm-mailsync deployment whose
        /// marker it holds; that deployment disables its side at its next
        /// check. Without it such a mailbox fails the test.
        #[arg(long)]
        force: bool,
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
            match rt.block_on(daemon::run_from(cfg, Some(config.clone()))) {
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
        Command::Send {
            config,
            mailbox,
            regarding,
            file,
        } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            send::run(&cfg, mailbox, regarding, &file)
        }
        Command::Reload { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::from(70);
                }
            };
            match rt.block_on(daemon::reload::request(&cfg)) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err((code, message)) => {
                    eprintln!("crm-mailsync reload: {message}");
                    ExitCode::from(code)
                }
            }
        }
        Command::TestEnable {
            config,
            json,
            profile,
            mailbox,
            force,
        } => {
            use crm_mailsync::testenable::cli::{self, Target};
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let target = match (profile, mailbox) {
                (Some(p), _) => Target::Profile(p),
                (None, Some(m)) => Target::Mailbox(m),
                (None, None) => {
                    eprintln!("crm-mailsync test-enable: name a MAILBOX or --profile NAME");
                    return ExitCode::from(2);
                }
            };
            telemetry::init_logging(cfg.daemon.log_format, "warn");
            ExitCode::from(cli::run(cfg, &target, json, force))
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

/// `crm-mailsync send`: one email into the queue, through the store or the
/// running daemon's admin API.
mod send {
    use std::path::Path;
    use std::process::ExitCode;

    use base64::Engine as _;
    use crm_mailsync::config::{Config, EXIT_CONFIG};
    use crm_mailsync::outgoing::queue::{queue, QueueError};
    use crm_mailsync::outgoing::{AttachmentRequest, OutgoingRequest};
    use crm_mailsync::store::{SledStore, StoreError};
    use mail_parser::{MessageParser, MimeHeaders, PartType};

    use super::EXIT_DATAERR;

    /// Neither the store nor the admin API could be reached (sysexits
    /// EX_UNAVAILABLE).
    const EXIT_UNAVAILABLE: u8 = 69;

    /// How long the admin API may take to answer.
    const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

    /// A failure with its exit status.
    struct Failure {
        code: u8,
        message: String,
    }

    fn fail(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// Runs the command: prints the queued email's JSON on success.
    pub fn run(
        cfg: &Config,
        mailbox: Option<String>,
        regarding: Option<String>,
        file: &Path,
    ) -> ExitCode {
        match request(file, mailbox, regarding).and_then(|req| submit(cfg, &req)) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(f) => {
                eprintln!("crm-mailsync send: {}", f.message);
                ExitCode::from(f.code)
            }
        }
    }

    /// The request from the file, with the flags applied.
    fn request(
        file: &Path,
        mailbox: Option<String>,
        regarding: Option<String>,
    ) -> Result<OutgoingRequest, Failure> {
        let bytes = std::fs::read(file)
            .map_err(|e| fail(EXIT_DATAERR, format!("cannot read {}: {e}", file.display())))?;
        let ext = file
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let mut req = match ext.as_deref() {
            Some("json") => serde_json::from_slice::<OutgoingRequest>(&bytes).map_err(|e| {
                fail(
                    EXIT_DATAERR,
                    format!("{}: not an outgoing email request: {e}", file.display()),
                )
            })?,
            Some("eml") => request_from_eml(&bytes)
                .map_err(|e| fail(EXIT_DATAERR, format!("{}: {e}", file.display())))?,
            _ => {
                return Err(fail(
                    EXIT_DATAERR,
                    format!(
                        "{}: give a .json request or an .eml message",
                        file.display()
                    ),
                ))
            }
        };
        if let Some(m) = mailbox {
            req.mailbox = m;
        }
        if regarding.is_some() {
            req.regarding = regarding;
        }
        if req.mailbox.is_empty() {
            return Err(fail(
                EXIT_CONFIG as u8,
                "which mailbox sends it? Give --mailbox NAME (or \"mailbox\" in the JSON)",
            ));
        }
        Ok(req)
    }

    /// An .eml message as a request: subject, to/cc/bcc, the text and HTML
    /// bodies and the attachments; no mailbox (the flag gives it).
    fn request_from_eml(raw: &[u8]) -> Result<OutgoingRequest, String> {
        let msg = std::panic::catch_unwind(|| MessageParser::default().parse(raw))
            .ok()
            .flatten()
            .ok_or("not an email message (it does not parse)")?;
        let addresses = |a: Option<&mail_parser::Address<'_>>| -> Vec<String> {
            a.map(|a| {
                a.iter()
                    .filter_map(|x| x.address())
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect()
            })
            .unwrap_or_default()
        };
        // mail-parser lists an HTML body under text_body too (converted), and
        // a text one under html_body: only parts of the right type count.
        let bodies = |indexes: &[u32], html: bool| -> Option<String> {
            let parts: Vec<&str> = indexes
                .iter()
                .filter_map(|&i| msg.parts.get(i as usize))
                .filter_map(|p| match (&p.body, html) {
                    (PartType::Text(t), false) | (PartType::Html(t), true) => Some(t.as_ref()),
                    _ => None,
                })
                .collect();
            (!parts.is_empty()).then(|| parts.join("\n"))
        };
        let attachments = msg
            .attachments()
            .enumerate()
            .map(|(n, part)| {
                let content_type = part.content_type().map(|ct| match ct.subtype() {
                    Some(sub) => format!("{}/{sub}", ct.ctype()),
                    None => ct.ctype().to_string(),
                });
                let filename = part
                    .attachment_name()
                    .map(str::to_string)
                    .unwrap_or_else(|| unnamed(n + 1, content_type.as_deref()));
                AttachmentRequest {
                    filename,
                    content_type,
                    content_base64: base64::engine::general_purpose::STANDARD
                        .encode(part.contents()),
                }
            })
            .collect();
        Ok(OutgoingRequest {
            to: addresses(msg.to()),
            cc: addresses(msg.cc()),
            bcc: addresses(msg.bcc()),
            subject: msg.subject().unwrap_or_default().to_string(),
            text: bodies(&msg.text_body, false),
            html: bodies(&msg.html_body, true),
            attachments,
            ..OutgoingRequest::default()
        })
    }

    /// A name for an attachment without one, with an extension from its type
    /// so the attachment policy can judge it.
    fn unnamed(n: usize, content_type: Option<&str>) -> String {
        let ext = match content_type.map(str::to_ascii_lowercase).as_deref() {
            Some("message/rfc822") => "eml",
            Some("text/plain") => "txt",
            Some("text/html") => "html",
            Some("text/calendar") => "ics",
            Some("image/png") => "png",
            Some("image/jpeg") => "jpg",
            Some("image/gif") => "gif",
            Some("application/pdf") => "pdf",
            _ => "bin",
        };
        format!("attachment-{n}.{ext}")
    }

    /// Queues through the store, or through the admin API when the daemon
    /// holds the store. Returns the queued email's JSON.
    fn submit(cfg: &Config, req: &OutgoingRequest) -> Result<String, Failure> {
        let path = cfg.store_path();
        let store_problem = match SledStore::open_with_cache_mb(&path, cfg.daemon.store_cache_mb) {
            Ok(store) => {
                let queued =
                    queue(&store, cfg, req, crm_mailsync::model::now()).map_err(queue_failure)?;
                if !queued.existing {
                    eprintln!(
                        "queued in the store at {}; the daemon sends it when it runs",
                        path.display()
                    );
                }
                return serde_json::to_string(&queued).map_err(|e| fail(1, e.to_string()));
            }
            Err(StoreError::Locked(_)) => None,
            Err(e) => Some(format!("cannot open the store at {}: {e}", path.display())),
        };
        through_api(cfg, req).map_err(|f| match (&store_problem, f.code) {
            (Some(p), EXIT_UNAVAILABLE) => fail(EXIT_UNAVAILABLE, format!("{p}; {}", f.message)),
            _ => f,
        })
    }

    fn queue_failure(e: QueueError) -> Failure {
        match e {
            QueueError::UnknownMailbox(_) | QueueError::NotAllowed(_) => {
                fail(EXIT_CONFIG as u8, e.to_string())
            }
            QueueError::AnswersAutomatic(_) => fail(EXIT_DATAERR, e.to_string()),
            QueueError::Invalid(problems) => fail(
                EXIT_DATAERR,
                format!(
                    "the email is not valid, nothing was queued:\n  {}",
                    problems.join("\n  ")
                ),
            ),
            QueueError::Store(e) => fail(1, e.to_string()),
        }
    }

    /// POSTs the request to the running daemon's admin API.
    fn through_api(cfg: &Config, req: &OutgoingRequest) -> Result<String, Failure> {
        let unavailable = |why: String| {
            fail(
                EXIT_UNAVAILABLE,
                format!("the store is in use by the daemon and {why}"),
            )
        };
        if !cfg.admin.enabled {
            return Err(unavailable(
                "its admin API is off ([admin] enabled = false)".into(),
            ));
        }
        let Some(token) = cfg.admin.token.as_ref() else {
            return Err(unavailable("no [admin] token is configured".into()));
        };
        let mut addr = cfg.admin.listen;
        // A wildcard listen address is reached on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let url = format!("http://{addr}/api/v1/outgoing");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(1, format!("cannot start the async runtime: {e}")))?;
        let answer = rt.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(API_TIMEOUT)
                .build()
                .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
            let resp = client
                .post(&url)
                .bearer_auth(token.expose())
                .json(req)
                .send()
                .await
                .map_err(|e| format!("its admin API at {url} cannot be reached: {e}"))?;
            let status = resp.status().as_u16();
            let text = resp
                .text()
                .await
                .map_err(|e| format!("its admin API at {url} broke off the answer: {e}"))?;
            Ok::<_, String>((status, text))
        });
        let (status, text) = answer.map_err(unavailable)?;
        api_outcome(status, &text)
    }

    /// The exit status and message for the API's answer.
    fn api_outcome(status: u16, text: &str) -> Result<String, Failure> {
        if matches!(status, 200 | 202) {
            return Ok(text.trim().to_string());
        }
        let body: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let error = body["error"].as_str().unwrap_or(text).to_string();
        let code = match (status, body["code"].as_str()) {
            (401, _) => EXIT_CONFIG as u8,
            (_, Some("unknown_mailbox" | "not_allowed")) => EXIT_CONFIG as u8,
            (400 | 409 | 413, _) => EXIT_DATAERR,
            _ => 1,
        };
        let error = match (status, body["problems"].as_array()) {
            (401, _) => "the daemon refused the [admin] token of this configuration".to_string(),
            (_, Some(problems)) => format!(
                "the email is not valid, nothing was queued:\n  {}",
                problems
                    .iter()
                    .filter_map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ),
            _ => error,
        };
        Err(fail(code, format!("the daemon answered {status}: {error}")))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const EML: &[u8] = b"From: Someone <someone@example.com>\r\n\
To: Ann <ann@customer.example>, bob@customer.example\r\n\
Cc: team: carol@customer.example;\r\n\
Bcc: audit@example.test\r\n\
Subject: =?utf-8?q?Angebot_f=C3=BCr_Sie?=\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
\r\n\
--b1\r\n\
Content-Type: multipart/alternative; boundary=\"b2\"\r\n\
\r\n\
--b2\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Hello Ann\r\n\
--b2\r\n\
Content-Type: text/html; charset=utf-8\r\n\
\r\n\
<p>Hello Ann</p>\r\n\
--b2--\r\n\
--b1\r\n\
Content-Type: application/pdf; name=\"offer.pdf\"\r\n\
Content-Disposition: attachment; filename=\"offer.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERi0xLjQK\r\n\
--b1\r\n\
Content-Type: image/png\r\n\
Content-Disposition: attachment\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
iVBORw0K\r\n\
--b1--\r\n";

        #[test]
        fn an_eml_becomes_a_request() {
            let req = request_from_eml(EML).unwrap();
            assert_eq!(req.to, ["ann@customer.example", "bob@customer.example"]);
            assert_eq!(req.cc, ["carol@customer.example"]);
            assert_eq!(req.bcc, ["audit@example.test"]);
            assert_eq!(req.subject, "Angebot f\u{fc}r Sie");
            assert_eq!(req.text.as_deref().map(str::trim), Some("Hello Ann"));
            assert_eq!(req.html.as_deref().map(str::trim), Some("<p>Hello Ann</p>"));
            assert_eq!(req.attachments.len(), 2);
            let pdf = &req.attachments[0];
            assert_eq!(pdf.filename, "offer.pdf");
            assert_eq!(pdf.content_type.as_deref(), Some("application/pdf"));
            assert_eq!(pdf.content_base64, "JVBERi0xLjQK");
            assert_eq!(req.attachments[1].filename, "attachment-2.png");
            assert!(req.mailbox.is_empty());
        }

        #[test]
        fn a_text_only_eml_has_no_html_and_an_html_only_one_no_text() {
            let text = request_from_eml(b"To: a@b.example\r\nSubject: s\r\n\r\nplain\r\n").unwrap();
            assert_eq!(text.text.as_deref().map(str::trim), Some("plain"));
            assert_eq!(text.html, None);
            let html = request_from_eml(
                b"To: a@b.example\r\nSubject: s\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n",
            )
            .unwrap();
            assert_eq!(html.text, None);
            assert_eq!(html.html.as_deref().map(str::trim), Some("<b>x</b>"));
            assert!(html.attachments.is_empty());
        }

        #[test]
        fn api_answers_map_to_exit_statuses() {
            assert_eq!(
                api_outcome(202, "{\"id\":1}\n").ok().as_deref(),
                Some("{\"id\":1}")
            );
            assert!(api_outcome(200, "{}").is_ok());
            let code = |status, body: &str| api_outcome(status, body).err().map(|f| f.code);
            assert_eq!(
                code(400, r#"{"error":"x","code":"invalid","problems":["a"]}"#),
                Some(65)
            );
            assert_eq!(
                code(409, r#"{"error":"x","code":"answers_automatic"}"#),
                Some(65)
            );
            assert_eq!(code(409, r#"{"error":"x","code":"not_allowed"}"#), Some(64));
            assert_eq!(
                code(404, r#"{"error":"x","code":"unknown_mailbox"}"#),
                Some(64)
            );
            assert_eq!(code(401, r#"{"error":"x"}"#), Some(64));
            assert_eq!(code(500, "oops"), Some(1));
            let invalid = api_outcome(
                400,
                r#"{"error":"x","problems":["no recipient","no body"]}"#,
            )
            .err()
            .unwrap();
            assert!(
                invalid.message.contains("no recipient\n  no body"),
                "{}",
                invalid.message
            );
        }
    }
}
