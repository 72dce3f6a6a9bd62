//! POP3 client: RFC 1939 (base protocol), RFC 2449 (CAPA, response codes),
//! RFC 2595 (STLS), RFC 5034 (SASL AUTH) with PLAIN and XOAUTH2.
//!
//! No maintained async POP3 crate exists, so this is a small client of our own on top
//! of [`crate::net`] (time-outs, TLS). Design points:
//!
//! * Responses are read through a [`BufReader`] with `read_until(b'\n')` capped by
//!   `take()`, so a large message costs a few big reads instead of one syscall per
//!   byte, and a hostile server cannot make us buffer unbounded lines.
//! * Message bodies are dot-unstuffed while reading; the bytes between the lines are
//!   kept exactly as the server sent them (CRLF, or bare LF from sloppy servers).
//! * A command whose response was not read to the end (I/O error, time-out, protocol
//!   violation, cancelled future) leaves the connection out of step with the server;
//!   every later command on it then fails fast with [`Pop3Error::Protocol`] instead of
//!   misreading the rest of the old response. Reconnect in that case
//!   ([`Pop3Error::connection_usable`] tells).
//! * Passwords and tokens never reach logs or error texts: commands carrying them are
//!   logged and reported by their verb only, and server texts are scrubbed of them.
//! * Dropping a client without [`Pop3Client::quit`] leaves the mailbox untouched: the
//!   server only commits `DELE`s when `QUIT` succeeds (RFC 1939 §6).

#![warn(missing_docs)]
// Everything here parses what a server sends: no slicing that can panic.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::fmt;
use std::io;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::error::{Classify, Disposition};
use crate::net::{self, Endpoint, MaybeTls, NetError, TlsMode};

/// Longest status line or listing line accepted (RFC 2449 allows 512 octets; we are lenient).
const MAX_LINE: usize = 8 * 1024;
/// Cap on a whole CAPA/LIST/UIDL listing: ~1M messages' worth of UIDL lines.
const MAX_LISTING_BYTES: usize = 128 * 1024 * 1024;
/// Bytes read per `read_until` while reading a message body; long lines come in pieces.
const BODY_CHUNK: u64 = 64 * 1024;
/// Socket read buffer: big enough that a large message needs few reads.
const READ_BUFFER: usize = 64 * 1024;
/// Cap on a `TOP` response (headers plus the requested lines).
const MAX_TOP_BYTES: u64 = 16 * 1024 * 1024;
/// A response still going after this many bytes is not drained any further: the
/// connection is given up instead (guards against a server streaming forever).
const MAX_DRAIN_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// RFC 5034 §4: an AUTH line with initial response must fit in 255 octets incl. CRLF,
/// otherwise the response goes in a continuation line.
const MAX_AUTH_LINE: usize = 255;
/// Longest server text quoted in an error.
const MAX_ERROR_TEXT: usize = 300;

/// A POP3 failure.
///
/// Disposition ([`Classify`]):
/// * `Net`: as [`NetError`] (certificate problems permanent, connect failures transient).
/// * `Io` (incl. read/write time-outs, `io::ErrorKind::TimedOut`), `Protocol`: transient.
/// * `Auth`: permanent, unless the server marks it temporary with an RFC 2449/3206
///   response code (`[SYS/TEMP]`, `[IN-USE]`, `[LOGIN-DELAY]`).
/// * `Server`: transient (a `-ERR` to a routine command is usually the server's own
///   trouble), permanent with `[SYS/PERM]` or `[AUTH]`.
/// * `NoStls`, `InvalidInput`: permanent (configuration must change).
/// * `TooLarge`: permanent *for that message only*: the connection stays usable and
///   the caller should skip the message, not disable the mailbox.
#[derive(Debug, thiserror::Error)]
pub enum Pop3Error {
    /// Connecting or the TLS handshake failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Reading or writing the socket failed, or timed out.
    #[error("POP3 connection error: {0}")]
    Io(#[from] io::Error),
    /// The server rejected the credentials (or the login attempt).
    #[error("POP3 authentication failed: {detail}")]
    Auth {
        /// The server's reply, without any secret.
        detail: String,
        /// RFC 2449 response code, upper-cased (`AUTH`, `SYS/TEMP`, `IN-USE`, ...).
        code: Option<String>,
    },
    /// The server's reply does not follow the protocol.
    #[error("POP3 protocol error: {0}")]
    Protocol(String),
    /// `TlsMode::StartTls` was asked for but the server does not offer STLS; we never
    /// fall back to plaintext.
    #[error("POP3 server offers no STLS (STARTTLS); refusing to continue without TLS")]
    NoStls,
    /// The message exceeds the size cap; its response was drained, the connection is usable.
    #[error("POP3 message {msgno} is {size} bytes, over the limit of {cap} bytes")]
    TooLarge {
        /// Message number.
        msgno: u32,
        /// Size after dot-unstuffing, as received.
        size: u64,
        /// The cap that was exceeded.
        cap: u64,
    },
    /// The server answered `-ERR` to a command.
    #[error("POP3 server rejected {command}: {message}")]
    Server {
        /// The command verb (and message number), never its secret arguments.
        command: String,
        /// The server's text, sanitised.
        message: String,
        /// RFC 2449 response code, upper-cased.
        code: Option<String>,
    },
    /// The caller passed something that cannot be sent (CR/LF in a user name, message 0).
    #[error("invalid POP3 request: {0}")]
    InvalidInput(String),
}

impl Pop3Error {
    /// Whether the connection can still be used for further commands after this error.
    pub fn connection_usable(&self) -> bool {
        // These all come after a response was read to its end (or before anything was sent).
        matches!(
            self,
            Pop3Error::Server { .. }
                | Pop3Error::Auth { .. }
                | Pop3Error::TooLarge { .. }
                | Pop3Error::InvalidInput(_)
        )
    }
}

/// Response codes after which retrying later may succeed (RFC 2449 §8.1, RFC 3206).
fn is_temporary_code(code: Option<&str>) -> bool {
    matches!(code, Some("SYS/TEMP" | "IN-USE" | "LOGIN-DELAY"))
}

/// Words of a refusal that will pass. POP3 has no code for "account
/// temporarily unavailable": Dovecot answers a `nologin` account (maintenance,
/// a mailbox rebuild; IMAP says `[CONTACTADMIN]` there) with `-ERR [AUTH]` and
/// the operator's reason text, the same code as a wrong password
/// ("Authentication failed."). Disabling the mailbox for a one-second
/// maintenance window is the "mailbox silently stopped" complaint, so a reason
/// that says it is temporary is retried; anything else under `[AUTH]` stays a
/// wrong credential.
const TEMPORARY_WORDS: &[&str] = &[
    "retry",
    "try again",
    "temporar",
    "in progress",
    "in-progress",
    "maintenance",
    "later",
    "contactadmin",
];

fn says_temporary(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    !d.contains("authentication failed") && TEMPORARY_WORDS.iter().any(|w| d.contains(w))
}

impl Classify for Pop3Error {
    fn disposition(&self) -> Disposition {
        match self {
            Pop3Error::Net(e) => e.disposition(),
            Pop3Error::Io(_) | Pop3Error::Protocol(_) => Disposition::Transient,
            Pop3Error::Auth { code, detail } => {
                if is_temporary_code(code.as_deref())
                    || (code.as_deref() == Some("AUTH") && says_temporary(detail))
                {
                    Disposition::Transient
                } else {
                    Disposition::Permanent
                }
            }
            Pop3Error::Server { code, .. } => match code.as_deref() {
                Some("SYS/PERM" | "AUTH") => Disposition::Permanent,
                _ => Disposition::Transient,
            },
            Pop3Error::NoStls | Pop3Error::InvalidInput(_) | Pop3Error::TooLarge { .. } => {
                Disposition::Permanent
            }
        }
    }
}

pub use crate::connector::Credentials;

/// Capabilities from the last `CAPA` (RFC 2449).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Upper-cased capability name with its arguments (as sent).
    entries: Vec<(String, Vec<String>)>,
    known: bool,
}

