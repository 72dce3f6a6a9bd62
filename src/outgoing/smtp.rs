//! SMTP submission: lettre's pooled [`AsyncSmtpTransport`] with our TLS
//! policy, credentials and time-outs, and its failures sorted into
//! [`SmtpError`] (5xx permanent, 4xx and network transient).
//!
//! * TLS: implicit (465) or STARTTLS (587, required: never a silent fall
//!   back to plaintext); plaintext only when the target says
//!   `allow_insecure`. Certificates are always verified against the system
//!   roots plus the profile's `ca_file`, under `tls_server_name` when set.
//!   lettre builds its rustls config with the ring provider (the only one
//!   linked), so no aws-lc-rs.
//! * AUTH: a password offers PLAIN and LOGIN, an OAuth token XOAUTH2. The
//!   token comes from the provider before every send; a changed token
//!   rebuilds the pool, whose connections authenticated with the old one.
//! * Time-outs: lettre's async client bounds only the TCP connect
//!   (`connect_timeout`), not the reads, so every transaction runs under one
//!   deadline sized like the per-step `io_timeout`s it stands in for. A
//!   transaction cut off by it leaves its connection in an unknown state
//!   (maybe mid-DATA): the whole pool is shut down rather than let lettre
//!   recycle that connection.
//! * Secrets: nothing here logs; lettre's own wire tracing (with AUTH lines)
//!   is dropped by our subscriber (telemetry.rs).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials as SmtpCredentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::{AsyncSmtpTransport, PoolConfig};
use lettre::{Address, AsyncTransport, Tokio1Executor};
use tokio_rustls::rustls;

use crate::config::Secret;
use crate::connector::oauth::TokenProvider;
use crate::connector::Credentials;
use crate::error::{Classify, Disposition};
use crate::net::{Endpoint, TlsMode};

/// Longest server text kept in an error.
const MAX_TEXT: usize = 500;

/// Round trips of one transaction besides RCPT: greeting, EHLO, STARTTLS,
/// EHLO again, AUTH (two for LOGIN), MAIL, DATA, end of data, and the NOOP
/// lettre sends before reusing a pooled connection.
const ROUND_TRIPS: u32 = 10;

/// Message bytes granted one more `io_timeout` of the deadline (a slow
/// uplink must not make a large message time out).
const BYTES_PER_STEP: usize = 1 << 20;

/// Reply codes of RFC 4954 that mean the login itself failed.
const AUTH_CODES: &[u16] = &[530, 534, 535, 538];

type Transport = AsyncSmtpTransport<Tokio1Executor>;

/// Where and as whom to submit mail.
#[derive(Debug, Clone)]
pub struct SmtpTarget {
    /// Server, port, TLS mode, CA file, server name, time-outs.
    pub endpoint: Endpoint,
    /// Permits [`TlsMode::Plain`] (password in the clear).
    pub allow_insecure: bool,
    /// Login. With a `token_provider`, the token of `Credentials::OAuth2` is
    /// replaced by a fresh one before every send.
    pub credentials: Credentials,
    /// Source of OAuth2 access tokens.
    pub token_provider: Option<Arc<dyn TokenProvider>>,
    /// Connections kept open for reuse.
    pub pool_size: u32,
    /// Name sent in EHLO; defaults to this machine's host name.
    pub hello_name: Option<String>,
}

/// The server's final reply to an accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    /// Reply code (250).
    pub code: u16,
    /// Reply text, lines joined by spaces (often carries the queue id).
    pub text: String,
}

/// Why a message was not (known to be) accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmtpError {
    /// 5xx: the server will not take this message; permanent.
    #[error("SMTP server rejected the message: {code} {text}")]
    Rejected {
        /// Reply code.
        code: u16,
        /// Server text.
        text: String,
    },
    /// 4xx: try again later; transient.
    #[error("SMTP server deferred the message: {code} {text}")]
    Deferred {
        /// Reply code.
        code: u16,
        /// Server text.
        text: String,
    },
    /// Connect refused, connection dropped, garbled reply; transient.
    #[error("SMTP connection failed: {0}")]
    Network(String),
    /// No answer in time; transient (the message may or may not have been
    /// accepted if this hit after the end of DATA).
    #[error("SMTP time-out: {0}")]
    Timeout(String),
    /// Certificate not trusted or not for this name, or STARTTLS not
    /// offered; permanent until the operator fixes trust or the server.
    #[error("SMTP TLS failure: {0}")]
    Tls(String),
    /// The server refused the login; permanent.
    #[error("SMTP authentication failed: {0}")]
    Auth(String),
    /// The login failed with a token from a source that rotates (or no
    /// token could be had right now): transient, the next attempt reads a
    /// fresh one.
    #[error("SMTP authentication failed: {0}")]
    AuthRetry(String),
    /// The target or the envelope cannot work (plaintext without
    /// `allow_insecure`, unreadable CA file, invalid address); permanent.
    #[error("SMTP configuration: {0}")]
    Config(String),
}

