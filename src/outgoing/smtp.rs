//! SMTP submission: lettre's SMTP dialogue ([`AsyncSmtpConnection`]) over
//! our own connections (`net`: TCP_NODELAY, read/write time-outs, rustls
//! with the ring provider), a small pool of logged-in connections per
//! mailbox, and failures sorted into [`SmtpError`] (5xx permanent, 4xx and
//! network transient).
//!
//! * TLS: implicit (465, our handshake before the greeting) or STARTTLS
//!   (587, lettre's upgrade; required: never a silent fall back to
//!   plaintext); plaintext only when the target says `allow_insecure`.
//!   Certificates are always verified against the system roots plus the
//!   profile's `ca_file`, under `tls_server_name` when set. Only the ring
//!   provider is linked, so no aws-lc-rs.
//! * Why not lettre's own pool: it connects without TCP_NODELAY and writes
//!   the message and the final `.` separately, so every message waited
//!   ~40 ms for the server's delayed ACK before the final dot left — a
//!   window in which a crash left a delivered email looking undelivered
//!   (and a cap of ~25 messages a second per connection).
//! * AUTH: a password offers PLAIN and LOGIN, an OAuth token XOAUTH2. The
//!   token comes from the provider before every send; an idle connection
//!   logged in with an older token is closed, not reused.
//! * Time-outs: every transaction runs under one deadline sized like the
//!   per-step `io_timeout`s (the streams also time out each read and
//!   write). A transaction cut off by it is dropped with its connection,
//!   which never carries another message; an idle connection is checked
//!   with NOOP before reuse once it idled a while.
//! * Secrets: nothing here logs; lettre's own wire tracing (with AUTH lines)
//!   is dropped by our subscriber (telemetry.rs).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials as SmtpCredentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, CertificateStore, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use lettre::Address;
use tokio_rustls::rustls;

use crate::config::Secret;
use crate::connector::oauth::TokenProvider;
use crate::connector::Credentials;
use crate::error::{Classify, Disposition};
use crate::net::{Endpoint, MaybeTls, NetError, TlsMode};

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
    /// STARTTLS parameters (lettre upgrades the stream); implicit TLS is
    /// set up by `net` before the greeting.
    starttls: Option<TlsParameters>,
    /// Idle connections, most recently used last.
    idle: std::sync::Mutex<Vec<Idle>>,
    /// Caps the transactions (and so the connections) running at once.
    permits: tokio::sync::Semaphore,
}

/// A logged-in connection waiting for the next message.
struct Idle {
    conn: AsyncSmtpConnection,
    /// The token it logged in with (a rotated token retires it).
    token: Option<Secret>,
    since: std::time::Instant,
}

/// An idle connection older than this is checked with NOOP before reuse:
/// servers close idle sessions, and a message must never start on a
/// connection that is already gone.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(10);

/// The stream lettre drives: ours from `net` (TCP_NODELAY, read/write
/// time-outs, rustls with the ring provider). lettre's own connect leaves
/// Nagle on, and it writes the message and the final `.` separately: the
/// final dot then waited for the server's delayed ACK (~40 ms per message,
/// a window in which a crash left a delivered email looking undelivered).
#[derive(Debug)]
struct SmtpStream(MaybeTls);