impl Capabilities {
    /// Parses `CAPA` listing lines (without the terminating ".").
    pub fn parse<I, L>(lines: I) -> Self
    where
        I: IntoIterator<Item = L>,
        L: AsRef<str>,
    {
        let entries = lines
            .into_iter()
            .filter_map(|line| {
                let mut words = line.as_ref().split_ascii_whitespace();
                let name = words.next()?.to_ascii_uppercase();
                Some((name, words.map(str::to_owned).collect()))
            })
            .collect();
        Capabilities {
            entries,
            known: true,
        }
    }

    /// False when the server did not answer `CAPA` (pre-RFC 2449 server).
    pub fn known(&self) -> bool {
        self.known
    }

    /// Whether the capability `name` (case-insensitive) is listed.
    pub fn has(&self, name: &str) -> bool {
        self.args(name).is_some()
    }

    /// The arguments of capability `name`, if listed.
    pub fn args(&self, name: &str) -> Option<&[String]> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, a)| a.as_slice())
    }

    /// Whether `SASL` lists the mechanism `mech` (case-insensitive).
    pub fn has_sasl(&self, mech: &str) -> bool {
        self.args("SASL")
            .is_some_and(|m| m.iter().any(|m| m.eq_ignore_ascii_case(mech)))
    }

    /// Capability names in the server's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }
}

/// A parsed status line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// `+OK text`
    Ok(String),
    /// `-ERR text`
    Err(String),
    /// `+ base64` SASL continuation (only valid during AUTH).
    Cont(String),
}

/// Parses a status line (without line ending). `None` if it is none of the three forms.
fn parse_status(line: &[u8]) -> Option<Status> {
    /// The text after a status word: nothing, or a space and the text.
    fn rest(after: &[u8]) -> Option<String> {
        match after.split_first() {
            None => Some(String::new()),
            Some((b' ', text)) => Some(sanitize(text)),
            Some(_) => None,
        }
    }
    /// `line` without its first `word.len()` bytes if they are `word` (any case).
    fn after<'a>(line: &'a [u8], word: &[u8]) -> Option<&'a [u8]> {
        let (head, tail) = line.split_at_checked(word.len())?;
        head.eq_ignore_ascii_case(word).then_some(tail)
    }
    // RFC 1939 wants upper case, but accepting "+ok" costs nothing.
    if let Some(tail) = after(line, b"+OK") {
        rest(tail).map(Status::Ok)
    } else if let Some(tail) = after(line, b"-ERR") {
        rest(tail).map(Status::Err)
    } else if let Some(tail) = line.strip_prefix(b"+") {
        rest(tail).map(Status::Cont)
    } else {
        None
    }
}

/// The RFC 2449 response code at the start of a status text: `[SYS/TEMP] ...` → `SYS/TEMP`.
fn response_code(text: &str) -> Option<String> {
    let (code, _) = text.strip_prefix('[')?.split_once(']')?;
    let code = code.trim();
    (!code.is_empty()).then(|| code.to_ascii_uppercase())
}

/// Server text made safe for logs and errors: lossy UTF-8, no control characters, bounded.
fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len().min(MAX_ERROR_TEXT + 3));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_ERROR_TEXT {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out.trim().to_owned()
}

/// Removes secrets a server might echo back (some do quote the rejected input).
fn redact(mut text: String, secrets: &[&str]) -> String {
    for secret in secrets {
        // Very short secrets would blank out ordinary words; they are not worth protecting
        // at the cost of unreadable errors.
        if secret.len() >= 4 && text.contains(secret) {
            text = text.replace(secret, "<redacted>");
        }
    }
    text
}

/// Rejects arguments that would smuggle extra commands into the session.
fn check_arg(what: &str, value: &str) -> Result<(), Pop3Error> {
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(Pop3Error::InvalidInput(format!(
            "{what} contains CR, LF or NUL"
        )));
    }
    Ok(())
}

fn check_msgno(msgno: u32) -> Result<(), Pop3Error> {
    if msgno == 0 {
        return Err(Pop3Error::InvalidInput("message numbers start at 1".into()));
    }
    Ok(())
}

/// Turns a `-ERR` to a login step into [`Pop3Error::Auth`], scrubbing secrets.
fn into_auth_error(err: Pop3Error, secrets: &[&str]) -> Pop3Error {
    match err {
        Pop3Error::Server {
            command,
            message,
            code,
        } => Pop3Error::Auth {
            detail: redact(format!("{command}: {message}"), secrets),
            code,
        },
        other => other,
    }
}

fn eof() -> Pop3Error {
    Pop3Error::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "server closed the connection",
    ))
}

/// Parses the two numbers of a `STAT` reply or a `LIST` line.
fn two_numbers<A: std::str::FromStr, B: std::str::FromStr>(text: &str) -> Option<(A, B)> {
    let mut words = text.split_ascii_whitespace();
    let a = words.next()?.parse().ok()?;
    let b = words.next()?.parse().ok()?;
    Some((a, b))
}

/// Parses a `UIDL` listing line: message number and a unique-id of 1-70 printable
/// ASCII characters (RFC 1939 §7; we do not enforce the 70).
fn parse_uidl_line(line: &str) -> Option<(u32, String)> {
    let mut words = line.split_ascii_whitespace();
    let msgno = words.next()?.parse().ok()?;
    let uid = words.next()?;
    if uid.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        Some((msgno, uid.to_owned()))
    } else {
        None
    }
}

/// Result of reading a dot-terminated message body.
struct Body {
    data: Vec<u8>,
    size: u64,
    over_cap: bool,
}

/// An open POP3 session.
///
/// Generic over the transport so the protocol logic can be driven over an in-memory
/// stream; in production it is [`MaybeTls`], created by [`Pop3Client::connect`].
pub struct Pop3Client<S = MaybeTls> {
    io: BufReader<S>,
    greeting: String,
    caps: Capabilities,
    /// Set while a command's response has not been read to its end.
    busy: bool,
}

impl<S> fmt::Debug for Pop3Client<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pop3Client")
            .field("greeting", &self.greeting)
            .field("caps", &self.caps)
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

