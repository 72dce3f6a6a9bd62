//! Per-profile SMTP submission settings (`smtp_*`, `sent_*` keys of an
//! `imap_smtp` / `pop3_smtp` profile).

use super::*;

/// What to do with the Sent folder after a message was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentCopyMode {
    /// The daemon APPENDs the sent message to `sent_folder` over IMAP.
    Append,
    /// The server files submitted mail into `sent_folder` itself (Gmail,
    /// Exchange): nothing is appended, the folder is only searched.
    Server,
    /// No Sent folder (POP3 profiles): nothing can prove a delivery.
    None,
}

/// What happens to an email a crash left in `sending` when the Sent folder
/// cannot prove it was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownDelivery {
    /// `failed` with "delivery unknown", for a human to check (default:
    /// never a silent second send).
    Fail,
    /// Send again (at least once: the recipient may get it twice).
    Resend,
}

/// SMTP submission of one profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    /// Defaults to the profile's `host`.
    pub host: String,
    /// Defaults: 465 implicit TLS, 587 STARTTLS, 25 plain.
    pub port: u16,
    pub tls: TlsMode,
    /// Folder of sent mail (IMAP profiles), e.g. `Sent`.
    pub sent_folder: Option<String>,
    pub sent_copy: SentCopyMode,
    pub unknown_delivery: UnknownDelivery,
    /// Transient failures are retried (with back-off) for this long, then
    /// the email is `failed`.
    pub retry_for: Duration,
    /// SMTP connections kept per profile.
    pub pool_size: u32,
}

/// Parses the SMTP keys of a server profile; `None` for profile types that
/// do not submit over SMTP (their keys are then reported as misplaced).
pub(super) fn smtp_settings(
    t: &mut Table<'_>,
    kind: Option<ProfileType>,
    host: Option<&str>,
    allow_insecure: bool,
    errs: &mut Errors,
) -> Option<SmtpSettings> {
    const KEYS: &[&str] = &[
        "smtp_host",
        "smtp_port",
        "smtp_tls",
        "sent_folder",
        "sent_copy",
        "unknown_delivery",
        "send_retry_for",
        "smtp_pool_size",
    ];
    let submits = matches!(kind, Some(ProfileType::ImapSmtp | ProfileType::Pop3Smtp));
    if !submits {
        // Graph sends too and reads these two itself (config::graph).
        let graph_reads = ["unknown_delivery", "send_retry_for"];
        for &k in KEYS {
            if kind == Some(ProfileType::ExchangeOnline) && graph_reads.contains(&k) {
                continue;
            }
            if t.raw(k).is_some() {
                errs.push(
                    t.key(k),
                    "only imap_smtp and pop3_smtp profiles send over SMTP; remove it",
                );
            }
        }
        return None;
    }
    let imap = kind == Some(ProfileType::ImapSmtp);
    let smtp_host = t.nonempty_string("smtp_host", errs);
    let tls = t.choice(
        "smtp_tls",
        TlsMode::StartTls,
        &[
            ("implicit", TlsMode::Implicit),
            ("starttls", TlsMode::StartTls),
            ("plain", TlsMode::Plain),
        ],
        errs,
    );
    if tls == TlsMode::Plain && !allow_insecure {
        errs.push(
            t.key("smtp_tls"),
            "\"plain\" sends passwords and mail unencrypted; set allow_insecure = true to allow it",
        );
    }
    let port_i = t.int("smtp_port", 0, 0, 65_535, errs);
    let port = match (port_i, tls) {
        (0, TlsMode::Implicit) => 465,
        (0, TlsMode::StartTls) => 587,
        (0, TlsMode::Plain) => 25,
        (p, _) => p as u16,
    };
    let sent_folder = match t.string("sent_folder", errs) {
        Some(f) if f.trim().is_empty() => None,
        Some(f) => Some(f),
        None => imap.then(|| "Sent".to_string()),
    };
    let sent_copy = t.choice(
        "sent_copy",
        if imap {
            SentCopyMode::Append
        } else {
            SentCopyMode::None
        },
        &[
            ("append", SentCopyMode::Append),
            ("server", SentCopyMode::Server),
            ("none", SentCopyMode::None),
        ],
        errs,
    );
    if sent_copy != SentCopyMode::None && !imap {
        errs.push(
            t.key("sent_copy"),
            "a pop3_smtp profile has no folders; only \"none\" works",
        );
    }
    if sent_copy != SentCopyMode::None && sent_folder.is_none() {
        errs.push(
            t.key("sent_folder"),
            "is empty, but sent_copy needs a folder; set sent_copy = \"none\" or name the folder",
        );
    }
    let unknown_delivery = t.choice(
        "unknown_delivery",
        UnknownDelivery::Fail,
        &[
            ("fail", UnknownDelivery::Fail),
            ("resend", UnknownDelivery::Resend),
        ],
        errs,
    );
    let retry_for = t.duration(
        "send_retry_for",
        Duration::from_secs(3600),
        Duration::from_secs(1),
        Duration::from_secs(7 * 86_400),
        errs,
    );
    let pool_size = t.int("smtp_pool_size", 4, 1, 100, errs) as u32;
    let host = smtp_host.or_else(|| host.map(str::to_owned))?;
    Some(SmtpSettings {
        host,
        port,
        tls,
        sent_folder: if sent_copy == SentCopyMode::None {
            None
        } else {
            sent_folder
        },
        sent_copy,
        unknown_delivery,
        retry_for,
        pool_size,
    })
}
