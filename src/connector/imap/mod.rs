//! IMAP protocol layer: a thin, typed client on top of async-imap.
//!
//! async-imap supplies the response parser, `LOGIN`/`AUTHENTICATE` (the only way to
//! obtain its `Session`) and the IDLE handle. Everything else is sent as a raw command
//! and read back with [`async_imap::Session::read_response`], because async-imap's own
//! helpers ignore the tagged status of SEARCH/FETCH/NOOP (a `NO` looks like an empty
//! result) and route untagged data through a 100-slot channel that drops when full.
//! Untagged `EXISTS`/`EXPUNGE`/`VANISHED` are collected here and handed out by
//! [`ImapClient::take_events`].
//!
//! Time-outs: every socket read/write is bounded by `Endpoint::io_timeout` (net.rs).
//! During IDLE the read time-out is lifted and the wait is bounded by
//! [`ImapClient::idle_wait`]'s own deadline instead (see there).
//!
//! Secrets: credentials never appear in errors or in our log lines. async-imap itself
//! logs every command at `log::trace!` (target `async_imap::imap_stream`), which
//! includes `LOGIN`/`AUTHENTICATE` data: keep that target below TRACE.
#![warn(missing_docs)]

mod append;
mod codec;
pub mod connector;
mod error;
pub mod marker;

use std::collections::BTreeSet;
use std::fmt;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use async_imap::imap_proto::{
    self, AttributeValue, MailboxDatum, NameAttribute, Response, ResponseCode, Status,
};
use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::{self, Endpoint, MaybeTls, TlsMode};

#[doc(hidden)]
pub use codec::fuzz_server_bytes;
pub use codec::ImapDate;
pub use connector::{nearest_folders, ImapConnector, ImapSettings};
pub use error::ImapError;

use codec::{mutf7_decode, mutf7_encode, quote, uid_sets};
use error::{code_name, split_code};

type Session = async_imap::Session<MaybeTls>;

/// Longest IDLE we run; RFC 2177 asks clients to re-issue IDLE within 29 minutes.
pub const MAX_IDLE: Duration = Duration::from_secs(28 * 60);

/// Longest pre-authentication line we accept (greeting, CAPABILITY).
const MAX_PREAUTH_LINE: usize = 16 * 1024;

/// Longest UID set per command; Dovecot allows 64 KiB command lines, others less.
const MAX_UID_SET_LEN: usize = 4000;

/// Keyword the CRM uses to mark messages it has processed.
pub const CRM_KEYWORD: &str = "$CRMTracked";

/// Server capabilities, upper-cased (`IMAP4REV1`, `AUTH=PLAIN`, `IDLE`…).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities(BTreeSet<String>);

impl Capabilities {
    fn from_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Self {
        Self(words.into_iter().map(|w| w.to_ascii_uppercase()).collect())
    }

    /// True if the capability (case-insensitive, e.g. `"MOVE"`, `"AUTH=XOAUTH2"`) is offered.
    pub fn has(&self, cap: &str) -> bool {
        self.0.contains(&cap.to_ascii_uppercase())
    }

    /// The SASL mechanisms offered (`AUTH=` capabilities), upper-cased.
    pub fn auth_mechanisms(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|c| c.strip_prefix("AUTH="))
            .collect()
    }

    /// All capabilities, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

pub use crate::connector::Credentials;

/// Special-use role of a folder (RFC 6154).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecialUse {
    /// `\All`
    All,
    /// `\Archive`
    Archive,
    /// `\Drafts`
    Drafts,
    /// `\Flagged`
    Flagged,
    /// `\Junk`
    Junk,
    /// `\Sent`
    Sent,
    /// `\Trash`
    Trash,
}

/// One folder from `LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderInfo {
    /// Decoded (UTF-8) name; pass it unchanged to [`ImapClient::select`] and friends.
    pub name: String,
    /// Hierarchy delimiter (`/`, `.`), if the server has one.
    pub delimiter: Option<String>,
    /// Raw attributes as sent (`\HasNoChildren`, `\Noselect`, `\Sent`…).
    pub attributes: Vec<String>,
    /// Special-use role, if the server announced one.
    pub special_use: Option<SpecialUse>,
}

impl FolderInfo {
    /// False for `\Noselect`/`\NonExistent` entries (hierarchy placeholders).
    pub fn is_selectable(&self) -> bool {
        !self.attributes.iter().any(|a| {
            a.eq_ignore_ascii_case("\\Noselect") || a.eq_ignore_ascii_case("\\NonExistent")
        })
    }
}

/// State of a folder after `SELECT`/`EXAMINE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderState {
    /// UIDVALIDITY; when it changes, all cached UIDs of the folder are void.
    pub uidvalidity: u32,
    /// Predicted next UID, if the server sent it.
    pub uidnext: Option<u32>,
    /// HIGHESTMODSEQ when CONDSTORE is active (`None` with `NOMODSEQ` or without CONDSTORE).
    pub highest_modseq: Option<u64>,
    /// Number of messages.
    pub exists: u32,
    /// Opened read-only (EXAMINE, or the server forced `READ-ONLY`).
    pub read_only: bool,
    /// PERMANENTFLAGS as sent (`\*` means new keywords may be created).
    pub permanent_flags: Vec<String>,
}

/// One message from [`ImapClient::fetch_messages`].
#[derive(Clone, PartialEq, Eq)]
pub struct FetchedMail {
    /// UID in the selected folder.
    pub uid: u32,
    /// INTERNALDATE as Unix seconds.
    pub internal_date: Option<i64>,
    /// Flags as sent (`\Seen`, `$CRMTracked`…).
    pub flags: Vec<String>,
    /// RFC822.SIZE.
    pub size: u32,
    /// The full message (`BODY[]`), CRLF line ends as served.
    pub raw: Vec<u8>,
}

impl fmt::Debug for FetchedMail {
    // Message bodies are personal data and large: show only their length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchedMail")
            .field("uid", &self.uid)
            .field("internal_date", &self.internal_date)
            .field("flags", &self.flags)
            .field("size", &self.size)
            .field("raw_len", &self.raw.len())
            .finish()
    }
}

/// Result of [`ImapClient::move_to`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveOutcome {
    /// UIDVALIDITY of the target folder, if the server reported COPYUID (UIDPLUS).
    pub target_uidvalidity: Option<u32>,
    /// (source UID, target UID) pairs from COPYUID; empty without UIDPLUS.
    pub uid_map: Vec<(u32, u32)>,
}

/// Untagged news about the selected folder, collected while running commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImapEvent {
    /// The folder now holds this many messages (new mail when it grows).
    Exists(u32),
    /// The message with this sequence number was expunged (later numbers shift down).
    Expunge(u32),
    /// These UIDs were expunged (QRESYNC enabled); `earlier` = reported for the past.
    Vanished {
        /// `VANISHED (EARLIER)`.
        earlier: bool,
        /// UID ranges.
        uids: Vec<RangeInclusive<u32>>,
    },
}

/// How an [`ImapClient::idle_wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleOutcome {
    /// The server reported a change; see [`ImapClient::take_events`].
    NewData,
    /// Nothing happened within the time given.
    Timeout,
    /// The server does not offer IDLE; poll with [`ImapClient::noop`] instead.
    Unsupported,
}