impl Classify for SmtpError {
    fn disposition(&self) -> Disposition {
        match self {
            SmtpError::Deferred { .. }
            | SmtpError::Network(_)
            | SmtpError::Timeout(_)
            | SmtpError::AuthRetry(_) => Disposition::Transient,
            SmtpError::Rejected { .. }
            | SmtpError::Tls(_)
            | SmtpError::Auth(_)
            | SmtpError::Config(_) => Disposition::Permanent,
        }
    }
}

impl SmtpError {
    /// What to show as the reason of a failed or deferred email: the
    /// server's reply (`550 5.1.1 <x@example.com>: user unknown`) where
    /// there is one, else what went wrong.
    pub fn server_text(&self) -> String {
        match self {
            SmtpError::Rejected { code, text } | SmtpError::Deferred { code, text } => {
                format!("{code} {text}")
            }
            other => other.to_string(),
        }
    }
}

/// A pooled SMTP client for one profile; clones share the pool.
#[derive(Clone)]
pub struct SmtpClient {
    shared: Arc<Shared>,
}

struct Shared {
    target: SmtpTarget,
    tls: Tls,
    current: tokio::sync::Mutex<Option<Pooled>>,
    generations: AtomicU64,
    /// lettre's pool size only caps the idle connections it keeps; this caps
    /// the transactions (and so the connections) running at once.
    permits: tokio::sync::Semaphore,
}

/// The live transport and the token it authenticates with.
struct Pooled {
    transport: Transport,
    token: Option<Secret>,
    generation: u64,
}

impl std::fmt::Debug for SmtpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ep = &self.shared.target.endpoint;
        f.debug_struct("SmtpClient")
            .field("host", &ep.host)
            .field("port", &ep.port)
            .field("tls", &ep.tls)
            .finish()
    }
}

impl SmtpClient {
    /// Checks the target (TLS policy, CA file) and prepares the pool; does
    /// not connect.
    pub fn new(target: SmtpTarget) -> Result<Self, SmtpError> {
        let ep = &target.endpoint;
        if ep.host.trim().is_empty() {
            return Err(SmtpError::Config("no SMTP host".into()));
        }
        let tls = match ep.tls {
            TlsMode::Plain if !target.allow_insecure => {
                return Err(SmtpError::Config(format!(
                    "plaintext SMTP to {}:{} would send the password and the mail unencrypted: use smtp_tls = \"starttls\" or \"implicit\", or set allow_insecure = true",
                    ep.host, ep.port
                )))
            }
            TlsMode::Plain => Tls::None,
            TlsMode::StartTls => Tls::Required(tls_parameters(ep)?),
            TlsMode::Implicit => Tls::Wrapper(tls_parameters(ep)?),
        };
        let pool_size = target.pool_size.max(1);
        Ok(SmtpClient {
            shared: Arc::new(Shared {
                target,
                tls,
                current: tokio::sync::Mutex::new(None),
                generations: AtomicU64::new(0),
                permits: tokio::sync::Semaphore::new(pool_size as usize),
            }),
        })
    }

    /// Submits `message` (exact bytes, CRLF line ends) for `recipients`.
    pub async fn send(
        &self,
        envelope_from: &str,
        recipients: &[String],
        message: &[u8],
    ) -> Result<SmtpReply, SmtpError> {
        let envelope = envelope(envelope_from, recipients)?;
        // Never closed, so acquiring cannot fail; waiting here is not server time.
        let _permit = self
            .shared
            .permits
            .acquire()
            .await
            .map_err(|e| SmtpError::Config(e.to_string()))?;
        let login = self.login().await?;
        let (transport, generation) = self.transport(login).await;
        let limit = self.deadline(recipients.len(), message.len());
        // lettre ends DATA with CRLF.CRLF whatever the message ends with; the
        // message's own last CRLF is that first CRLF (RFC 5321 §4.1.1.4), so
        // the server stores exactly our bytes instead of an extra empty line.
        let body = message.strip_suffix(b"\r\n").unwrap_or(message);
        match tokio::time::timeout(limit, transport.send_raw(&envelope, body)).await {
            Ok(Ok(response)) => {
                // lettre parks the connection from a spawned task; letting it
                // run first means the caller's next send finds it in the pool.
                tokio::task::yield_now().await;
                let reply = SmtpReply {
                    code: u16::from(response.code()),
                    text: truncate(&response.message().collect::<Vec<_>>().join(" ")),
                };
                tracing::debug!(
                    host = %self.shared.target.endpoint.host,
                    code = reply.code,
                    recipients = recipients.len(),
                    "SMTP accepted"
                );
                Ok(reply)
            }
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => {
                self.discard(generation, transport).await;
                Err(self.timed_out(limit))
            }
        }
    }