impl Pop3Client<MaybeTls> {
    /// Connects to `endpoint`, reads the greeting and the capabilities, and for
    /// [`TlsMode::StartTls`] upgrades with STLS (the server must offer it: otherwise
    /// [`Pop3Error::NoStls`], never a plaintext fallback). [`TlsMode::Plain`] stays in
    /// plaintext; whether that is allowed is the configuration layer's decision.
    pub async fn connect(endpoint: &Endpoint) -> Result<Self, Pop3Error> {
        let stream = net::connect(endpoint).await?;
        let client = Self::from_stream(stream).await?;
        match endpoint.tls {
            TlsMode::StartTls => client.stls(endpoint).await,
            TlsMode::Implicit | TlsMode::Plain => Ok(client),
        }
    }

    /// Whether the session is encrypted.
    pub fn is_tls(&self) -> bool {
        self.io.get_ref().is_tls()
    }

    async fn stls(mut self, endpoint: &Endpoint) -> Result<Self, Pop3Error> {
        // Without CAPA we cannot know; STLS itself then tells (a -ERR means no STLS).
        if self.caps.known() && !self.caps.has("STLS") {
            return Err(Pop3Error::NoStls);
        }
        match self.exchange(b"STLS\r\n", "STLS").await? {
            Status::Ok(_) => self.busy = false,
            Status::Err(text) => {
                if !self.caps.known() {
                    return Err(Pop3Error::NoStls);
                }
                // Advertised but refused: the server's problem, classify by its code.
                return Err(Pop3Error::Server {
                    command: "STLS".into(),
                    code: response_code(&text),
                    message: text,
                });
            }
            Status::Cont(_) => {
                return Err(Pop3Error::Protocol("continuation reply to STLS".into()))
            }
        }
        // Anything already buffered arrived in plaintext before the handshake and could
        // be injected by an attacker (CVE-2011-0411 class): refuse rather than use it.
        if !self.io.buffer().is_empty() {
            return Err(Pop3Error::Protocol(
                "server sent data after STLS before the TLS handshake".into(),
            ));
        }
        let tcp = match self.io.into_inner() {
            MaybeTls::Plain(tcp) => tcp,
            MaybeTls::Tls(_) => {
                return Err(Pop3Error::Protocol(
                    "STLS on a connection already using TLS".into(),
                ))
            }
        };
        let tls = net::start_tls(endpoint, tcp).await?;
        let mut client = Pop3Client {
            io: BufReader::with_capacity(READ_BUFFER, tls),
            greeting: self.greeting,
            caps: Capabilities::default(),
            busy: false,
        };
        // RFC 2595 §4: capabilities learnt before TLS must be discarded.
        client.refresh_capabilities().await?;
        Ok(client)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Pop3Client<S> {
    /// Starts a session over an already connected stream: reads the greeting and the
    /// capabilities. [`Pop3Client::connect`] is the normal entry point.
    pub async fn from_stream(stream: S) -> Result<Self, Pop3Error> {
        let mut client = Pop3Client {
            io: BufReader::with_capacity(READ_BUFFER, stream),
            greeting: String::new(),
            caps: Capabilities::default(),
            busy: false,
        };
        let line = client.read_line().await?;
        match parse_status(&line) {
            Some(Status::Ok(text)) => client.greeting = text,
            Some(Status::Err(text)) => {
                // e.g. "-ERR [SYS/TEMP] too many connections": classified by its code.
                return Err(Pop3Error::Server {
                    command: "greeting".into(),
                    code: response_code(&text),
                    message: text,
                });
            }
            _ => {
                return Err(Pop3Error::Protocol(format!(
                    "unexpected greeting: {}",
                    sanitize(&line)
                )))
            }
        }
        client.refresh_capabilities().await?;
        Ok(client)
    }

    /// The server's greeting text (after `+OK`).
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// Capabilities from the latest `CAPA` (refreshed after STLS and after login).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Logs in with the best mechanism for `creds`: SASL PLAIN if the server lists it,
    /// else USER/PASS; XOAUTH2 for OAuth 2.0 tokens.
    pub async fn authenticate(&mut self, creds: &Credentials) -> Result<(), Pop3Error> {
        match creds {
            Credentials::Password { user, pass } if self.caps.has_sasl("PLAIN") => {
                self.auth_plain(user, pass).await
            }
            Credentials::Password { user, pass } => self.login_user_pass(user, pass).await,
            Credentials::OAuth2 { user, token } => self.auth_xoauth2(user, token).await,
        }
    }

    /// Logs in with `USER` / `PASS` (RFC 1939 §7).
    pub async fn login_user_pass(&mut self, user: &str, pass: &str) -> Result<(), Pop3Error> {
        check_arg("user name", user)?;
        check_arg("password", pass)?;
        let secrets = [pass];
        let cmd = format!("USER {user}\r\n");
        self.simple(cmd.as_bytes(), "USER")
            .await
            .map_err(|e| into_auth_error(e, &secrets))?;
        let mut cmd = Vec::with_capacity(pass.len() + 7);
        cmd.extend_from_slice(b"PASS ");
        cmd.extend_from_slice(pass.as_bytes());
        cmd.extend_from_slice(b"\r\n");
        self.simple(&cmd, "PASS")
            .await
            .map_err(|e| into_auth_error(e, &secrets))?;
        self.after_login().await
    }

    /// Logs in with SASL PLAIN (RFC 4616), initial response on the AUTH line (RFC 5034).
    pub async fn auth_plain(&mut self, user: &str, pass: &str) -> Result<(), Pop3Error> {
        check_arg("user name", user)?;
        check_arg("password", pass)?;
        let mut ir = Vec::with_capacity(user.len() + pass.len() + 2);
        ir.push(0);
        ir.extend_from_slice(user.as_bytes());
        ir.push(0);
        ir.extend_from_slice(pass.as_bytes());
        self.sasl("PLAIN", &ir, &[pass]).await
    }

    /// Logs in with SASL XOAUTH2 (Google/Microsoft): `user=..^Aauth=Bearer ..^A^A`.
    pub async fn auth_xoauth2(&mut self, user: &str, token: &str) -> Result<(), Pop3Error> {
        check_arg("user name", user)?;
        check_arg("token", token)?;
        let ir = format!("user={user}\x01auth=Bearer {token}\x01\x01");
        self.sasl("XOAUTH2", ir.as_bytes(), &[token]).await
    }

    /// `STAT`: number of messages and their total size in octets.
    pub async fn stat(&mut self) -> Result<(u32, u64), Pop3Error> {
        let text = self.simple(b"STAT\r\n", "STAT").await?;
        two_numbers(&text)
            .ok_or_else(|| Pop3Error::Protocol(format!("malformed STAT reply: {text}")))
    }

    /// `UIDL` for all messages: `(message number, unique id)`; `None` if the server
    /// does not support UIDL (answers `-ERR`).
    pub async fn uidl_all(&mut self) -> Result<Option<Vec<(u32, String)>>, Pop3Error> {
        let lines = match self.listing(b"UIDL\r\n", "UIDL").await {
            Ok(lines) => lines,
            Err(Pop3Error::Server { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let parsed = lines
            .iter()
            .map(|l| {
                parse_uidl_line(l)
                    .ok_or_else(|| Pop3Error::Protocol(format!("malformed UIDL line: {l}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(parsed))
    }

    /// `LIST` for all messages: `(message number, size in octets)`.
    pub async fn list_all(&mut self) -> Result<Vec<(u32, u64)>, Pop3Error> {
        let lines = self.listing(b"LIST\r\n", "LIST").await?;
        lines
            .iter()
            .map(|l| {
                two_numbers(l)
                    .ok_or_else(|| Pop3Error::Protocol(format!("malformed LIST line: {l}")))
            })
            .collect()
    }

    /// `TOP msgno lines`: the headers and the first `lines` body lines, dot-unstuffed.
    /// Responses over 16 MiB give [`Pop3Error::TooLarge`] (connection stays usable).
    pub async fn top(&mut self, msgno: u32, lines: u32) -> Result<Vec<u8>, Pop3Error> {
        check_msgno(msgno)?;
        let cmd = format!("TOP {msgno} {lines}\r\n");
        self.fetch_body(
            cmd.as_bytes(),
            &format!("TOP {msgno}"),
            msgno,
            MAX_TOP_BYTES,
        )
        .await
    }

    /// `RETR msgno`: the message exactly as served (CRLF kept), dot-unstuffed.
    ///
    /// If it is larger than `max_size` bytes, the rest of the response is read and
    /// discarded and [`Pop3Error::TooLarge`] returned; the connection stays usable.
    pub async fn retr(&mut self, msgno: u32, max_size: u64) -> Result<Vec<u8>, Pop3Error> {
        check_msgno(msgno)?;
        let cmd = format!("RETR {msgno}\r\n");
        self.fetch_body(cmd.as_bytes(), &format!("RETR {msgno}"), msgno, max_size)
            .await
    }

    /// `DELE msgno`: marks the message deleted; takes effect only at a successful [`quit`](Self::quit).
    pub async fn dele(&mut self, msgno: u32) -> Result<(), Pop3Error> {
        check_msgno(msgno)?;
        let cmd = format!("DELE {msgno}\r\n");
        self.simple(cmd.as_bytes(), &format!("DELE {msgno}"))
            .await
            .map(drop)
    }

    /// `RSET`: unmarks all messages marked deleted in this session.
    pub async fn rset(&mut self) -> Result<(), Pop3Error> {
        self.simple(b"RSET\r\n", "RSET").await.map(drop)
    }

    /// `NOOP`: keeps the session alive / checks that it still works.
    pub async fn noop(&mut self) -> Result<(), Pop3Error> {
        self.simple(b"NOOP\r\n", "NOOP").await.map(drop)
    }

    /// `QUIT`: ends the session and makes the server commit deletions. An error means
    /// the deletions may not have happened.
    pub async fn quit(mut self) -> Result<(), Pop3Error> {
        self.simple(b"QUIT\r\n", "QUIT").await?;
        // The server closes its side now; a failed shutdown changes nothing for us.
        let _ = self.io.get_mut().shutdown().await;
        Ok(())
    }

    // ---- internals ----

    async fn after_login(&mut self) -> Result<(), Pop3Error> {
        // RFC 2449 §5: capabilities may differ once logged in (e.g. UIDL only now).
        self.refresh_capabilities().await
    }

    async fn refresh_capabilities(&mut self) -> Result<(), Pop3Error> {
        self.caps = match self.listing(b"CAPA\r\n", "CAPA").await {
            Ok(lines) => Capabilities::parse(lines),
            // Pre-RFC 2449 server: nothing known.
            Err(Pop3Error::Server { .. }) => Capabilities::default(),
            Err(e) => return Err(e),
        };
        Ok(())
    }

    /// Runs a SASL exchange (RFC 5034) with one initial response.
    async fn sasl(
        &mut self,
        mech: &str,
        initial: &[u8],
        secrets: &[&str],
    ) -> Result<(), Pop3Error> {
        let label = format!("AUTH {mech}");
        let ir = base64::engine::general_purpose::STANDARD.encode(initial);
        let inline = format!("AUTH {mech} {ir}\r\n");
        let mut status = if inline.len() <= MAX_AUTH_LINE {
            self.exchange(inline.as_bytes(), &label).await?
        } else {
            match self
                .exchange(format!("AUTH {mech}\r\n").as_bytes(), &label)
                .await?
            {
                Status::Cont(_) => {
                    self.send(format!("{ir}\r\n").as_bytes()).await?;
                    self.read_status(&label).await?
                }
                other => other,
            }
        };
        let mut challenge_detail = None;
        if let Status::Cont(challenge) = &status {
            // A challenge after our only response means failure: XOAUTH2 sends its error
            // as base64 JSON and wants an empty line back; for other mechanisms "*"
            // cancels (RFC 5034 §4). Either way the server then answers -ERR.
            challenge_detail = Some(decode_challenge(challenge));
            let answer: &[u8] = if mech == "XOAUTH2" { b"\r\n" } else { b"*\r\n" };
            self.send(answer).await?;
            status = self.read_status(&label).await?;
        }
        match status {
            Status::Ok(_) => {
                self.busy = false;
                self.after_login().await
            }
            Status::Err(text) => {
                self.busy = false;
                let code = response_code(&text);
                let detail = match challenge_detail {
                    Some(c) if !c.is_empty() => format!("{label}: {text} ({c})"),
                    _ => format!("{label}: {text}"),
                };
                Err(Pop3Error::Auth {
                    detail: redact(detail, secrets),
                    code,
                })
            }
            Status::Cont(_) => Err(Pop3Error::Protocol(format!(
                "{label}: server kept sending challenges"
            ))),
        }
    }

    /// A command with a single-line reply: the `+OK` text, or [`Pop3Error::Server`].
    async fn simple(&mut self, cmd: &[u8], label: &str) -> Result<String, Pop3Error> {
        match self.exchange(cmd, label).await? {
            Status::Ok(text) => {
                self.busy = false;
                Ok(text)
            }
            Status::Err(text) => {
                self.busy = false;
                Err(server_error(label, text))
            }
            Status::Cont(_) => Err(Pop3Error::Protocol(format!(
                "continuation reply to {label}"
            ))),
        }
    }

    /// A command with a multi-line listing reply (CAPA, LIST, UIDL): its lines,
    /// dot-unstuffed, without line endings.
    async fn listing(&mut self, cmd: &[u8], label: &str) -> Result<Vec<String>, Pop3Error> {
        match self.exchange(cmd, label).await? {
            Status::Ok(_) => {}
            Status::Err(text) => {
                self.busy = false;
                return Err(server_error(label, text));
            }
            Status::Cont(_) => {
                return Err(Pop3Error::Protocol(format!(
                    "continuation reply to {label}"
                )))
            }
        }
        let mut lines = Vec::new();
        let mut total = 0usize;
        loop {
            let line = self.read_line().await?;
            if line == b"." {
                break;
            }
            total += line.len() + 2;
            if total > MAX_LISTING_BYTES {
                return Err(Pop3Error::Protocol(format!(
                    "{label} listing exceeds {MAX_LISTING_BYTES} bytes"
                )));
            }
            let line = line.strip_prefix(b".").unwrap_or(&line);
            lines.push(String::from_utf8_lossy(line).into_owned());
        }
        self.busy = false;
        Ok(lines)
    }

    /// RETR/TOP: status line, then the body, capped.
    async fn fetch_body(
        &mut self,
        cmd: &[u8],
        label: &str,
        msgno: u32,
        cap: u64,
    ) -> Result<Vec<u8>, Pop3Error> {
        match self.exchange(cmd, label).await? {
            Status::Ok(_) => {}
            Status::Err(text) => {
                self.busy = false;
                return Err(server_error(label, text));
            }
            Status::Cont(_) => {
                return Err(Pop3Error::Protocol(format!(
                    "continuation reply to {label}"
                )))
            }
        }
        let body = self.read_body(cap).await?;
        self.busy = false;
        if body.over_cap {
            tracing::debug!(
                msgno,
                size = body.size,
                cap,
                "POP3 message over the size cap, drained"
            );
            return Err(Pop3Error::TooLarge {
                msgno,
                size: body.size,
                cap,
            });
        }
        Ok(body.data)
    }

    /// Reads a dot-terminated body, undoing dot-stuffing (RFC 1939 §3). Bytes are kept
    /// as sent; past `cap` the data is read and thrown away so the session stays in step.
    async fn read_body(&mut self, cap: u64) -> Result<Body, Pop3Error> {
        let mut data = Vec::new();
        let mut discard = Vec::new();
        let mut size: u64 = 0;
        let mut over_cap = false;
        let mut at_line_start = true;
        loop {
            let buf = if over_cap {
                discard.clear();
                &mut discard
            } else {
                &mut data
            };
            let start = buf.len();
            // Appends straight into the result: no per-line copies for the common case.
            let n = (&mut self.io)
                .take(BODY_CHUNK)
                .read_until(b'\n', buf)
                .await?;
            if n == 0 {
                return Err(eof());
            }
            let ends_line = buf.last() == Some(&b'\n');
            let piece = buf.get(start..).unwrap_or_default();
            if at_line_start && piece.first() == Some(&b'.') {
                if piece == b".\r\n" || piece == b".\n" {
                    buf.truncate(start);
                    break;
                }
                buf.remove(start);
            }
            size += (buf.len() - start) as u64;
            at_line_start = ends_line;
            if !over_cap && size > cap {
                over_cap = true;
                data = Vec::new();
            }
            if size > MAX_DRAIN_BYTES {
                return Err(Pop3Error::Protocol(format!(
                    "response exceeds {MAX_DRAIN_BYTES} bytes; giving up"
                )));
            }
        }
        Ok(Body {
            data,
            size,
            over_cap,
        })
    }

    /// Sends `cmd` and reads the status line. `label` is what logs and errors show.
    async fn exchange(&mut self, cmd: &[u8], label: &str) -> Result<Status, Pop3Error> {
        if self.busy {
            return Err(Pop3Error::Protocol(
                "connection out of step after an earlier failure; reconnect required".into(),
            ));
        }
        // Cleared by the caller once the whole response has been read.
        self.busy = true;
        tracing::trace!(command = label, "POP3 >");
        self.send(cmd).await?;
        self.read_status(label).await
    }

    async fn read_status(&mut self, label: &str) -> Result<Status, Pop3Error> {
        let line = self.read_line().await?;
        parse_status(&line).ok_or_else(|| {
            Pop3Error::Protocol(format!("unexpected reply to {label}: {}", sanitize(&line)))
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Pop3Error> {
        // BufReader only buffers reads; writes go straight to the stream.
        let stream = self.io.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await?;
        Ok(())
    }

    /// One line (status or listing) without its line ending, at most [`MAX_LINE`] bytes.
    async fn read_line(&mut self) -> Result<Vec<u8>, Pop3Error> {
        let mut line = Vec::new();
        let n = (&mut self.io)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(eof());
        }
        if line.last() != Some(&b'\n') {
            if n >= MAX_LINE + 2 {
                return Err(Pop3Error::Protocol(format!(
                    "reply line longer than {MAX_LINE} bytes"
                )));
            }
            return Err(eof());
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(line)
    }
}

fn server_error(label: &str, text: String) -> Pop3Error {
    Pop3Error::Server {
        command: label.to_owned(),
        code: response_code(&text),
        message: text,
    }
}

/// XOAUTH2 failure challenges are base64 JSON (`{"status":"401",...}`); show it decoded.
fn decode_challenge(challenge: &str) -> String {
    match base64::engine::general_purpose::STANDARD.decode(challenge.trim()) {
        Ok(bytes) => sanitize(&bytes),
        Err(_) => sanitize(challenge.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{duplex, AsyncBufReadExt, DuplexStream};

    /// One step of a scripted server.
    enum Step {
        /// Server sends these bytes.
        Send(Vec<u8>),
        /// Server expects exactly this line (without CRLF) from the client.
        Expect(String),
    }

    fn send(s: &str) -> Step {
        Step::Send(s.as_bytes().to_vec())
    }
    fn expect(s: &str) -> Step {
        Step::Expect(s.to_owned())
    }

    /// Runs a scripted server on the other half of a duplex pipe; panics (failing the
    /// test through the join handle) when the client sends anything unexpected.
    fn peer(script: Vec<Step>) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = duplex(1 << 20);
        let handle = tokio::spawn(async move {
            let mut server = BufReader::new(server);
            for step in script {
                match step {
                    Step::Send(bytes) => server.get_mut().write_all(&bytes).await.unwrap(),
                    Step::Expect(want) => {
                        let mut got = String::new();
                        server.read_line(&mut got).await.unwrap();
                        assert_eq!(got, format!("{want}\r\n"), "client sent the wrong command");
                    }
                }
            }
        });
        (client, handle)
    }

    const GREETING: &str = "+OK Dovecot ready.\r\n";
    const CAPA: &str =
        "+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nUSER\r\nSASL PLAIN LOGIN XOAUTH2\r\n.\r\n";

    fn opening() -> Vec<Step> {
        vec![send(GREETING), expect("CAPA"), send(CAPA)]
    }

    async fn client_with(
        script: Vec<Step>,
    ) -> (Pop3Client<DuplexStream>, tokio::task::JoinHandle<()>) {
        let mut full = opening();
        full.extend(script);
        let (stream, handle) = peer(full);
        let client = Pop3Client::from_stream(stream).await.unwrap();
        (client, handle)
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"+OK"), Some(Status::Ok(String::new())));
        assert_eq!(parse_status(b"+OK 2 320"), Some(Status::Ok("2 320".into())));
        assert_eq!(parse_status(b"+ok fine"), Some(Status::Ok("fine".into())));
        assert_eq!(
            parse_status(b"-ERR [AUTH] no"),
            Some(Status::Err("[AUTH] no".into()))
        );
        assert_eq!(parse_status(b"+ "), Some(Status::Cont(String::new())));
        assert_eq!(parse_status(b"+"), Some(Status::Cont(String::new())));
        assert_eq!(parse_status(b"+ eyJ9"), Some(Status::Cont("eyJ9".into())));
        assert_eq!(parse_status(b"+OKAY"), None);
        assert_eq!(parse_status(b"-ERRx"), None);
        assert_eq!(parse_status(b"* OK imap"), None);
        assert_eq!(parse_status(b""), None);
        // Control characters from the server never reach logs.
        assert_eq!(
            parse_status(b"-ERR a\x1b[31mb"),
            Some(Status::Err("a [31mb".into()))
        );
    }

    #[test]
    fn response_codes() {
        assert_eq!(
            response_code("[SYS/TEMP] try later"),
            Some("SYS/TEMP".into())
        );
        assert_eq!(response_code("[in-use] locked"), Some("IN-USE".into()));
        assert_eq!(response_code("no code"), None);
        assert_eq!(response_code("[unterminated"), None);
        assert_eq!(response_code("[] empty"), None);
        assert_eq!(response_code("[é] x"), Some("é".into()));
    }

    /// Truncated and non-ASCII status lines (bytes from the network) are
    /// refused, never sliced into a panic (the module denies slicing).
    #[test]
    fn short_and_non_ascii_status_lines() {
        for line in [&b"-ER"[..], b"+\xc3", b"\xc3\xa9OK", b"-\xff\xffR", b"+O"] {
            let parsed = parse_status(line);
            assert!(
                matches!(parsed, None | Some(Status::Cont(_))),
                "{line:?}: {parsed:?}"
            );
        }
        assert_eq!(
            parse_status("+OK caf\u{e9}".as_bytes()),
            Some(Status::Ok("caf\u{e9}".into()))
        );
    }

    #[test]
    fn capabilities_parse() {
        let caps = Capabilities::parse([
            "TOP",
            "uidl",
            "SASL PLAIN xoauth2",
            "IMPLEMENTATION Dovecot  x",
        ]);
        assert!(caps.known());
        assert!(caps.has("UIDL") && caps.has("top"));
        assert!(!caps.has("STLS"));
        assert!(caps.has_sasl("XOAUTH2") && caps.has_sasl("plain"));
        assert!(!caps.has_sasl("LOGIN"));
        assert_eq!(
            caps.args("IMPLEMENTATION"),
            Some(&["Dovecot".to_owned(), "x".to_owned()][..])
        );
        assert_eq!(
            caps.names().collect::<Vec<_>>(),
            ["TOP", "UIDL", "SASL", "IMPLEMENTATION"]
        );
        assert!(!Capabilities::default().known());
    }

    #[test]
    fn classification() {
        use Disposition::*;
        let auth = |code: Option<&str>| Pop3Error::Auth {
            detail: "x".into(),
            code: code.map(str::to_owned),
        };
        assert_eq!(auth(Some("AUTH")).disposition(), Permanent);
        assert_eq!(auth(None).disposition(), Permanent);
        assert_eq!(auth(Some("SYS/PERM")).disposition(), Permanent);
        assert_eq!(auth(Some("SYS/TEMP")).disposition(), Transient);
        assert_eq!(auth(Some("IN-USE")).disposition(), Transient);
        assert_eq!(auth(Some("LOGIN-DELAY")).disposition(), Transient);
        let auth_text = |text: &str| Pop3Error::Auth {
            detail: format!("PASS: {text}"),
            code: Some("AUTH".into()),
        };
        // Dovecot's wrong password stays permanent, even if a site adds advice.
        assert_eq!(auth_text("Authentication failed.").disposition(), Permanent);
        assert_eq!(
            auth_text("Authentication failed. Try again with the right password").disposition(),
            Permanent
        );
        assert_eq!(auth_text("Account disabled").disposition(), Permanent);
        // A nologin account with a reason that says it passes: transient.
        assert_eq!(
            auth_text("reset-uidvalidity.sh:mailbox-rebuild-in-progress,retry-in-a-second")
                .disposition(),
            Transient
        );
        assert_eq!(
            auth_text("Mailbox under maintenance, try again later").disposition(),
            Transient
        );
        // Without [AUTH] the text is not trusted to mean "temporary".
        let plain = Pop3Error::Auth {
            detail: "PASS: retry later".into(),
            code: None,
        };
        assert_eq!(plain.disposition(), Permanent);
        let server = |code: Option<&str>| Pop3Error::Server {
            command: "STAT".into(),
            message: "x".into(),
            code: code.map(str::to_owned),
        };
        assert_eq!(server(None).disposition(), Transient);
        assert_eq!(server(Some("SYS/PERM")).disposition(), Permanent);
        assert_eq!(Pop3Error::NoStls.disposition(), Permanent);
        assert_eq!(
            Pop3Error::TooLarge {
                msgno: 1,
                size: 2,
                cap: 1
            }
            .disposition(),
            Permanent
        );
        assert_eq!(Pop3Error::Protocol("x".into()).disposition(), Transient);
        let timeout = Pop3Error::Io(io::Error::new(io::ErrorKind::TimedOut, "read timed out"));
        assert_eq!(timeout.disposition(), Transient);
        assert!(!timeout.connection_usable());
        assert!(Pop3Error::TooLarge {
            msgno: 1,
            size: 2,
            cap: 1
        }
        .connection_usable());
        assert!(auth(None).connection_usable());
        assert!(!Pop3Error::Protocol("x".into()).connection_usable());
    }

    #[test]
    fn credentials_debug_hides_secrets() {
        let p = Credentials::Password {
            user: "bob".into(),
            pass: "hunter2-secret".into(),
        };
        let o = Credentials::OAuth2 {
            user: "bob".into(),
            token: "ya29.tok".into(),
        };
        let shown = format!("{p:?} {o:?}");
        assert!(shown.contains("bob"));
        assert!(
            !shown.contains("hunter2") && !shown.contains("ya29"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn greeting_capa_and_user_pass() {
        let (mut c, peer) = client_with(vec![
            expect("USER bob"),
            send("+OK\r\n"),
            expect("PASS p w"),
            send("+OK Logged in.\r\n"),
            expect("CAPA"),
            send("+OK\r\nTOP\r\nUIDL\r\n.\r\n"),
        ])
        .await;
        assert_eq!(c.greeting(), "Dovecot ready.");
        assert!(c.capabilities().has_sasl("PLAIN"));
        c.login_user_pass("bob", "p w").await.unwrap();
        // Capabilities are refreshed after login.
        assert!(!c.capabilities().has("SASL") && c.capabilities().has("UIDL"));
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn greeting_err_is_server_error() {
        let (stream, peer) = peer(vec![send("-ERR [SYS/TEMP] Too many connections\r\n")]);
        let err = Pop3Client::from_stream(stream).await.unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Server { code: Some(c), .. } if c == "SYS/TEMP"),
            "{err:?}"
        );
        assert_eq!(err.disposition(), Disposition::Transient);
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn capa_err_means_unknown_caps() {
        let (stream, peer) = peer(vec![
            send(GREETING),
            expect("CAPA"),
            send("-ERR unknown command\r\n"),
        ]);
        let c = Pop3Client::from_stream(stream).await.unwrap();
        assert!(!c.capabilities().known());
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn authenticate_prefers_sasl_plain() {
        let ir = base64::engine::general_purpose::STANDARD.encode(b"\0bob\0secret");
        let (mut c, peer) = client_with(vec![
            expect(&format!("AUTH PLAIN {ir}")),
            send("+OK Logged in.\r\n"),
            expect("CAPA"),
            send("+OK\r\nUIDL\r\n.\r\n"),
        ])
        .await;
        c.authenticate(&Credentials::Password {
            user: "bob".into(),
            pass: "secret".into(),
        })
        .await
        .unwrap();
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn authenticate_falls_back_to_user_pass() {
        let (stream, peer) = peer(vec![
            send(GREETING),
            expect("CAPA"),
            send("+OK\r\nUSER\r\n.\r\n"),
            expect("USER bob"),
            send("+OK\r\n"),
            expect("PASS secret"),
            send("-ERR [AUTH] Authentication failed.\r\n"),
        ]);
        let mut c = Pop3Client::from_stream(stream).await.unwrap();
        let err = c
            .authenticate(&Credentials::Password {
                user: "bob".into(),
                pass: "secret".into(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Auth { code: Some(c), .. } if c == "AUTH"),
            "{err:?}"
        );
        assert_eq!(err.disposition(), Disposition::Permanent);
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn auth_error_codes_and_redaction() {
        let (mut c, peer) = client_with(vec![
            expect("USER bob"),
            send("+OK\r\n"),
            expect("PASS topsecret"),
            send("-ERR [SYS/TEMP] backend down, you sent topsecret\r\n"),
            expect("USER bob"),
            send("-ERR [IN-USE] mailbox locked\r\n"),
        ])
        .await;
        let err = c.login_user_pass("bob", "topsecret").await.unwrap_err();
        assert_eq!(err.disposition(), Disposition::Transient);
        let text = err.to_string();
        assert!(
            !text.contains("topsecret") && text.contains("PASS") && text.contains("backend down"),
            "{text}"
        );
        // The session is still in step after a -ERR.
        let err = c.login_user_pass("bob", "topsecret").await.unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Auth { code: Some(c), .. } if c == "IN-USE"),
            "{err:?}"
        );
        assert_eq!(err.disposition(), Disposition::Transient);
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn xoauth2_failure_challenge() {
        let ir = base64::engine::general_purpose::STANDARD
            .encode(b"user=bob\x01auth=Bearer bad-token\x01\x01");
        let json = base64::engine::general_purpose::STANDARD
            .encode(br#"{"status":"401","schemes":"bearer"}"#);
        let (mut c, peer) = client_with(vec![
            expect(&format!("AUTH XOAUTH2 {ir}")),
            send(&format!("+ {json}\r\n")),
            expect(""),
            send("-ERR [AUTH] Authentication failed.\r\n"),
            expect("NOOP"),
            send("+OK\r\n"),
        ])
        .await;
        let err = c.auth_xoauth2("bob", "bad-token").await.unwrap_err();
        assert_eq!(err.disposition(), Disposition::Permanent);
        let text = err.to_string();
        assert!(
            text.contains(r#""status":"401""#) && !text.contains("bad-token"),
            "{text}"
        );
        c.noop().await.unwrap();
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn long_initial_response_goes_in_continuation() {
        let token = "t".repeat(400);
        let ir = base64::engine::general_purpose::STANDARD
            .encode(format!("user=bob\x01auth=Bearer {token}\x01\x01"));
        let (mut c, peer) = client_with(vec![
            expect("AUTH XOAUTH2"),
            send("+ \r\n"),
            expect(&ir),
            send("+OK Logged in.\r\n"),
            expect("CAPA"),
            send("+OK\r\n.\r\n"),
        ])
        .await;
        c.auth_xoauth2("bob", &token).await.unwrap();
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn plain_challenge_is_cancelled() {
        let ir = base64::engine::general_purpose::STANDARD.encode(b"\0bob\0pw12");
        let (mut c, peer) = client_with(vec![
            expect(&format!("AUTH PLAIN {ir}")),
            send("+ \r\n"),
            expect("*"),
            send("-ERR Authentication aborted\r\n"),
        ])
        .await;
        let err = c.auth_plain("bob", "pw12").await.unwrap_err();
        assert!(matches!(err, Pop3Error::Auth { .. }), "{err:?}");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn injection_is_refused() {
        let (mut c, peer) = client_with(vec![]).await;
        let err = c.login_user_pass("bob\r\nDELE 1", "x").await.unwrap_err();
        assert!(matches!(err, Pop3Error::InvalidInput(_)));
        let err = c.auth_plain("bob", "a\nb").await.unwrap_err();
        assert!(matches!(err, Pop3Error::InvalidInput(_)));
        assert!(!err.to_string().contains("a\nb"));
        assert!(matches!(
            c.retr(0, 10).await,
            Err(Pop3Error::InvalidInput(_))
        ));
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn stat_list_uidl() {
        let (mut c, peer) = client_with(vec![
            expect("STAT"),
            send("+OK 2 320\r\n"),
            expect("LIST"),
            send("+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
            expect("UIDL"),
            send("+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n.\r\n"),
            expect("UIDL"),
            send("-ERR unknown command\r\n"),
            expect("STAT"),
            send("+OK lots\r\n"),
            expect("NOOP"),
            send("+OK\r\n"),
        ])
        .await;
        assert_eq!(c.stat().await.unwrap(), (2, 320));
        assert_eq!(c.list_all().await.unwrap(), vec![(1, 120), (2, 200)]);
        assert_eq!(
            c.uidl_all().await.unwrap(),
            Some(vec![
                (1, "whqtswO00WBw418f9t5JxYwZ".into()),
                (2, "QhdPYR:00WBw1Ph7x7".into())
            ])
        );
        assert_eq!(c.uidl_all().await.unwrap(), None);
        assert!(matches!(c.stat().await, Err(Pop3Error::Protocol(_))));
        // A malformed single-line reply was still read completely.
        c.noop().await.unwrap();
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn uidl_rejects_bad_ids() {
        let (mut c, peer) = client_with(vec![expect("UIDL"), send("+OK\r\n1\r\n.\r\n")]).await;
        assert!(matches!(c.uidl_all().await, Err(Pop3Error::Protocol(_))));
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn retr_dot_unstuffing_keeps_bytes() {
        // Dot-stuffed lines, a lone "." line inside the message, bare LF lines, and a
        // CR without LF mid-line; ends with the LF-only terminator some servers send.
        let wire = b"+OK 99 octets\r\nSubject: x\r\n\r\n..leading dot\r\n..\r\n...\r\nbare lf\nmid\rcr\r\nend\r\n.\n";
        let want: &[u8] =
            b"Subject: x\r\n\r\n.leading dot\r\n.\r\n..\r\nbare lf\nmid\rcr\r\nend\r\n";
        let (mut c, peer) = client_with(vec![
            expect("RETR 1"),
            Step::Send(wire.to_vec()),
            expect("NOOP"),
            send("+OK\r\n"),
        ])
        .await;
        assert_eq!(c.retr(1, 1 << 20).await.unwrap(), want);
        c.noop().await.unwrap();
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn retr_empty_message_and_err() {
        let (mut c, peer) = client_with(vec![
            expect("RETR 1"),
            send("+OK\r\n.\r\n"),
            expect("RETR 9"),
            send("-ERR There's no message 9.\r\n"),
            expect("NOOP"),
            send("+OK\r\n"),
        ])
        .await;
        assert_eq!(c.retr(1, 10).await.unwrap(), b"");
        let err = c.retr(9, 10).await.unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Server { command, .. } if command == "RETR 9"),
            "{err:?}"
        );
        assert!(err.connection_usable());
        c.noop().await.unwrap();
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn retr_long_lines_across_chunks() {
        // Lines longer than the read chunk, one starting with a stuffed dot exactly at a
        // chunk boundary's line start, must come back intact.
        let long = "x".repeat(BODY_CHUNK as usize * 3 + 17);
        let wire = format!("+OK\r\n{long}\r\n..{long}\r\n.\r\n");
        let want = format!("{long}\r\n.{long}\r\n");
        let (mut c, peer) = client_with(vec![expect("RETR 2"), send(&wire)]).await;
        assert_eq!(c.retr(2, u64::MAX).await.unwrap(), want.as_bytes());
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn retr_too_large_drains_and_stays_usable() {
        let mut wire = String::from("+OK\r\n");
        for i in 0..1000 {
            wire.push_str(&format!("line {i:04} of a big message\r\n"));
        }
        wire.push_str(".\r\n");
        let size = (wire.len() - 5 - 3) as u64;
        let (mut c, peer) = client_with(vec![
            expect("RETR 3"),
            send(&wire),
            expect("NOOP"),
            send("+OK\r\n"),
            expect("RETR 3"),
            send(&wire),
        ])
        .await;
        let err = c.retr(3, 1000).await.unwrap_err();
        match &err {
            Pop3Error::TooLarge {
                msgno: 3,
                size: s,
                cap: 1000,
            } => assert_eq!(*s, size),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(err.connection_usable());
        c.noop().await.unwrap();
        // Exactly at the cap is allowed.
        assert_eq!(c.retr(3, size).await.unwrap().len() as u64, size);
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn top_reads_body() {
        let (mut c, peer) = client_with(vec![
            expect("TOP 1 0"),
            send("+OK\r\nSubject: a\r\n\r\n.\r\n"),
        ])
        .await;
        assert_eq!(c.top(1, 0).await.unwrap(), b"Subject: a\r\n\r\n");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn eof_mid_body_poisons_connection() {
        let (mut c, peer) =
            client_with(vec![expect("RETR 1"), send("+OK\r\npartial line\r\n")]).await;
        // The peer ends after its last step, dropping its half: EOF mid-body.
        let err = c.retr(1, 100).await.unwrap_err();
        peer.await.unwrap();
        assert!(
            matches!(&err, Pop3Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{err:?}"
        );
        assert_eq!(err.disposition(), Disposition::Transient);
        let err = c.noop().await.unwrap_err();
        assert!(matches!(err, Pop3Error::Protocol(_)), "{err:?}");
    }

    #[tokio::test]
    async fn overlong_status_line_is_refused() {
        let long = format!("+OK {}\r\n", "a".repeat(MAX_LINE + 10));
        let (mut c, peer) = client_with(vec![expect("NOOP"), send(&long)]).await;
        let err = c.noop().await.unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Protocol(m) if m.contains("longer")),
            "{err:?}"
        );
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn garbage_reply_is_protocol_error() {
        let (mut c, peer) = client_with(vec![expect("NOOP"), send("* OK IMAP4rev1\r\n")]).await;
        let err = c.noop().await.unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Protocol(m) if m.contains("IMAP4rev1")),
            "{err:?}"
        );
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn quit_err_is_reported() {
        let (c, peer) = client_with(vec![
            expect("QUIT"),
            send("-ERR [SYS/TEMP] could not expunge\r\n"),
        ])
        .await;
        let err = c.quit().await.unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Server { command, .. } if command == "QUIT"),
            "{err:?}"
        );
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn dele_rset_quit() {
        let (mut c, peer) = client_with(vec![
            expect("DELE 4"),
            send("+OK Marked to be deleted.\r\n"),
            expect("RSET"),
            send("+OK\r\n"),
            expect("QUIT"),
            send("+OK Logging out.\r\n"),
        ])
        .await;
        c.dele(4).await.unwrap();
        c.rset().await.unwrap();
        c.quit().await.unwrap();
        peer.await.unwrap();
    }

    // ---- STLS and time-outs need the real `MaybeTls` transport: a TCP peer on loopback. ----

    fn endpoint(port: u16, tls: TlsMode) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
            tls,
            tls_server_name: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_millis(500),
        }
    }

    /// A one-connection TCP server following `script`.
    async fn tcp_peer(script: Vec<Step>) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let mut sock = BufReader::new(sock);
            for step in script {
                match step {
                    Step::Send(bytes) => sock.get_mut().write_all(&bytes).await.unwrap(),
                    Step::Expect(want) => {
                        let mut got = String::new();
                        sock.read_line(&mut got).await.unwrap();
                        assert_eq!(got, format!("{want}\r\n"));
                    }
                }
            }
            // Keep the socket open a moment so the client sees replies, not EOF.
            tokio::time::sleep(Duration::from_millis(800)).await;
        });
        (port, handle)
    }

    #[test]
    fn futures_are_send() {
        // The daemon runs sessions in spawned tasks: a !Send future would not compile there.
        fn is_send<T: Send>(_: T) {}
        let ep = endpoint(1, TlsMode::Plain);
        is_send(Pop3Client::connect(&ep));
        let _ = |c: &mut Pop3Client, creds: &Credentials| {
            is_send(c.authenticate(creds));
            is_send(c.retr(1, 1));
            is_send(c.uidl_all());
        };
    }

    #[tokio::test]
    async fn starttls_without_stls_is_refused() {
        let (port, peer) = tcp_peer(vec![
            send(GREETING),
            expect("CAPA"),
            send("+OK\r\nUSER\r\nUIDL\r\n.\r\n"),
        ])
        .await;
        let err = Pop3Client::connect(&endpoint(port, TlsMode::StartTls))
            .await
            .unwrap_err();
        assert!(matches!(err, Pop3Error::NoStls), "{err:?}");
        assert_eq!(err.disposition(), Disposition::Permanent);
        assert!(err.to_string().contains("no STLS"));
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn starttls_without_capa_tries_stls() {
        let (port, peer) = tcp_peer(vec![
            send(GREETING),
            expect("CAPA"),
            send("-ERR unknown\r\n"),
            expect("STLS"),
            send("-ERR unknown\r\n"),
        ])
        .await;
        let err = Pop3Client::connect(&endpoint(port, TlsMode::StartTls))
            .await
            .unwrap_err();
        assert!(matches!(err, Pop3Error::NoStls), "{err:?}");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn stls_with_injected_plaintext_is_refused() {
        let (port, peer) = tcp_peer(vec![
            send(GREETING),
            expect("CAPA"),
            send("+OK\r\nSTLS\r\n.\r\n"),
            expect("STLS"),
            send("+OK Begin TLS negotiation now.\r\n+OK injected\r\n"),
        ])
        .await;
        let err = Pop3Client::connect(&endpoint(port, TlsMode::StartTls))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Protocol(m) if m.contains("before the TLS handshake")),
            "{err:?}"
        );
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn read_timeout_is_transient_io() {
        // Greeting, then silence: CAPA's reply never comes.
        let (port, peer) = tcp_peer(vec![send(GREETING), expect("CAPA")]).await;
        let err = Pop3Client::connect(&endpoint(port, TlsMode::Plain))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Pop3Error::Io(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err:?}"
        );
        assert_eq!(err.disposition(), Disposition::Transient);
        peer.await.unwrap();
    }
}