/// A connected, not yet authenticated IMAP connection (greeting read, TLS established
/// unless [`TlsMode::Plain`]).
pub struct UnauthenticatedClient {
    stream: MaybeTls,
    caps: Capabilities,
    host: String,
    port: u16,
    io_timeout: Duration,
}

impl fmt::Debug for UnauthenticatedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnauthenticatedClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.stream.is_tls())
            .finish()
    }
}

/// SASL client state fed to async-imap's authenticator callback.
struct Sasl {
    initial: Vec<u8>,
    sent: bool,
    /// What to answer to an error challenge: empty for XOAUTH2, `\x01` for OAUTHBEARER (RFC 7628).
    error_reply: &'static [u8],
    server_error: Option<String>,
}

impl async_imap::Authenticator for &mut Sasl {
    type Response = Vec<u8>;

    fn process(&mut self, challenge: &[u8]) -> Vec<u8> {
        if !self.sent {
            self.sent = true;
            return std::mem::take(&mut self.initial);
        }
        // A second challenge is the server's error report (XOAUTH2/OAUTHBEARER JSON).
        self.server_error = Some(codec::truncate(&String::from_utf8_lossy(challenge), 200));
        self.error_reply.to_vec()
    }
}

impl UnauthenticatedClient {
    /// Connects: implicit TLS, STARTTLS (required; never falls back to plaintext) or,
    /// only with [`TlsMode::Plain`], plaintext. Reads the greeting and capabilities.
    pub async fn connect(ep: &Endpoint) -> Result<Self, ImapError> {
        let mut stream = net::connect(ep).await?;
        let greeting = read_line(&mut stream, "greeting").await?;
        let mut caps = parse_greeting(&greeting)?;
        if ep.tls == TlsMode::StartTls {
            let has_starttls = match &caps {
                Some(c) => c.has("STARTTLS"),
                None => raw_capability(&mut stream).await?.has("STARTTLS"),
            };
            if !has_starttls {
                return Err(ImapError::NoStartTls {
                    server: ep.host.clone(),
                    detail: "STARTTLS not in CAPABILITY".into(),
                });
            }
            let (status, text) = raw_command(&mut stream, "S1", "STARTTLS").await?;
            if status != "OK" {
                return Err(ImapError::NoStartTls {
                    server: ep.host.clone(),
                    detail: format!("server answered {status} {}", codec::truncate(&text, 200)),
                });
            }
            // We read byte by byte, so nothing sent after the OK can leak into TLS.
            let tcp = match stream {
                MaybeTls::Plain(tcp) => tcp,
                MaybeTls::Tls(_) => {
                    return Err(ImapError::Protocol("STARTTLS on a TLS stream".into()))
                }
            };
            stream = net::start_tls(ep, tcp).await?;
            caps = None; // RFC 3501 §6.2.1: capabilities learnt before TLS are void.
        }
        let caps = match caps {
            Some(c) => c,
            None => raw_capability(&mut stream).await?,
        };
        tracing::debug!(host = %ep.host, port = ep.port, tls = stream.is_tls(), "IMAP connected");
        Ok(Self {
            stream,
            caps,
            host: ep.host.clone(),
            port: ep.port,
            io_timeout: ep.io_timeout,
        })
    }

    /// Capabilities announced before authentication.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// `LOGIN user pass`.
    pub async fn login(self, user: &str, pass: &str) -> Result<ImapClient, ImapError> {
        if self.caps.has("LOGINDISABLED") {
            return Err(ImapError::Unsupported(
                "server announces LOGINDISABLED".into(),
            ));
        }
        let io_timeout = self.io_timeout;
        let client = async_imap::Client::new(self.stream);
        match client.login(user, pass).await {
            Ok(session) => ImapClient::start(session, io_timeout).await,
            Err((e, _)) => Err(ImapError::from_async("LOGIN", e).into_auth("LOGIN", None)),
        }
    }

    /// `AUTHENTICATE PLAIN` (with SASL-IR when offered).
    pub async fn authenticate_plain(self, user: &str, pass: &str) -> Result<ImapClient, ImapError> {
        let payload = format!("\0{user}\0{pass}").into_bytes();
        self.sasl("PLAIN", payload, b"").await
    }

    /// `AUTHENTICATE XOAUTH2` (Google/Microsoft style bearer token).
    pub async fn authenticate_xoauth2(
        self,
        user: &str,
        token: &str,
    ) -> Result<ImapClient, ImapError> {
        let payload = format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes();
        self.sasl("XOAUTH2", payload, b"").await
    }

    /// `AUTHENTICATE OAUTHBEARER` (RFC 7628).
    pub async fn authenticate_oauthbearer(
        self,
        user: &str,
        token: &str,
    ) -> Result<ImapClient, ImapError> {
        // gs2 saslname escaping (RFC 5801): ',' and '=' must not appear literally.
        let authzid = user.replace('=', "=3D").replace(',', "=2C");
        let payload = format!(
            "n,a={authzid},\x01host={}\x01port={}\x01auth=Bearer {token}\x01\x01",
            self.host, self.port
        )
        .into_bytes();
        self.sasl("OAUTHBEARER", payload, b"\x01").await
    }

    /// Authenticates with the best mechanism for the credentials: passwords use
    /// `AUTHENTICATE PLAIN` when offered, else `LOGIN`; tokens use `XOAUTH2`, else
    /// `OAUTHBEARER` (an error if the server offers neither).
    pub async fn authenticate(self, creds: &Credentials) -> Result<ImapClient, ImapError> {
        match creds {
            Credentials::Password { user, pass } => {
                if self.caps.has("AUTH=PLAIN") {
                    self.authenticate_plain(user, pass).await
                } else {
                    self.login(user, pass).await
                }
            }
            Credentials::OAuth2 { user, token } => {
                if self.caps.has("AUTH=XOAUTH2") {
                    self.authenticate_xoauth2(user, token).await
                } else if self.caps.has("AUTH=OAUTHBEARER") {
                    self.authenticate_oauthbearer(user, token).await
                } else {
                    Err(ImapError::Unsupported(format!(
                        "neither XOAUTH2 nor OAUTHBEARER offered (mechanisms: {})",
                        self.caps.auth_mechanisms().join(" ")
                    )))
                }
            }
        }
    }

    async fn sasl(
        self,
        mechanism: &'static str,
        payload: Vec<u8>,
        error_reply: &'static [u8],
    ) -> Result<ImapClient, ImapError> {
        let io_timeout = self.io_timeout;
        let sasl_ir = self.caps.has("SASL-IR");
        let mut state = Sasl {
            initial: Vec::new(),
            sent: sasl_ir,
            error_reply,
            server_error: None,
        };
        // async-imap puts `auth_type` verbatim after AUTHENTICATE, which is how the
        // initial response rides along (SASL-IR, RFC 4959).
        let command = if sasl_ir {
            format!(
                "{mechanism} {}",
                base64::engine::general_purpose::STANDARD.encode(&payload)
            )
        } else {
            state.initial = payload;
            mechanism.to_string()
        };
        let client = async_imap::Client::new(self.stream);
        let result = client.authenticate(command, &mut state).await;
        match result {
            Ok(session) => ImapClient::start(session, io_timeout).await,
            Err((e, _)) => Err(ImapError::from_async("AUTHENTICATE", e)
                .into_auth(mechanism, state.server_error.take())),
        }
    }
}