    /// Connects, says EHLO, authenticates and quits: Test & Enable of the
    /// outgoing side. Uses its own connection, not the pool's.
    pub async fn test_connection(&self) -> Result<(), SmtpError> {
        let login = self.login().await?;
        // A pool of size 0 closes (QUIT) the connection as soon as it is handed back.
        let transport = self.build(login.credentials, login.mechanisms, 0);
        let limit = self.deadline(0, 0);
        let result = tokio::time::timeout(limit, transport.test_connection()).await;
        match result {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(SmtpError::Network(format!(
                "{} accepted the login but did not answer NOOP",
                self.shared.target.endpoint.host
            ))),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => {
                let io = self.shared.target.endpoint.io_timeout;
                let _ = tokio::time::timeout(io, transport.shutdown()).await;
                Err(self.timed_out(limit))
            }
        }
    }

    /// Credentials for this attempt (a fresh token where there is a provider).
    async fn login(&self) -> Result<Login, SmtpError> {
        let target = &self.shared.target;
        match (&target.credentials, &target.token_provider) {
            (Credentials::Password { user, pass }, _) => Ok(Login {
                credentials: SmtpCredentials::new(user.clone(), pass.clone()),
                mechanisms: vec![Mechanism::Plain, Mechanism::Login],
                token: None,
            }),
            (Credentials::OAuth2 { user, token }, None) => Ok(Login {
                credentials: SmtpCredentials::new(user.clone(), token.clone()),
                mechanisms: vec![Mechanism::Xoauth2],
                token: Some(Secret::new(token.clone())),
            }),
            (Credentials::OAuth2 { user, .. }, Some(provider)) => {
                // No token right now (a file being rewritten) is worth a retry.
                let token = provider
                    .token()
                    .await
                    .map_err(|e| SmtpError::AuthRetry(e.to_string()))?;
                Ok(Login {
                    credentials: SmtpCredentials::new(
                        user.clone(),
                        token.token.expose().to_string(),
                    ),
                    mechanisms: vec![Mechanism::Xoauth2],
                    token: Some(token.token),
                })
            }
        }
    }

    /// The pooled transport for `login`, rebuilt when the token changed.
    async fn transport(&self, login: Login) -> (Transport, u64) {
        let mut current = self.shared.current.lock().await;
        if let Some(p) = current.as_ref() {
            if p.token == login.token {
                return (p.transport.clone(), p.generation);
            }
        }
        let size = self.shared.target.pool_size.max(1);
        let transport = self.build(login.credentials, login.mechanisms, size);
        let generation = self.shared.generations.fetch_add(1, Ordering::Relaxed);
        // The old pool, if any, closes its idle connections when dropped.
        *current = Some(Pooled {
            transport: transport.clone(),
            token: login.token,
            generation,
        });
        (transport, generation)
    }

    fn build(
        &self,
        credentials: SmtpCredentials,
        mechanisms: Vec<Mechanism>,
        pool_size: u32,
    ) -> Transport {
        let target = &self.shared.target;
        let ep = &target.endpoint;
        let hello = match &target.hello_name {
            Some(name) => ClientId::Domain(name.clone()),
            None => ClientId::default(),
        };
        // `builder_dangerous` only means "no TLS chosen yet": ours is set next.
        Transport::builder_dangerous(ep.host.clone())
            .port(ep.port)
            .tls(self.shared.tls.clone())
            .timeout(Some(ep.connect_timeout))
            .hello_name(hello)
            .credentials(credentials)
            .authentication(mechanisms)
            .pool_config(PoolConfig::new().max_size(pool_size))
            .build()
    }

    /// Drops the pool a timed-out transaction used: its connection may be
    /// anywhere in the dialogue and must never carry another message.
    async fn discard(&self, generation: u64, transport: Transport) {
        {
            let mut current = self.shared.current.lock().await;
            if current.as_ref().is_some_and(|p| p.generation == generation) {
                *current = None;
            }
        }
        // Shut down before lettre's recycle task parks the connection, so
        // it is closed instead of handed to the next send.
        let io = self.shared.target.endpoint.io_timeout;
        let _ = tokio::time::timeout(io, transport.shutdown()).await;
    }

