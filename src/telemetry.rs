//! Logs and metrics setup, and the metric names in one place.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Messages turned into activities, per mailbox.
pub const PROCESSED: &str = "crm_mailsync_messages_processed_total";
/// Messages quarantined, per mailbox.
pub const FAILED: &str = "crm_mailsync_messages_failed_total";
/// Messages recognised as duplicates of an existing activity, per mailbox.
pub const DUPLICATES: &str = "crm_mailsync_messages_duplicate_total";
/// Correlation decisions, per method.
pub const CORRELATIONS: &str = "crm_mailsync_correlations_total";
/// Unix time of the last successful sync cycle, per mailbox.
pub const LAST_SUCCESS: &str = "crm_mailsync_last_successful_sync_timestamp_seconds";
/// Messages waiting to be fetched, per mailbox.
pub const BACKLOG: &str = "crm_mailsync_backlog_messages";
/// Failed sync cycles, per mailbox and disposition.
pub const SYNC_ERRORS: &str = "crm_mailsync_sync_errors_total";
/// 1 when the mailbox is enabled and syncing, per mailbox.
pub const MAILBOX_UP: &str = "crm_mailsync_mailbox_up";
/// Mailbox tasks restarted after a panic, per mailbox.
pub const TASK_RESTARTS: &str = "crm_mailsync_task_restarts_total";

/// Undelivered outbox events, per CRM adapter.
pub const OUTBOX_DEPTH: &str = "crm_mailsync_outbox_depth";
/// Age of the oldest undelivered outbox event, per CRM adapter.
pub const OUTBOX_OLDEST_AGE: &str = "crm_mailsync_outbox_oldest_age_seconds";
/// Events given up on (dead letters), per CRM adapter.
pub const OUTBOX_DEAD_LETTERS: &str = "crm_mailsync_outbox_dead_letters";
/// Delivery attempts per CRM adapter and result (`delivered`, `failed` with
/// a `disposition`: transient, permanent, endpoint).
pub const CRM_DELIVERIES: &str = "crm_mailsync_crm_deliveries_total";
/// Outgoing SMTP transactions by mailbox and result (`sent`, `deferred`,
/// `failed`).
pub const OUTGOING_SENDS: &str = "crm_mailsync_outgoing_sends_total";
/// Record pulls per CRM adapter and result (`ok`, `failed`).
pub const CRM_RECORD_PULLS: &str = "crm_mailsync_crm_record_pulls_total";

/// Crates that log the bytes they send and receive at debug/trace level:
/// async-imap every IMAP command (`LOGIN user password`, the base64
/// `AUTHENTICATE` responses) and server reply, lettre every SMTP line (`AUTH
/// PLAIN …`). The log filter is free-form, so these are dropped below INFO
/// whatever it says: no filter may turn a password into a log line.
const WIRE_LOGGING_TARGETS: &[&str] = &["async_imap", "lettre"];

/// False for events that could carry wire data (see [`WIRE_LOGGING_TARGETS`]).
pub fn allowed_event(meta: &tracing::Metadata<'_>) -> bool {
    if *meta.level() <= tracing::Level::INFO {
        return true;
    }
    let target = meta.target();
    !WIRE_LOGGING_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Installs the tracing subscriber. `RUST_LOG` overrides the configured level;
/// wire-logging crates stay below it at INFO whatever either says.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = if json {
        layer.json().flatten_event(true).boxed()
    } else {
        layer.compact().boxed()
    };
    // Another subscriber may already be installed (tests); keep it.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer.with_filter(filter_fn(allowed_event)))
        .try_init();
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|_| handle)
        })
        .clone()
}

/// Registers every metric with a zero value so dashboards see them from the start.
pub fn describe(mailboxes: &[String]) {
    metrics::describe_counter!(PROCESSED, "Messages turned into email activities");
    metrics::describe_counter!(FAILED, "Messages quarantined as unprocessable");
    metrics::describe_counter!(
        DUPLICATES,
        "Messages recognised as duplicates of an existing activity"
    );
    metrics::describe_counter!(CORRELATIONS, "Correlation decisions by method");
    metrics::describe_gauge!(LAST_SUCCESS, "Unix time of the last successful sync cycle");
    metrics::describe_gauge!(BACKLOG, "Messages waiting to be fetched");
    metrics::describe_counter!(SYNC_ERRORS, "Failed sync cycles");
    metrics::describe_gauge!(MAILBOX_UP, "1 while the mailbox is enabled and syncing");
    metrics::describe_counter!(TASK_RESTARTS, "Mailbox tasks restarted after a panic");
    metrics::describe_counter!(
        OUTGOING_SENDS,
        "Outgoing SMTP transactions by result (sent, deferred, failed)"
    );
    metrics::describe_gauge!(OUTBOX_DEPTH, "Undelivered outbox events per CRM adapter");
    metrics::describe_gauge!(
        OUTBOX_OLDEST_AGE,
        "Age in seconds of the oldest undelivered outbox event per CRM adapter"
    );
    metrics::describe_gauge!(
        OUTBOX_DEAD_LETTERS,
        "Outbox events moved to the dead letters per CRM adapter"
    );
    metrics::describe_counter!(CRM_DELIVERIES, "Delivery attempts to the CRM by result");
    metrics::describe_counter!(CRM_RECORD_PULLS, "Record pulls from the CRM by result");
    for m in mailboxes {
        metrics::counter!(PROCESSED, "mailbox" => m.clone()).increment(0);
        metrics::counter!(FAILED, "mailbox" => m.clone()).increment(0);
        metrics::counter!(TASK_RESTARTS, "mailbox" => m.clone()).increment(0);
    }
    for method in crate::model::CorrelationMethod::ALL {
        metrics::counter!(CORRELATIONS, "method" => method.as_str()).increment(0);
    }
}