/// Reads one CRLF line byte by byte (only used before authentication, a few lines):
/// no read-ahead buffer, so a STARTTLS response cannot smuggle plaintext past the upgrade.
async fn read_line(stream: &mut MaybeTls, context: &'static str) -> Result<String, ImapError> {
    let mut line = Vec::with_capacity(256);
    loop {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ImapError::ConnectionLost(format!("during {context}")))
            }
            Err(e) => return Err(ImapError::io(context, e)),
        };
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_PREAUTH_LINE {
            return Err(ImapError::Protocol(format!(
                "{context} line longer than {MAX_PREAUTH_LINE} bytes"
            )));
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Checks the greeting; returns the capabilities if it carried them.
fn parse_greeting(line: &str) -> Result<Option<Capabilities>, ImapError> {
    if let Some(rest) = line.strip_prefix("* OK") {
        return Ok(caps_from_code(rest.trim_start()));
    }
    if let Some(rest) = line.strip_prefix("* BYE") {
        return Err(ImapError::Bye {
            text: codec::truncate(rest.trim(), 300),
        });
    }
    if line.starts_with("* PREAUTH") {
        return Err(ImapError::Unsupported(
            "PREAUTH greeting (pre-authenticated connection)".into(),
        ));
    }
    Err(ImapError::Protocol(format!(
        "unexpected greeting {:?}",
        codec::truncate(line, 200)
    )))
}

/// `[CAPABILITY a b c] text` → capabilities.
fn caps_from_code(text: &str) -> Option<Capabilities> {
    let inner = text.strip_prefix('[')?.split(']').next()?;
    let mut words = inner.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("CAPABILITY") {
        return None;
    }
    Some(Capabilities::from_words(words))
}

/// Sends a pre-auth command; returns the tagged status (`OK`/`NO`/`BAD`) and its text.
async fn raw_command(
    stream: &mut MaybeTls,
    tag: &str,
    command: &str,
) -> Result<(String, String), ImapError> {
    let context = "pre-auth command";
    let line = format!("{tag} {command}\r\n");
    stream
        .write_all(line.as_bytes())
        .await
        .map_err(|e| ImapError::io(context, e))?;
    stream
        .flush()
        .await
        .map_err(|e| ImapError::io(context, e))?;
    loop {
        let line = read_line(stream, context).await?;
        if let Some(rest) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) {
            let (status, text) = rest.split_once(' ').unwrap_or((rest, ""));
            return Ok((status.to_ascii_uppercase(), text.to_string()));
        }
        if let Some(rest) = line.strip_prefix("* BYE") {
            return Err(ImapError::Bye {
                text: codec::truncate(rest.trim(), 300),
            });
        }
    }
}

/// Pre-auth `CAPABILITY`, also picking up a capability list in the tagged OK.
async fn raw_capability(stream: &mut MaybeTls) -> Result<Capabilities, ImapError> {
    let context = "CAPABILITY";
    stream
        .write_all(b"C1 CAPABILITY\r\n")
        .await
        .map_err(|e| ImapError::io(context, e))?;
    stream
        .flush()
        .await
        .map_err(|e| ImapError::io(context, e))?;
    let mut caps = None;
    loop {
        let line = read_line(stream, context).await?;
        if let Some(rest) = line.strip_prefix("* CAPABILITY ") {
            caps = Some(Capabilities::from_words(rest.split_whitespace()));
        } else if let Some(rest) = line.strip_prefix("C1 ") {
            let (status, text) = rest.split_once(' ').unwrap_or((rest, ""));
            if !status.eq_ignore_ascii_case("OK") {
                let (code, text) = split_code(None, text);
                return Err(ImapError::No {
                    command: "CAPABILITY",
                    code,
                    text,
                });
            }
            return caps
                .or_else(|| caps_from_code(text))
                .ok_or_else(|| ImapError::Protocol("CAPABILITY returned no capabilities".into()));
        } else if let Some(rest) = line.strip_prefix("* BYE") {
            return Err(ImapError::Bye {
                text: codec::truncate(rest.trim(), 300),
            });
        }
    }
}

/// Sets the socket read time-out under TLS or not.
fn set_read_timeout(stream: &mut MaybeTls, timeout: Option<Duration>) {
    match stream {
        MaybeTls::Plain(tcp) => tcp.as_mut().set_read_timeout_pinned(timeout),
        MaybeTls::Tls(tls) => tls.get_mut().0.as_mut().set_read_timeout_pinned(timeout),
    }
}

#[derive(Debug, Clone)]
struct Selected {
    name: String,
    read_only: bool,
    permanent_flags: Vec<String>,
}

/// Tagged OK of a command: response code and text.
struct Done {
    code: Option<String>,
    copy_uid: Option<(u32, Vec<(u32, u32)>)>,
}

/// An authenticated IMAP session.
///
/// Not `Sync`-shared: use it from one task (`&mut self` everywhere). If a method's
/// future is dropped half-way (e.g. by an outer time-out), the connection is marked
/// unusable and every later call fails with [`ImapError::ConnectionLost`]: reconnect.
pub struct ImapClient {
    session: Option<Session>,
    caps: Capabilities,
    disabled: BTreeSet<String>,
    selected: Option<Selected>,
    events: Vec<ImapEvent>,
    io_timeout: Duration,
    qresync: bool,
    /// Set while a command runs; still set at the next call = the previous one was cancelled.
    in_flight: bool,
    bye: Option<String>,
    /// How folder names given to this client map to the server's names.
    names: FolderNames,
}

/// Folder names as the configuration writes them (`/` between levels) and
/// as the server knows them (its hierarchy delimiter from LIST, often `.`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderNames {
    /// Resolved names (configuration → server), e.g. from LIST.
    pub exact: std::collections::HashMap<String, String>,
    /// The server's hierarchy delimiter, if it has one.
    pub delimiter: Option<String>,
}

impl FolderNames {
    /// Names of a server from its LIST: its delimiter (INBOX's, else the
    /// first one given), nothing resolved yet.
    pub fn from_listing(listed: &[FolderInfo]) -> Self {
        let delimiter = listed
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case("INBOX"))
            .and_then(|f| f.delimiter.clone())
            .or_else(|| listed.iter().find_map(|f| f.delimiter.clone()));
        FolderNames {
            exact: std::collections::HashMap::new(),
            delimiter,
        }
    }

    /// The server's name for `name`: a resolved one, else `name` with `/`
    /// replaced by the server's delimiter.
    pub fn server_name(&self, name: &str) -> String {
        if let Some(n) = self.exact.get(name) {
            return n.clone();
        }
        match self.delimiter.as_deref() {
            Some(d) if d != "/" && !d.is_empty() => name.replace('/', d),
            _ => name.to_string(),
        }
    }

    /// The configuration's spelling of a server name (`/` between levels).
    pub fn config_name(&self, server: &str) -> String {
        match self.delimiter.as_deref() {
            Some(d) if d != "/" && !d.is_empty() => server.replace(d, "/"),
            _ => server.to_string(),
        }
    }
}