    /// One deadline for a whole transaction (see the module docs).
    fn deadline(&self, recipients: usize, len: usize) -> Duration {
        let ep = &self.shared.target.endpoint;
        let steps = ROUND_TRIPS
            .saturating_add(u32::try_from(recipients).unwrap_or(u32::MAX))
            .saturating_add(u32::try_from(len / BYTES_PER_STEP).unwrap_or(u32::MAX));
        ep.connect_timeout
            .saturating_mul(2)
            .saturating_add(ep.io_timeout.saturating_mul(steps))
    }

    fn timed_out(&self, limit: Duration) -> SmtpError {
        let ep = &self.shared.target.endpoint;
        SmtpError::Timeout(format!(
            "{}:{} did not complete the SMTP transaction within {}s",
            ep.host,
            ep.port,
            limit.as_secs()
        ))
    }

    /// Sorts a lettre error into ours.
    fn classify(&self, e: &lettre::transport::smtp::Error) -> SmtpError {
        let target = &self.shared.target;
        let ep = &target.endpoint;
        let detail = truncate(&source_text(e));
        if let Some(code) = e.status() {
            let code = u16::from(code);
            if AUTH_CODES.contains(&code) {
                return self.auth_failure(format!("{code} {detail}"));
            }
            return if code >= 500 {
                SmtpError::Rejected { code, text: detail }
            } else {
                SmtpError::Deferred { code, text: detail }
            };
        }
        let server = server_name(ep);
        if let Some(tls) = rustls_error(e) {
            return match tls {
                rustls::Error::InvalidCertificate(cert) => {
                    SmtpError::Tls(crate::net::certificate_problem(cert, &server))
                }
                rustls::Error::NoCertificatesPresented => {
                    SmtpError::Tls(format!("{server} presented no certificate"))
                }
                // Alerts and garbled records: usually the network, worth a retry.
                other => SmtpError::Network(format!("TLS handshake with {server} failed: {other}")),
            };
        }
        if e.is_timeout() {
            return SmtpError::Timeout(format!("{}:{}: {}", ep.host, ep.port, e));
        }
        if e.is_tls() {
            return SmtpError::Tls(e.to_string());
        }
        if e.is_client() {
            if detail.contains("STARTTLS") {
                return SmtpError::Tls(format!(
                    "{} does not offer STARTTLS; refusing to send without TLS",
                    ep.host
                ));
            }
            if detail.contains("authentication mechanism") {
                let offered = match target.credentials {
                    Credentials::Password { .. } => "PLAIN or LOGIN",
                    Credentials::OAuth2 { .. } => "XOAUTH2",
                };
                return SmtpError::Auth(format!(
                    "{} does not offer {offered} authentication",
                    ep.host
                ));
            }
            return SmtpError::Config(truncate(&e.to_string()));
        }
        SmtpError::Network(format!(
            "{}:{}: {}",
            ep.host,
            ep.port,
            truncate(&e.to_string())
        ))
    }

    /// A refused login: permanent, unless the token comes from a source
    /// that rotates (a fresh token may be there on the next attempt).
    fn auth_failure(&self, reply: String) -> SmtpError {
        match &self.shared.target.token_provider {
            Some(p) if matches!(self.shared.target.credentials, Credentials::OAuth2 { .. }) => {
                let text = format!(
                    "the server rejected the OAuth access token from {} ({reply})",
                    p.describe()
                );
                if p.rotates() {
                    SmtpError::AuthRetry(format!(
                        "{text}: write a fresh token there, it is read again on the next attempt"
                    ))
                } else {
                    SmtpError::Auth(text)
                }
            }
            _ => SmtpError::Auth(reply),
        }
    }
}

/// Credentials of one attempt.
struct Login {
    credentials: SmtpCredentials,
    mechanisms: Vec<Mechanism>,
    /// The token, to notice a rotation (None for passwords).
    token: Option<Secret>,
}

/// The name the certificate must carry.
fn server_name(ep: &Endpoint) -> String {
    ep.tls_server_name
        .clone()
        .unwrap_or_else(|| ep.host.clone())
}