impl tokio::io::AsyncRead for SmtpStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SmtpStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for SmtpStream {
    fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match &self.0 {
            MaybeTls::Plain(s) => s.as_ref().get_ref().get_ref().peer_addr(),
            MaybeTls::Tls(s) => s.get_ref().0.as_ref().get_ref().get_ref().peer_addr(),
        }
    }
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
        let starttls = match ep.tls {
            TlsMode::Plain if !target.allow_insecure => {
                return Err(SmtpError::Config(format!(
                    "plaintext SMTP to {}:{} would send the password and the mail unencrypted: use smtp_tls = \"starttls\" or \"implicit\", or set allow_insecure = true",
                    ep.host, ep.port
                )))
            }
            TlsMode::Plain => None,
            TlsMode::StartTls => Some(tls_parameters(ep)?),
            TlsMode::Implicit => {
                // Checked now (CA file, server name) so a bad one is a
                // config error before the first message.
                tls_parameters(ep)?;
                None
            }
        };
        let pool_size = target.pool_size.max(1);
        Ok(SmtpClient {
            shared: Arc::new(Shared {
                target,
                starttls,
                idle: std::sync::Mutex::new(Vec::new()),
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
        let limit = self.deadline(recipients.len(), message.len());
        // lettre ends DATA with CRLF.CRLF whatever the message ends with; the
        // message's own last CRLF is that first CRLF (RFC 5321 §4.1.1.4), so
        // the server stores exactly our bytes instead of an extra empty line.
        let body = message.strip_suffix(b"\r\n").unwrap_or(message);
        let transaction = async {
            let mut conn = self.checkout(&login).await?;
            match conn.send(&envelope, body).await {
                Ok(response) => {
                    self.checkin(conn, login.token.clone());
                    Ok(response)
                }
                Err(e) => {
                    // Wherever in the dialogue it failed, this connection
                    // never carries another message.
                    conn.abort().await;
                    Err(self.classify(&e))
                }
            }
        };
        // A time-out drops the transaction and with it its connection.
        match tokio::time::timeout(limit, transaction).await {
            Ok(Ok(response)) => {
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
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.timed_out(limit)),
        }
    }

    /// Connects, says EHLO, authenticates and quits: Test & Enable of the
    /// outgoing side. Uses its own connection, not the pool's.
    pub async fn test_connection(&self) -> Result<(), SmtpError> {
        let login = self.login().await?;
        let limit = self.deadline(0, 0);
        let test = async {
            let mut conn = self.connect(&login).await?;
            let alive = conn.test_connected().await;
            let _ = conn.quit().await;
            if alive {
                Ok(())
            } else {
                Err(SmtpError::Network(format!(
                    "{} accepted the login but did not answer NOOP",
                    self.shared.target.endpoint.host
                )))
            }
        };
        match tokio::time::timeout(limit, test).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out(limit)),
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

    /// An idle connection logged in with `login`'s token (checked with
    /// NOOP when it idled a while), else a new one.
    async fn checkout(&self, login: &Login) -> Result<AsyncSmtpConnection, SmtpError> {
        loop {
            let next = self
                .shared
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            let Some(mut idle) = next else {
                return self.connect(login).await;
            };
            if idle.token != login.token || idle.conn.has_broken() {
                let _ = idle.conn.quit().await;
                continue;
            }
            if idle.since.elapsed() >= CHECK_IDLE_AFTER && !idle.conn.test_connected().await {
                idle.conn.abort().await;
                continue;
            }
            return Ok(idle.conn);
        }
    }

    /// Hands a connection back after a successful transaction.
    fn checkin(&self, conn: AsyncSmtpConnection, token: Option<Secret>) {
        let mut idle = self
            .shared
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.shared.target.pool_size.max(1) as usize && !conn.has_broken() {
            idle.push(Idle {
                conn,
                token,
                since: std::time::Instant::now(),
            });
        }
    }

    /// Connects (TLS as configured), says EHLO and logs in.
    async fn connect(&self, login: &Login) -> Result<AsyncSmtpConnection, SmtpError> {
        let target = &self.shared.target;
        let ep = &target.endpoint;
        let hello = match &target.hello_name {
            Some(name) => ClientId::Domain(name.clone()),
            None => ClientId::default(),
        };
        let stream = crate::net::connect(ep)
            .await
            .map_err(|e| self.net_error(e))?;
        let mut conn =
            AsyncSmtpConnection::connect_with_transport(Box::new(SmtpStream(stream)), &hello)
                .await
                .map_err(|e| self.classify(&e))?;
        if let Some(params) = &self.shared.starttls {
            if !conn.can_starttls() {
                conn.abort().await;
                return Err(SmtpError::Tls(format!(
                    "{} does not offer STARTTLS; refusing to send without TLS",
                    ep.host
                )));
            }
            conn.starttls(params.clone(), &hello)
                .await
                .map_err(|e| self.classify(&e))?;
        }
        if let Err(e) = conn.auth(&login.mechanisms, &login.credentials).await {
            conn.abort().await;
            return Err(self.classify(&e));
        }
        Ok(conn)
    }

    /// Sorts a failure of our own connect (TCP, implicit TLS) into ours.
    fn net_error(&self, e: NetError) -> SmtpError {
        match e {
            NetError::Certificate { .. } | NetError::ServerName(_) => SmtpError::Tls(e.to_string()),
            NetError::CaFile { .. } | NetError::TlsSetup(_) => SmtpError::Config(e.to_string()),
            NetError::ConnectTimeout { .. } => SmtpError::Timeout(e.to_string()),
            NetError::Connect { .. } | NetError::Handshake { .. } => {
                SmtpError::Network(e.to_string())
            }
        }
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
pub(crate) mod smtp_stub;

#[cfg(test)]
mod tests;