impl fmt::Debug for ImapClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapClient")
            .field("selected", &self.selected.as_ref().map(|s| &s.name))
            .field("connected", &self.session.is_some())
            .finish()
    }
}

impl ImapClient {
    /// Connects (see [`UnauthenticatedClient::connect`]); authenticate next.
    pub async fn connect(ep: &Endpoint) -> Result<UnauthenticatedClient, ImapError> {
        UnauthenticatedClient::connect(ep).await
    }

    /// Connects and authenticates in one go.
    pub async fn connect_and_authenticate(
        ep: &Endpoint,
        creds: &Credentials,
    ) -> Result<ImapClient, ImapError> {
        UnauthenticatedClient::connect(ep)
            .await?
            .authenticate(creds)
            .await
    }

    async fn start(session: Session, io_timeout: Duration) -> Result<Self, ImapError> {
        let mut client = ImapClient {
            session: Some(session),
            caps: Capabilities::default(),
            disabled: BTreeSet::new(),
            selected: None,
            events: Vec::new(),
            io_timeout,
            qresync: false,
            in_flight: false,
            bye: None,
            names: FolderNames::default(),
        };
        client.refresh_capabilities().await?;
        Ok(client)
    }

    // ----- command plumbing -------------------------------------------------------

    /// Runs one command. `on_data` sees every untagged response and returns true if it
    /// consumed it; the rest is checked for events. Fails on tagged NO/BAD.
    async fn exec<F>(
        &mut self,
        verb: &'static str,
        line: &str,
        mut on_data: F,
    ) -> Result<Done, ImapError>
    where
        F: FnMut(&Response<'_>) -> bool,
    {
        self.begin_command()?;
        let Some(session) = self.session.as_mut() else {
            return Err(ImapError::ConnectionLost("connection closed".into()));
        };
        let events = &mut self.events;
        let bye = &mut self.bye;
        let result = async {
            let id = session
                .run_command(line)
                .await
                .map_err(|e| ImapError::from_async(verb, e))?;
            loop {
                let resp = match session.read_response().await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        return Err(match bye.take() {
                            Some(text) => ImapError::Bye { text },
                            None => ImapError::ConnectionLost(format!("during {verb}")),
                        })
                    }
                    Err(e) => return Err(ImapError::io(verb, e)),
                };
                match resp.parsed() {
                    Response::Done {
                        tag,
                        status,
                        outcome,
                    } if *tag == id => {
                        let known = outcome.code.as_ref().map(code_name);
                        let copy_uid = outcome.code.as_ref().and_then(copy_uid_map);
                        let (code, text) =
                            split_code(known, outcome.information.as_deref().unwrap_or(""));
                        return match status {
                            Status::Ok => Ok(Done { code, copy_uid }),
                            Status::No => Err(ImapError::No {
                                command: verb,
                                code,
                                text,
                            }),
                            Status::Bad => Err(ImapError::Bad {
                                command: verb,
                                code,
                                text,
                            }),
                            other => Err(ImapError::Protocol(format!(
                                "{verb}: unexpected tagged status {other:?}"
                            ))),
                        };
                    }
                    parsed => {
                        if !on_data(parsed) {
                            note_untagged(events, bye, parsed);
                        }
                    }
                }
            }
        }
        .await;
        self.end_command(&result);
        result
    }

    /// Before a command: a command still in flight means the previous one
    /// was cancelled mid-way, so the stream is out of step and dropped.
    fn begin_command(&mut self) -> Result<(), ImapError> {
        if self.in_flight {
            self.session = None;
        }
        if self.session.is_none() {
            return Err(ImapError::ConnectionLost(
                "connection no longer usable after an earlier failure".into(),
            ));
        }
        self.in_flight = true;
        Ok(())
    }

    /// After a command: no longer in flight; a stream error leaves the
    /// connection out of step (half-read responses, a half-sent literal), so
    /// it is dropped.
    fn end_command<T>(&mut self, result: &Result<T, ImapError>) {
        self.in_flight = false;
        if let Err(e) = result {
            if matches!(
                e,
                ImapError::Io { .. }
                    | ImapError::ConnectionLost(_)
                    | ImapError::Bye { .. }
                    | ImapError::Protocol(_)
            ) {
                self.session = None;
            }
        }
        self.drain_channel();
    }

    /// Moves whatever async-imap queued in its unsolicited channel into our events.
    fn drain_channel(&mut self) {
        let Some(session) = self.session.as_ref() else {
            return;
        };
        while let Ok(u) = session.unsolicited_responses.try_recv() {
            match u {
                async_imap::types::UnsolicitedResponse::Exists(n) => {
                    self.events.push(ImapEvent::Exists(n))
                }
                async_imap::types::UnsolicitedResponse::Expunge(n) => {
                    self.events.push(ImapEvent::Expunge(n))
                }
                async_imap::types::UnsolicitedResponse::Other(resp) => {
                    note_untagged(&mut self.events, &mut self.bye, resp.parsed())
                }
                _ => {}
            }
        }
    }

    fn has_cap(&self, cap: &str) -> bool {
        self.caps.has(cap) && !self.disabled.contains(&cap.to_ascii_uppercase())
    }

    fn selected(&self) -> Result<&Selected, ImapError> {
        self.selected
            .as_ref()
            .ok_or_else(|| ImapError::InvalidInput("no folder selected".into()))
    }

    fn writable(&self) -> Result<&Selected, ImapError> {
        let sel = self.selected()?;
        if sel.read_only {
            return Err(ImapError::InvalidInput(format!(
                "folder {:?} is open read-only",
                sel.name
            )));
        }
        Ok(sel)
    }

    async fn refresh_capabilities(&mut self) -> Result<(), ImapError> {
        let mut words: Vec<String> = Vec::new();
        self.exec("CAPABILITY", "CAPABILITY", |r| match r {
            Response::Capabilities(list) => {
                words.extend(list.iter().map(|c| match c {
                    imap_proto::Capability::Imap4rev1 => "IMAP4REV1".to_string(),
                    imap_proto::Capability::Auth(m) => format!("AUTH={m}"),
                    imap_proto::Capability::Atom(a) => a.to_string(),
                }));
                true
            }
            _ => false,
        })
        .await?;
        self.caps = Capabilities::from_words(words.iter().map(String::as_str));
        Ok(())
    }

    // ----- public API ---------------------------------------------------------------

    /// Re-reads the capabilities (`CAPABILITY`).
    pub async fn capabilities(&mut self) -> Result<Capabilities, ImapError> {
        self.refresh_capabilities().await?;
        Ok(self.caps.clone())
    }

    /// Capabilities as last read (after authentication or [`Self::capabilities`]).
    pub fn cached_capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Pretends the server lacks `cap` (e.g. `"MOVE"`, `"CONDSTORE"`, `"IDLE"`): a
    /// workaround for servers with a broken extension, and used by tests.
    pub fn disable_capability(&mut self, cap: &str) {
        self.disabled.insert(cap.to_ascii_uppercase());
    }

    /// `ENABLE QRESYNC` if offered; afterwards expunges arrive as
    /// [`ImapEvent::Vanished`] (UIDs) instead of [`ImapEvent::Expunge`]. Returns whether
    /// it is now on.
    pub async fn enable_qresync(&mut self) -> Result<bool, ImapError> {
        if !self.has_cap("QRESYNC") || !self.has_cap("ENABLE") {
            return Ok(false);
        }
        // Dovecot answers `* ENABLED QRESYNC`, which imap-proto does not model; a tagged
        // OK after ENABLE of an offered extension means it is on (RFC 5161 §3.1).
        self.exec("ENABLE", "ENABLE QRESYNC", |_| false).await?;
        self.qresync = true;
        Ok(true)
    }

    /// Events (EXISTS/EXPUNGE/VANISHED) seen since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<ImapEvent> {
        self.drain_channel();
        std::mem::take(&mut self.events)
    }

    /// Sets how the folder names given to [`Self::select`], [`Self::move_to`]
    /// and friends map to the server's (see [`FolderNames`]).
    pub fn set_folder_names(&mut self, names: FolderNames) {
        self.names = names;
    }

    /// The selected folder (as given to [`Self::select`]), if any.
    pub fn selected_folder(&self) -> Option<&str> {
        self.selected.as_ref().map(|s| s.name.as_str())
    }

    /// All folders (`LIST "" "*"`, with `RETURN (SPECIAL-USE)` where supported).
    pub async fn list_folders(&mut self) -> Result<Vec<FolderInfo>, ImapError> {
        let command = if self.has_cap("SPECIAL-USE") && self.has_cap("LIST-EXTENDED") {
            r#"LIST "" "*" RETURN (SPECIAL-USE)"#
        } else {
            r#"LIST "" "*""#
        };
        let mut folders = Vec::new();
        self.exec("LIST", command, |r| match r {
            Response::MailboxData(MailboxDatum::List(data)) => {
                let mut special_use = None;
                let attributes = data
                    .name_attributes
                    .iter()
                    .map(|a| {
                        let (text, su) = name_attribute(a);
                        special_use = special_use.or(su);
                        text
                    })
                    .collect();
                let raw = data.name.as_ref();
                folders.push(FolderInfo {
                    name: mutf7_decode(raw).unwrap_or_else(|| raw.to_string()),
                    delimiter: data.delimiter.as_ref().map(|d| d.to_string()),
                    attributes,
                    special_use,
                });
                true
            }
            _ => false,
        })
        .await?;
        Ok(folders)
    }

    /// `CREATE` (and `SUBSCRIBE`, so other clients show it). Succeeds if it already exists.
    pub async fn create_folder(&mut self, name: &str) -> Result<(), ImapError> {
        let q = quote(&mutf7_encode(&self.names.server_name(name)))?;
        match self.exec("CREATE", &format!("CREATE {q}"), |_| false).await {
            Ok(_) => {}
            Err(ImapError::No {
                code: Some(code), ..
            }) if code == "ALREADYEXISTS" => {}
            Err(e) => return Err(e),
        }
        match self
            .exec("SUBSCRIBE", &format!("SUBSCRIBE {q}"), |_| false)
            .await
        {
            // Subscription is cosmetic; a server refusing it must not fail the sync.
            Err(ImapError::No { .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `SELECT` (read-write), with `(CONDSTORE)` when offered. Discards pending events
    /// of the previously selected folder.
    pub async fn select(&mut self, folder: &str) -> Result<FolderState, ImapError> {
        self.open("SELECT", folder).await
    }

    /// `EXAMINE` (read-only), with `(CONDSTORE)` when offered.
    pub async fn examine(&mut self, folder: &str) -> Result<FolderState, ImapError> {
        self.open("EXAMINE", folder).await
    }

    async fn open(&mut self, verb: &'static str, folder: &str) -> Result<FolderState, ImapError> {
        let q = quote(&mutf7_encode(&self.names.server_name(folder)))?;
        let condstore = self.has_cap("CONDSTORE");
        let line = if condstore {
            format!("{verb} {q} (CONDSTORE)")
        } else {
            format!("{verb} {q}")
        };
        // A failed SELECT leaves no folder selected (RFC 3501 §6.3.1).
        self.selected = None;
        self.events.clear();
        let mut uidvalidity = None;
        let mut uidnext = None;
        let mut highest_modseq = None;
        let mut exists = 0;
        let mut permanent_flags = Vec::new();
        let done = self
            .exec(verb, &line, |r| match r {
                Response::MailboxData(MailboxDatum::Exists(n)) => {
                    exists = *n;
                    true
                }
                Response::Data {
                    status: Status::Ok,
                    outcome,
                } => {
                    match &outcome.code {
                        Some(ResponseCode::UidValidity(v)) => uidvalidity = Some(*v),
                        Some(ResponseCode::UidNext(v)) => uidnext = Some(*v),
                        Some(ResponseCode::HighestModSeq(v)) => highest_modseq = Some(*v),
                        Some(ResponseCode::PermanentFlags(f)) => {
                            permanent_flags = f.iter().map(|s| s.to_string()).collect()
                        }
                        _ => {}
                    }
                    true
                }
                _ => false,
            })
            .await;
        let done = match done {
            Ok(d) => d,
            Err(e) => return Err(self.explain_open_failure(folder, e).await),
        };
        let uidvalidity = uidvalidity.ok_or_else(|| {
            ImapError::Protocol(format!("{verb} {folder:?}: server sent no UIDVALIDITY"))
        })?;
        let read_only = verb == "EXAMINE" || done.code.as_deref() == Some("READ-ONLY");
        self.events.clear(); // EXISTS etc. of the SELECT itself are state, not news
        self.selected = Some(Selected {
            name: folder.to_string(),
            read_only,
            permanent_flags: permanent_flags.clone(),
        });
        tracing::debug!(
            folder,
            uidvalidity,
            ?uidnext,
            ?highest_modseq,
            exists,
            read_only,
            "IMAP {verb}"
        );
        Ok(FolderState {
            uidvalidity,
            uidnext,
            highest_modseq,
            exists,
            read_only,
            permanent_flags,
        })
    }

    /// Dovecot 2.3 answers SELECT of a missing folder with a bare `NO Mailbox doesn't
    /// exist` (no `[NONEXISTENT]`), so a code-less NO is checked with `LIST`.
    async fn explain_open_failure(&mut self, folder: &str, e: ImapError) -> ImapError {
        let e = e.folder_context(folder);
        let ImapError::No {
            code: None, text, ..
        } = &e
        else {
            return e;
        };
        let text = text.clone();
        let server_name = self.names.server_name(folder);
        let Ok(q) = quote(&mutf7_encode(&server_name)) else {
            return e;
        };
        let mut listed: Option<bool> = None;
        let res = self
            .exec("LIST", &format!("LIST \"\" {q}"), |r| match r {
                Response::MailboxData(MailboxDatum::List(data)) => {
                    if mutf7_decode(&data.name).as_deref() == Some(server_name.as_str()) {
                        let selectable = !data.name_attributes.iter().any(|a| {
                            matches!(a, NameAttribute::NoSelect)
                                || matches!(a, NameAttribute::Extension(x) if x.eq_ignore_ascii_case("\\NonExistent"))
                        });
                        listed = Some(selectable);
                    }
                    true
                }
                _ => false,
            })
            .await;
        match (res, listed) {
            (Ok(_), None) => ImapError::FolderMissing {
                folder: folder.to_string(),
                code: None,
                text,
            },
            (Ok(_), Some(false)) => ImapError::FolderMissing {
                folder: folder.to_string(),
                code: None,
                text: format!("{text} (listed as \\Noselect)"),
            },
            _ => e,
        }
    }

    async fn uid_search(&mut self, criteria: &str) -> Result<Vec<u32>, ImapError> {
        self.selected()?;
        let mut uids = Vec::new();
        self.exec(
            "UID SEARCH",
            &format!("UID SEARCH {criteria}"),
            |r| match r {
                Response::MailboxData(MailboxDatum::Search(v)) => {
                    uids.extend_from_slice(v);
                    true
                }
                _ => false,
            },
        )
        .await?;
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    /// UIDs of messages with INTERNALDATE on or after `date` (`UID SEARCH SINCE`;
    /// the server compares in its own time zone). Ascending.
    pub async fn search_since(&mut self, date: ImapDate) -> Result<Vec<u32>, ImapError> {
        self.uid_search(&format!("SINCE {date}")).await
    }

    /// UIDs ≥ `start_uid`, ascending. `UID SEARCH UID n:*` always matches the last
    /// message even when its UID is below `n`, so the result is filtered.
    pub async fn uids_from(&mut self, start_uid: u32) -> Result<Vec<u32>, ImapError> {
        let start = start_uid.max(1);
        let mut uids = self.uid_search(&format!("UID {start}:*")).await?;
        uids.retain(|&u| u >= start);
        Ok(uids)
    }

    /// UIDs ≥ `start_uid` with INTERNALDATE on or after `date`, ascending (same
    /// `n:*` filtering as [`ImapClient::uids_from`]).
    pub async fn uids_from_since(
        &mut self,
        start_uid: u32,
        date: ImapDate,
    ) -> Result<Vec<u32>, ImapError> {
        let start = start_uid.max(1);
        let mut uids = self
            .uid_search(&format!("UID {start}:* SINCE {date}"))
            .await?;
        uids.retain(|&u| u >= start);
        Ok(uids)
    }

    /// Which of `uids` still exist in the selected folder (`UID SEARCH UID set`),
    /// ascending: tells a message expunged meanwhile from one the server
    /// will not deliver.
    pub async fn existing_uids(&mut self, uids: &[u32]) -> Result<Vec<u32>, ImapError> {
        let wanted = sorted_unique(uids);
        let mut out = Vec::with_capacity(wanted.len());
        for set in uid_sets(&wanted, MAX_UID_SET_LEN) {
            let found = self.uid_search(&format!("UID {set}")).await?;
            // `UID n` of a missing n matches nothing, but `n:*` forms may
            // match the last message: keep only what was asked for.
            out.extend(
                found
                    .into_iter()
                    .filter(|u| wanted.binary_search(u).is_ok()),
            );
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// False once the connection is unusable (an I/O error, BYE, or a
    /// command cancelled half-way): reconnect.
    pub fn is_connected(&self) -> bool {
        self.session.is_some() && !self.in_flight
    }

    /// Deletes messages: `\Deleted` then `UID EXPUNGE` (plain `EXPUNGE` without UIDPLUS,
    /// which also removes other `\Deleted` messages of the folder, as any client would).
    pub async fn delete(&mut self, uids: &[u32]) -> Result<(), ImapError> {
        self.writable()?;
        let uidplus = self.has_cap("UIDPLUS");
        for set in uid_sets(uids, MAX_UID_SET_LEN) {
            self.exec(
                "UID STORE",
                &format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"),
                |r| matches!(r, Response::Fetch(..)),
            )
            .await?;
            if uidplus {
                self.exec("UID EXPUNGE", &format!("UID EXPUNGE {set}"), |_| false)
                    .await?;
            } else {
                self.exec("EXPUNGE", "EXPUNGE", |_| false).await?;
            }
        }
        Ok(())
    }

    /// Fetches whole messages (`BODY.PEEK[]`, so `\Seen` is not set) with UID, FLAGS,
    /// INTERNALDATE and RFC822.SIZE. The caller bounds the batch size; long scattered
    /// UID lists are split into several commands. UIDs that no longer exist are
    /// simply missing from the result, which is sorted by UID.
    pub async fn fetch_messages(&mut self, uids: &[u32]) -> Result<Vec<FetchedMail>, ImapError> {
        self.selected()?;
        let wanted = sorted_unique(uids);
        let mut out = Vec::with_capacity(wanted.len());
        for set in uid_sets(&wanted, MAX_UID_SET_LEN) {
            let line = format!("UID FETCH {set} (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])");
            self.exec("UID FETCH", &line, |r| {
                let Response::Fetch(_, attrs) = r else {
                    return false;
                };
                let mut mail = FetchedMail {
                    uid: 0,
                    internal_date: None,
                    flags: Vec::new(),
                    size: 0,
                    raw: Vec::new(),
                };
                let mut has_body = false;
                for a in attrs {
                    match a {
                        AttributeValue::Uid(u) => mail.uid = *u,
                        AttributeValue::Flags(f) => {
                            mail.flags = f.iter().map(|s| s.to_string()).collect()
                        }
                        AttributeValue::InternalDate(d) => {
                            mail.internal_date = codec::parse_internal_date(d)
                        }
                        AttributeValue::Rfc822Size(s) => mail.size = *s,
                        AttributeValue::BodySection { data: Some(d), .. }
                        | AttributeValue::Rfc822(Some(d)) => {
                            mail.raw = d.to_vec();
                            has_body = true;
                        }
                        _ => {}
                    }
                }
                // Unsolicited FETCH (flag changes by others) carries no body: not ours.
                if has_body && mail.uid != 0 && wanted.binary_search(&mail.uid).is_ok() {
                    out.push(mail);
                    true
                } else {
                    false
                }
            })
            .await?;
        }
        out.sort_by_key(|m| m.uid);
        out.dedup_by_key(|m| m.uid);
        Ok(out)
    }

    /// `Message-ID` of each UID (`BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]`), to recognise
    /// messages that moved between folders. Sorted by UID; `None` if a message has none.
    pub async fn fetch_message_ids(
        &mut self,
        uids: &[u32],
    ) -> Result<Vec<(u32, Option<String>)>, ImapError> {
        self.fetch_attribute(uids, "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]", |a| match a {
            AttributeValue::BodySection { data, .. } => {
                Some(data.as_deref().and_then(codec::extract_message_id))
            }
            _ => None,
        })
        .await
    }

    /// INTERNALDATE (Unix seconds) of each UID, sorted by UID; `None` where the
    /// server sent none we could parse. Used to merge folders in arrival order.
    pub async fn fetch_internal_dates(
        &mut self,
        uids: &[u32],
    ) -> Result<Vec<(u32, Option<i64>)>, ImapError> {
        self.fetch_attribute(uids, "INTERNALDATE", |a| match a {
            AttributeValue::InternalDate(d) => Some(codec::parse_internal_date(d)),
            _ => None,
        })
        .await
    }

    /// RFC822.SIZE of each UID, sorted by UID: checked before downloading, so a
    /// message over the size cap is never transferred.
    pub async fn fetch_sizes(&mut self, uids: &[u32]) -> Result<Vec<(u32, u32)>, ImapError> {
        self.fetch_attribute(uids, "RFC822.SIZE", |a| match a {
            AttributeValue::Rfc822Size(s) => Some(*s),
            _ => None,
        })
        .await
    }

    /// `UID FETCH set (UID item)` in bounded UID sets: one value per requested
    /// UID, picked from the response by `pick`, sorted by UID and deduplicated.
    /// Responses for UIDs not asked for (unsolicited FETCH) or without the item
    /// are left to the unsolicited-response handling.
    async fn fetch_attribute<T>(
        &mut self,
        uids: &[u32],
        item: &str,
        mut pick: impl FnMut(&AttributeValue<'_>) -> Option<T>,
    ) -> Result<Vec<(u32, T)>, ImapError> {
        self.selected()?;
        let wanted = sorted_unique(uids);
        let mut out = Vec::with_capacity(wanted.len());
        for set in uid_sets(&wanted, MAX_UID_SET_LEN) {
            let line = format!("UID FETCH {set} (UID {item})");
            self.exec("UID FETCH", &line, |r| {
                let Response::Fetch(_, attrs) = r else {
                    return false;
                };
                let mut uid = 0;
                let mut value = None;
                for a in attrs {
                    match a {
                        AttributeValue::Uid(u) => uid = *u,
                        other => {
                            if let Some(v) = pick(other) {
                                value = Some(v);
                            }
                        }
                    }
                }
                match value {
                    Some(v) if uid != 0 && wanted.binary_search(&uid).is_ok() => {
                        out.push((uid, v));
                        true
                    }
                    _ => false,
                }
            })
            .await?;
        }
        out.sort_by_key(|m| m.0);
        out.dedup_by_key(|m| m.0);
        Ok(out)
    }

    /// True if PERMANENTFLAGS of the selected folder contains `\*` (new keywords can
    /// be stored). False without a selected folder.
    pub fn can_set_keywords(&self) -> bool {
        self.selected
            .as_ref()
            .is_some_and(|s| s.permanent_flags.iter().any(|f| f == "\\*"))
    }

    /// Adds a keyword such as [`CRM_KEYWORD`] (`UID STORE … +FLAGS.SILENT`). Fails with
    /// [`ImapError::Unsupported`] unless PERMANENTFLAGS allows `\*` or lists the keyword.
    pub async fn add_keyword(&mut self, uids: &[u32], keyword: &str) -> Result<(), ImapError> {
        if !codec::is_keyword_atom(keyword) {
            return Err(ImapError::InvalidInput(format!(
                "{keyword:?} is not a valid keyword"
            )));
        }
        let sel = self.writable()?;
        let allowed = sel
            .permanent_flags
            .iter()
            .any(|f| f == "\\*" || f.eq_ignore_ascii_case(keyword));
        if !allowed {
            return Err(ImapError::Unsupported(format!(
                "folder {:?} does not allow keyword {keyword} (PERMANENTFLAGS {})",
                sel.name,
                sel.permanent_flags.join(" ")
            )));
        }
        for set in uid_sets(uids, MAX_UID_SET_LEN) {
            self.exec(
                "UID STORE",
                &format!("UID STORE {set} +FLAGS.SILENT ({keyword})"),
                |r| matches!(r, Response::Fetch(..)),
            )
            .await?;
        }
        Ok(())
    }

    /// Moves messages to `folder`: `UID MOVE` when offered; else `UID COPY` +
    /// `\Deleted` + `UID EXPUNGE` (UIDPLUS); else plain `EXPUNGE`, which also removes
    /// any other message already flagged `\Deleted` in the folder.
    pub async fn move_to(&mut self, uids: &[u32], folder: &str) -> Result<MoveOutcome, ImapError> {
        self.writable()?;
        let target = quote(&mutf7_encode(&self.names.server_name(folder)))?;
        let mut outcome = MoveOutcome::default();
        let use_move = self.has_cap("MOVE");
        let uidplus = self.has_cap("UIDPLUS");
        for set in uid_sets(uids, MAX_UID_SET_LEN) {
            let mut untagged_copyuid = None;
            let mut grab = |r: &Response<'_>| match r {
                // MOVE reports COPYUID in an untagged OK before the EXPUNGEs (RFC 6851).
                Response::Data {
                    status: Status::Ok,
                    outcome,
                } => {
                    if let Some(m) = outcome.code.as_ref().and_then(copy_uid_map) {
                        untagged_copyuid = Some(m);
                    }
                    true
                }
                Response::Fetch(..) => true,
                _ => false,
            };
            let done = if use_move {
                self.exec("UID MOVE", &format!("UID MOVE {set} {target}"), &mut grab)
                    .await
            } else {
                self.exec("UID COPY", &format!("UID COPY {set} {target}"), &mut grab)
                    .await
            }
            .map_err(|e| e.folder_context(folder))?;
            if let Some((validity, map)) = done.copy_uid.or(untagged_copyuid) {
                outcome.target_uidvalidity = Some(validity);
                outcome.uid_map.extend(map);
            }
            if !use_move {
                let fetch_only = |r: &Response<'_>| matches!(r, Response::Fetch(..));
                self.exec(
                    "UID STORE",
                    &format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"),
                    fetch_only,
                )
                .await?;
                if uidplus {
                    self.exec("UID EXPUNGE", &format!("UID EXPUNGE {set}"), |_| false)
                        .await?;
                } else {
                    self.exec("EXPUNGE", "EXPUNGE", |_| false).await?;
                }
            }
        }
        Ok(outcome)
    }

    /// `NOOP`; returns all pending events (same as [`Self::take_events`] afterwards).
    pub async fn noop(&mut self) -> Result<Vec<ImapEvent>, ImapError> {
        self.exec("NOOP", "NOOP", |_| false).await?;
        Ok(self.take_events())
    }

    /// Waits in IDLE until the server reports something or `max` (capped at
    /// [`MAX_IDLE`]) passes. The caller loops; re-issuing is therefore automatic.
    ///
    /// Time-outs: the socket read time-out (`io_timeout`) is lifted while idling,
    /// because servers are silent for minutes (Dovecot's keepalive is every 2 min)
    /// and async-imap has no notion of it. The wait is bounded by `max` instead; the
    /// `DONE` exchange afterwards runs under `io_timeout` again, so a dead peer is
    /// noticed at the latest `max + io_timeout` after IDLE began. Pick `max` (e.g.
    /// 5–10 min) with that detection delay in mind.
    pub async fn idle_wait(&mut self, max: Duration) -> Result<IdleOutcome, ImapError> {
        if !self.has_cap("IDLE") {
            return Ok(IdleOutcome::Unsupported);
        }
        self.selected()?;
        let max = max.min(MAX_IDLE);
        if self.in_flight {
            self.session = None;
        }
        let session = self.session.take().ok_or_else(|| {
            ImapError::ConnectionLost("connection no longer usable after an earlier failure".into())
        })?;
        // Until this returns, `self.session` is None: if the future is dropped
        // mid-IDLE, the client is unusable, as documented on the type.
        let pending = session.unsolicited_responses.clone();
        let mut handle = session.idle();
        handle
            .init()
            .await
            .map_err(|e| ImapError::from_async("IDLE", e))?;
        let started = Instant::now();
        // Responses that came with the `+` went to async-imap's channel: already news.
        let mut outcome = if pending.is_empty() {
            None
        } else {
            Some(IdleOutcome::NewData)
        };
        if outcome.is_none() {
            set_read_timeout(handle.as_mut(), None);
            let (wait, _stop) = handle.wait_with_timeout(max);
            let res = tokio::time::timeout(max, wait).await;
            outcome = Some(match res {
                Err(_) => IdleOutcome::Timeout,
                Ok(Ok(async_imap::extensions::idle::IdleResponse::Timeout)) => IdleOutcome::Timeout,
                Ok(Ok(async_imap::extensions::idle::IdleResponse::NewData(resp))) => {
                    if let Response::Data {
                        status: Status::Bye,
                        outcome,
                    } = resp.parsed()
                    {
                        let text = outcome.information.as_deref().unwrap_or("").to_string();
                        return Err(ImapError::Bye { text });
                    }
                    note_untagged(&mut self.events, &mut self.bye, resp.parsed());
                    IdleOutcome::NewData
                }
                // We never trigger the stop source, so this is the stream ending.
                Ok(Ok(async_imap::extensions::idle::IdleResponse::ManualInterrupt)) => {
                    return Err(ImapError::ConnectionLost("during IDLE".into()))
                }
                Ok(Err(e)) => return Err(ImapError::from_async("IDLE", e)),
            });
        }
        set_read_timeout(handle.as_mut(), Some(self.io_timeout));
        let session = handle
            .done()
            .await
            .map_err(|e| ImapError::from_async("IDLE", e))?;
        self.session = Some(session);
        self.drain_channel();
        let outcome = outcome.unwrap_or(IdleOutcome::Timeout);
        tracing::trace!(
            ?outcome,
            waited_ms = started.elapsed().as_millis() as u64,
            "IMAP IDLE ended"
        );
        Ok(outcome)
    }

    /// `LOGOUT`; a server that just closes the connection is fine too.
    pub async fn logout(mut self) -> Result<(), ImapError> {
        match self
            .exec("LOGOUT", "LOGOUT", |r| {
                matches!(
                    r,
                    Response::Data {
                        status: Status::Bye,
                        ..
                    }
                )
            })
            .await
        {
            Ok(_) | Err(ImapError::ConnectionLost(_)) | Err(ImapError::Bye { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn sorted_unique(uids: &[u32]) -> Vec<u32> {
    let mut v = uids.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// Records EXISTS/EXPUNGE/VANISHED and remembers a BYE text.
fn note_untagged(events: &mut Vec<ImapEvent>, bye: &mut Option<String>, r: &Response<'_>) {
    match r {
        Response::MailboxData(MailboxDatum::Exists(n)) => events.push(ImapEvent::Exists(*n)),
        Response::Expunge(n) => events.push(ImapEvent::Expunge(*n)),
        Response::Vanished { earlier, uids } => events.push(ImapEvent::Vanished {
            earlier: *earlier,
            uids: uids.clone(),
        }),
        Response::Data {
            status: Status::Bye,
            outcome,
        } => {
            *bye = Some(codec::truncate(
                outcome.information.as_deref().unwrap_or(""),
                300,
            ))
        }
        _ => {}
    }
}

/// COPYUID (RFC 4315) → target UIDVALIDITY and (source, target) UID pairs.
fn copy_uid_map(code: &ResponseCode<'_>) -> Option<(u32, Vec<(u32, u32)>)> {
    let ResponseCode::CopyUid(validity, src, dst) = code else {
        return None;
    };
    let expand = |set: &[imap_proto::rfc4315::UidSetMember]| -> Vec<u32> {
        set.iter()
            .flat_map(|m| match m {
                imap_proto::rfc4315::UidSetMember::Uid(u) => *u..=*u,
                imap_proto::rfc4315::UidSetMember::UidRange(r) => r.clone(),
            })
            .collect()
    };
    let (src, dst) = (expand(src), expand(dst));
    (src.len() == dst.len()).then(|| (*validity, src.into_iter().zip(dst).collect()))
}

fn name_attribute(a: &NameAttribute<'_>) -> (String, Option<SpecialUse>) {
    match a {
        NameAttribute::NoInferiors => ("\\Noinferiors".into(), None),
        NameAttribute::NoSelect => ("\\Noselect".into(), None),
        NameAttribute::Marked => ("\\Marked".into(), None),
        NameAttribute::Unmarked => ("\\Unmarked".into(), None),
        NameAttribute::All => ("\\All".into(), Some(SpecialUse::All)),
        NameAttribute::Archive => ("\\Archive".into(), Some(SpecialUse::Archive)),
        NameAttribute::Drafts => ("\\Drafts".into(), Some(SpecialUse::Drafts)),
        NameAttribute::Flagged => ("\\Flagged".into(), Some(SpecialUse::Flagged)),
        NameAttribute::Junk => ("\\Junk".into(), Some(SpecialUse::Junk)),
        NameAttribute::Sent => ("\\Sent".into(), Some(SpecialUse::Sent)),
        NameAttribute::Trash => ("\\Trash".into(), Some(SpecialUse::Trash)),
        NameAttribute::Extension(s) => (s.to_string(), None),
        other => (format!("{other:?}"), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_parsing() {
        let caps = parse_greeting("* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready")
            .unwrap()
            .unwrap();
        assert!(caps.has("starttls"));
        assert_eq!(caps.auth_mechanisms(), vec!["PLAIN"]);
        assert!(parse_greeting("* OK ready").unwrap().is_none());
        assert!(matches!(
            parse_greeting("* BYE busy"),
            Err(ImapError::Bye { .. })
        ));
        assert!(matches!(
            parse_greeting("junk"),
            Err(ImapError::Protocol(_))
        ));
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = Credentials::Password {
            user: "u".into(),
            pass: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = Credentials::OAuth2 {
            user: "u".into(),
            token: "tok123".into(),
        };
        assert!(!format!("{c:?}").contains("tok123"));
    }

    /// A scripted server for the one path Dovecot cannot show: no STARTTLS offered.
    #[tokio::test]
    async fn starttls_missing_is_permanent_and_never_plaintext() {
        use crate::error::{Classify, Disposition};
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, mut w) = sock.into_split();
            w.write_all(b"* OK IMAP4rev1 ready\r\n").await.unwrap();
            let mut lines = tokio::io::BufReader::new(r).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push(line.clone());
                if line.starts_with("C1 CAPABILITY") {
                    w.write_all(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC1 OK done\r\n")
                        .await
                        .unwrap();
                }
            }
            seen
        });
        let ep = Endpoint {
            host: "127.0.0.1".into(),
            port,
            tls: TlsMode::StartTls,
            tls_server_name: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
        };
        let err = UnauthenticatedClient::connect(&ep).await.unwrap_err();
        assert!(matches!(err, ImapError::NoStartTls { .. }), "{err}");
        assert_eq!(err.disposition(), Disposition::Permanent);
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            vec!["C1 CAPABILITY".to_string()],
            "nothing but CAPABILITY may be sent"
        );
    }
}