/// lettre's TLS parameters: verification on, the system roots plus `ca_file`.
fn tls_parameters(ep: &Endpoint) -> Result<TlsParameters, SmtpError> {
    // Same checks and messages for the CA file as the IMAP side.
    crate::net::client_config(ep.ca_file.as_deref())
        .map_err(|e| SmtpError::Config(e.to_string()))?;
    let mut builder =
        TlsParameters::builder(server_name(ep)).certificate_store(CertificateStore::None);
    let mut usable = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // lettre fails the whole build on one unusable root; skip those
        // as net.rs does, so one broken system certificate cannot stop mail.
        if usable.add(cert.clone()).is_ok() {
            if let Ok(c) = Certificate::from_der(cert.to_vec()) {
                builder = builder.add_root_certificate(c);
            }
        }
    }
    if let Some(path) = &ep.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            SmtpError::Config(format!("cannot load CA file {}: {e}", path.display()))
        })?;
        let cert = Certificate::from_pem(&pem).map_err(|e| {
            SmtpError::Config(format!("cannot load CA file {}: {e}", path.display()))
        })?;
        builder = builder.add_root_certificate(cert);
    }
    builder
        .build_rustls()
        .map_err(|e| SmtpError::Config(format!("TLS setup failed: {e}")))
}

fn envelope(from: &str, recipients: &[String]) -> Result<Envelope, SmtpError> {
    let parse = |role: &str, a: &str| {
        a.trim()
            .parse::<Address>()
            .map_err(|e| SmtpError::Config(format!("invalid envelope {role} {a:?}: {e}")))
    };
    let sender = parse("sender", from)?;
    let to = recipients
        .iter()
        .map(|r| parse("recipient", r))
        .collect::<Result<Vec<_>, _>>()?;
    if to.is_empty() {
        return Err(SmtpError::Config("no recipient".into()));
    }
    Envelope::new(Some(sender), to).map_err(|e| SmtpError::Config(e.to_string()))
}

/// The server text lettre keeps as the error's source (`5.1.1 user unknown`).
fn source_text(e: &lettre::transport::smtp::Error) -> String {
    std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// The rustls error behind a failed handshake, if that is what it was.
fn rustls_error(e: &lettre::transport::smtp::Error) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            // io::Error's `source()` skips its payload: look at it directly.
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(tls);
            }
        }
        cur = err.source();
    }
    None
}

