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