fn truncate(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_TEXT {
        return s.to_string();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
#[path = "../../tests/support/smtp_stub.rs"]
mod smtp_stub;

#[cfg(test)]
mod tests {
    use super::smtp_stub::{Action, Script, SmtpStub, Stage};
    use super::*;

    fn endpoint(port: u16, tls: TlsMode) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
            tls,
            tls_server_name: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
        }
    }

    fn target(port: u16) -> SmtpTarget {
        SmtpTarget {
            endpoint: endpoint(port, TlsMode::Plain),
            allow_insecure: true,
            credentials: Credentials::Password {
                user: "alice".into(),
                pass: "hunter2".into(),
            },
            token_provider: None,
            pool_size: 2,
            hello_name: Some("client.test".into()),
        }
    }

    const MSG: &[u8] =
        b"From: a@example.test\r\nTo: b@example.test\r\nSubject: t\r\n\r\nHi\r\n.dot line\r\n";

    async fn send_to(stub: &SmtpStub) -> Result<SmtpReply, SmtpError> {
        let client = SmtpClient::new(target(stub.port)).unwrap();
        client
            .send("a@example.test", &["b@example.test".into()], MSG)
            .await
    }

    #[test]
    fn replies_and_failures_are_classified() {
        use Disposition::*;
        let cases = [
            (
                SmtpError::Rejected {
                    code: 550,
                    text: "no".into(),
                },
                Permanent,
            ),
            (
                SmtpError::Deferred {
                    code: 451,
                    text: "later".into(),
                },
                Transient,
            ),
            (SmtpError::Network("x".into()), Transient),
            (SmtpError::Timeout("x".into()), Transient),
            (SmtpError::Tls("x".into()), Permanent),
            (SmtpError::Auth("x".into()), Permanent),
            (SmtpError::AuthRetry("x".into()), Transient),
            (SmtpError::Config("x".into()), Permanent),
        ];
        for (e, want) in cases {
            assert_eq!(e.disposition(), want, "{e}");
        }
        let e = SmtpError::Rejected {
            code: 550,
            text: "5.1.1 user unknown".into(),
        };
        assert_eq!(e.server_text(), "550 5.1.1 user unknown");
        assert_eq!(
            SmtpError::Network("down".into()).server_text(),
            "SMTP connection failed: down"
        );
    }

    #[test]
    fn tls_mode_selection() {
        // Plaintext needs allow_insecure; the TLS modes build with the system roots.
        let mut t = target(25);
        t.allow_insecure = false;
        let e = SmtpClient::new(t.clone()).unwrap_err();
        assert!(
            matches!(e, SmtpError::Config(_)) && e.to_string().contains("allow_insecure"),
            "{e}"
        );
        assert_eq!(e.disposition(), Disposition::Permanent);
        for mode in [TlsMode::StartTls, TlsMode::Implicit] {
            t.endpoint.tls = mode;
            let c = SmtpClient::new(t.clone()).unwrap();
            assert!(matches!(
                (&c.shared.tls, mode),
                (Tls::Required(_), TlsMode::StartTls) | (Tls::Wrapper(_), TlsMode::Implicit)
            ));
        }
        t.endpoint.tls = TlsMode::Plain;
        t.allow_insecure = true;
        assert!(matches!(
            SmtpClient::new(t.clone()).unwrap().shared.tls,
            Tls::None
        ));
        // A CA file that is not there is a configuration error, not a send failure.
        t.endpoint.tls = TlsMode::Implicit;
        t.endpoint.ca_file = Some("/nonexistent/ca.pem".into());
        let e = SmtpClient::new(t).unwrap_err();
        assert!(
            matches!(e, SmtpError::Config(_)) && e.to_string().contains("ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn deadline_grows_with_recipients_and_size() {
        let c = SmtpClient::new(target(25)).unwrap();
        let base = c.deadline(1, 10);
        assert_eq!(base, Duration::from_secs(5 * 2 + 5 * 11));
        assert!(c.deadline(10, 10) > base);
        assert!(c.deadline(1, 50 << 20) > c.deadline(1, 10));
    }

    #[tokio::test]
    async fn accepted_message_reports_the_reply_and_reuses_the_pool() {
        let stub = SmtpStub::start(Script::default()).await;
        let client = SmtpClient::new(target(stub.port)).unwrap();
        let to = vec!["b@example.test".to_string(), "c@example.test".to_string()];
        let reply = client.send("a@example.test", &to, MSG).await.unwrap();
        assert_eq!(reply.code, 250);
        assert!(reply.text.contains("queued as STUB1"), "{reply:?}");
        let reply = client.send("a@example.test", &to, MSG).await.unwrap();
        assert!(reply.text.contains("STUB2"), "{reply:?}");
        assert_eq!(stub.connections(), 1, "the pooled connection is reused");
        assert_eq!(
            stub.messages()[0],
            MSG,
            "exact bytes, dot-stuffing undone by the server"
        );
        let cmds = stub.commands();
        assert!(
            cmds.iter().any(|c| c.starts_with("AUTH PLAIN ")),
            "{cmds:?}"
        );
        assert!(cmds.iter().any(|c| c == "EHLO client.test"), "{cmds:?}");
        assert_eq!(cmds.iter().filter(|c| c.starts_with("RCPT TO:")).count(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_sends_stay_within_the_pool_size() {
        let stub = SmtpStub::start(Script::default()).await;
        let client = SmtpClient::new(target(stub.port)).unwrap();
        let sends = (0..24).map(|_| {
            let c = client.clone();
            tokio::spawn(async move {
                c.send("a@example.test", &["b@example.test".into()], MSG)
                    .await
            })
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap().unwrap();
        }
        assert_eq!(stub.messages().len(), 24);
        // Two transactions at a time; a third connection can be opening while
        // lettre's recycle task still parks a finished one (then it is closed).
        assert!(
            stub.max_open() <= 3,
            "{} connections at once",
            stub.max_open()
        );
    }

    #[tokio::test]
    async fn rejection_at_rcpt_is_permanent_with_the_server_text() {
        let stub = SmtpStub::start(Script::reply(
            Stage::Rcpt,
            550,
            "5.1.1 <b@example.test>: Recipient address rejected",
        ))
        .await;
        let e = send_to(&stub).await.unwrap_err();
        assert_eq!(
            e,
            SmtpError::Rejected {
                code: 550,
                text: "5.1.1 <b@example.test>: Recipient address rejected".into()
            }
        );
        assert_eq!(e.disposition(), Disposition::Permanent);
        assert!(stub.messages().is_empty());
        assert!(!stub.commands().iter().any(|c| c == "DATA"));
    }

    #[tokio::test]
    async fn deferral_at_data_is_transient_with_the_server_text() {
        let stub = SmtpStub::start(Script::reply(Stage::Data, 451, "4.3.0 Try again later")).await;
        let e = send_to(&stub).await.unwrap_err();
        assert_eq!(
            e,
            SmtpError::Deferred {
                code: 451,
                text: "4.3.0 Try again later".into()
            }
        );
        assert_eq!(e.disposition(), Disposition::Transient);
        assert_eq!(e.server_text(), "451 4.3.0 Try again later");
    }

    #[tokio::test]
    async fn rejection_after_the_body_is_permanent() {
        let stub = SmtpStub::start(Script::reply(
            Stage::Dot,
            554,
            "5.7.1 Message refused as spam",
        ))
        .await;
        let e = send_to(&stub).await.unwrap_err();
        assert!(
            matches!(&e, SmtpError::Rejected { code: 554, text } if text.contains("spam")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn dropped_connection_is_transient() {
        for stage in [Stage::Greeting, Stage::Mail, Stage::Dot] {
            let stub = SmtpStub::start(Script::fault(stage, Action::Drop)).await;
            let e = send_to(&stub).await.unwrap_err();
            assert!(matches!(e, SmtpError::Network(_)), "{stage:?}: {e:?}");
            assert_eq!(e.disposition(), Disposition::Transient);
        }
        // Nobody listening at all.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client = SmtpClient::new(target(port)).unwrap();
        let e = client
            .send("a@example.test", &["b@example.test".into()], MSG)
            .await
            .unwrap_err();
        assert_eq!(e.disposition(), Disposition::Transient, "{e:?}");
    }

    #[tokio::test]
    async fn silent_server_times_out_and_the_pool_is_dropped() {
        let stub = SmtpStub::start(Script::fault(Stage::Dot, Action::Hang)).await;
        let mut t = target(stub.port);
        t.endpoint.io_timeout = Duration::from_millis(100);
        t.endpoint.connect_timeout = Duration::from_millis(100);
        let client = SmtpClient::new(t).unwrap();
        let started = std::time::Instant::now();
        let e = client
            .send("a@example.test", &["b@example.test".into()], MSG)
            .await
            .unwrap_err();
        assert!(matches!(e, SmtpError::Timeout(_)), "{e:?}");
        assert_eq!(e.disposition(), Disposition::Transient);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            client.shared.current.lock().await.is_none(),
            "the timed-out pool is gone"
        );
        // The next attempt opens a new connection instead of reusing the stuck one.
        let _ = client
            .send("a@example.test", &["b@example.test".into()], MSG)
            .await;
        assert_eq!(stub.connections(), 2);
    }

    #[tokio::test]
    async fn refused_login_is_permanent_unless_the_token_rotates() {
        let stub = SmtpStub::start(Script::reply(
            Stage::Auth,
            535,
            "5.7.8 Authentication credentials invalid",
        ))
        .await;
        let e = send_to(&stub).await.unwrap_err();
        assert!(
            matches!(&e, SmtpError::Auth(t) if t.contains("535 5.7.8")),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Permanent);
        assert!(!e.to_string().contains("hunter2"));
        assert!(!stub.commands().iter().any(|c| c.starts_with("MAIL")));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "tok-one\n").unwrap();
        let mut t = target(stub.port);
        t.credentials = Credentials::OAuth2 {
            user: "alice".into(),
            token: String::new(),
        };
        t.token_provider = Some(Arc::new(crate::connector::oauth::TokenFile::new(
            &file, None,
        )));
        let client = SmtpClient::new(t).unwrap();
        let e = client
            .send("a@example.test", &["b@example.test".into()], MSG)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SmtpError::AuthRetry(t) if t.contains("token file")),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Transient);
        assert!(!e.to_string().contains("tok-one"));
        // No token at all right now: also worth a retry.
        std::fs::remove_file(&file).unwrap();
        let e = client
            .send("a@example.test", &["b@example.test".into()], MSG)
            .await
            .unwrap_err();
        assert!(matches!(e, SmtpError::AuthRetry(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_rotated_token_gets_a_new_connection() {
        use base64::Engine as _;
        let stub = SmtpStub::start(Script::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "tok-one\n").unwrap();
        let mut t = target(stub.port);
        t.credentials = Credentials::OAuth2 {
            user: "alice".into(),
            token: String::new(),
        };
        t.token_provider = Some(Arc::new(crate::connector::oauth::TokenFile::new(
            &file, None,
        )));
        let client = SmtpClient::new(t).unwrap();
        let to = ["b@example.test".to_string()];
        client.send("a@example.test", &to, MSG).await.unwrap();
        client.send("a@example.test", &to, MSG).await.unwrap();
        assert_eq!(stub.connections(), 1);
        std::fs::write(&file, "tok-two\n").unwrap();
        client.send("a@example.test", &to, MSG).await.unwrap();
        assert_eq!(stub.connections(), 2, "a changed token means a new login");
        let logins: Vec<String> = stub
            .commands()
            .iter()
            .filter_map(|c| c.strip_prefix("AUTH XOAUTH2 "))
            .map(|b| {
                let raw = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
                String::from_utf8(raw).unwrap()
            })
            .collect();
        assert_eq!(
            logins,
            vec![
                "user=alice\x01auth=Bearer tok-one\x01\x01".to_string(),
                "user=alice\x01auth=Bearer tok-two\x01\x01".to_string()
            ]
        );
    }

    #[tokio::test]
    async fn required_starttls_is_never_skipped() {
        for offer in [false, true] {
            let stub = SmtpStub::start(Script {
                offer_starttls: offer,
                ..Script::default()
            })
            .await;
            let mut t = target(stub.port);
            t.endpoint.tls = TlsMode::StartTls;
            t.allow_insecure = false;
            let client = SmtpClient::new(t).unwrap();
            let e = client
                .send("a@example.test", &["b@example.test".into()], MSG)
                .await
                .unwrap_err();
            if offer {
                // The stub answers STARTTLS with 454.
                assert!(matches!(e, SmtpError::Deferred { code: 454, .. }), "{e:?}");
            } else {
                assert!(
                    matches!(&e, SmtpError::Tls(t) if t.contains("STARTTLS")),
                    "{e:?}"
                );
                assert_eq!(e.disposition(), Disposition::Permanent);
            }
            let cmds = stub.commands();
            assert!(
                !cmds
                    .iter()
                    .any(|c| c.starts_with("AUTH") || c.starts_with("MAIL")),
                "{cmds:?}"
            );
        }
    }

    #[tokio::test]
    async fn implicit_tls_to_a_plaintext_server_fails_without_sending() {
        let stub = SmtpStub::start(Script::default()).await;
        let mut t = target(stub.port);
        t.endpoint.tls = TlsMode::Implicit;
        t.endpoint.io_timeout = Duration::from_millis(500);
        let client = SmtpClient::new(t).unwrap();
        let e = client
            .send("a@example.test", &["b@example.test".into()], MSG)
            .await
            .unwrap_err();
        assert!(
            matches!(e, SmtpError::Network(_) | SmtpError::Timeout(_)),
            "{e:?}"
        );
        assert!(stub.commands().is_empty());
    }

    #[tokio::test]
    async fn no_usable_auth_mechanism_is_permanent() {
        let stub = SmtpStub::start(Script {
            no_auth: true,
            ..Script::default()
        })
        .await;
        let e = send_to(&stub).await.unwrap_err();
        assert!(
            matches!(&e, SmtpError::Auth(t) if t.contains("PLAIN or LOGIN")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn invalid_envelope_is_a_permanent_error_before_connecting() {
        let stub = SmtpStub::start(Script::default()).await;
        let client = SmtpClient::new(target(stub.port)).unwrap();
        for (from, to) in [
            ("not an address", "b@example.test"),
            ("a@example.test", "b@"),
        ] {
            let e = client.send(from, &[to.to_string()], MSG).await.unwrap_err();
            assert!(matches!(e, SmtpError::Config(_)), "{e:?}");
        }
        let e = client.send("a@example.test", &[], MSG).await.unwrap_err();
        assert!(matches!(e, SmtpError::Config(_)), "{e:?}");
        assert_eq!(stub.connections(), 0);
    }

    #[tokio::test]
    async fn test_connection_logs_in_and_quits() {
        let stub = SmtpStub::start(Script::default()).await;
        let client = SmtpClient::new(target(stub.port)).unwrap();
        client.test_connection().await.unwrap();
        // The QUIT is sent by lettre's recycle task.
        for _ in 0..50 {
            if stub.commands().iter().any(|c| c == "QUIT") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cmds = stub.commands();
        assert!(cmds.iter().any(|c| c.starts_with("AUTH PLAIN")), "{cmds:?}");
        assert!(cmds.iter().any(|c| c == "QUIT"), "{cmds:?}");
        let stub = SmtpStub::start(Script::reply(Stage::Auth, 535, "5.7.8 nope")).await;
        let client = SmtpClient::new(target(stub.port)).unwrap();
        let e = client.test_connection().await.unwrap_err();
        assert!(matches!(e, SmtpError::Auth(_)), "{e:?}");
    }
}
