//! A local, stateful stand-in for Microsoft Graph mail (v1.0) and its
//! Microsoft Entra ID token endpoint, for tests and benchmarks only (never
//! part of the daemon). Graph cannot run here; this follows its documented
//! wire format (`../shared/reference/dataverse-graph.md`, the
//! microsoft-graph-docs pages for message delta, mailFolder, message move,
//! update, `$value` and sendMail) closely enough that the connector cannot
//! tell. Where the docs and this file disagree, the docs win.
//!
//! What it serves (`{graph}` = `http://127.0.0.1:P/v1.0`):
//! - `POST /{tenant}/oauth2/v2.0/token`: client credentials with a secret or
//!   an RS256 client assertion (`x5t#S256` of the registered certificate,
//!   `aud` = the token URL, signature checked); scope
//!   `https://graph.microsoft.com/.default`; refusals as Entra gives them
//!   (`invalid_client` AADSTS7000215 wrong secret, AADSTS7000222 expired
//!   secret, `unauthorized_client` AADSTS700016 unknown app).
//! - `GET {graph}/users/{id|email}/mailFolders[/{id|wellKnownName}[/childFolders]]`
//!   with `$top`/`$skip` paging; `POST` to create (`409 ErrorFolderExists`).
//! - `GET …/mailFolders/{id}/messages/delta`: real rounds. The first request
//!   snapshots the folder; `@odata.nextLink` (`$skiptoken`) pages through it
//!   by `Prefer: odata.maxpagesize` (default 10); the last page carries
//!   `@odata.deltaLink` (`$deltatoken`), whose next round lists what changed
//!   after the snapshot: new or changed messages (a category PATCH is a
//!   change) and, as `{"id", "@removed": {"reason": "deleted"}}`, messages
//!   moved out or deleted. Links may be asked again (same answer). `$select`
//!   and `$filter=receivedDateTime ge|gt …` are honoured; anything else in
//!   `$filter` is a 400. An expired sync state answers `410 Gone`
//!   `SyncStateNotFound`.
//! - `GET …/mailFolders/{id}/messages` (`$filter=internetMessageId eq '…'`,
//!   `$select`, `$top`), `GET|PATCH|DELETE …/messages/{id}` (DELETE moves to
//!   Deleted Items), `GET …/messages/{id}/$value` (the MIME), `POST
//!   …/messages/{id}/move` (`201`, same immutable id).
//! - `POST …/sendMail`: MIME (`Content-Type: text/plain`, base64) or JSON;
//!   `202 Accepted` with no body; the copy lands in Sent Items (after an
//!   optional delay: 202 is not delivery) keeping the MIME's Message-ID, and
//!   in the Inbox of every recipient who is a mailbox here. Bad base64 →
//!   `400 ErrorMimeContentInvalidBase64String`; a From that is not the
//!   mailbox → `403 ErrorSendAsDenied`.
//! - Ids are immutable only when the request says `Prefer:
//!   IdType="ImmutableId"` (counted when missing, as Graph would hand out
//!   ids that change on a move).
//! - Errors `{"error":{"code","message","innerError":{…}}}`; a missing,
//!   unknown or expired token is `401 InvalidAuthenticationToken` with
//!   `WWW-Authenticate`; an unknown user `404 ErrorInvalidUser`; a mailbox
//!   outside the app's RBAC scope `403 ErrorAccessDenied`.
//! - Limits and faults: never more than 4 requests in flight per mailbox
//!   (a fifth is answered `429 MailboxConcurrency` and counted as a
//!   violation), switchable 429 with `Retry-After` (a share of requests, or
//!   the next N; fractional values allowed) with a check that the same
//!   request does not come back before it, 503, a delay on every request,
//!   token expiry, expired delta states.
// Test support: not every test uses every helper.
#![allow(dead_code)]

#[path = "../entra.rs"]
mod entra;
mod extended;
mod handlers;
#[path = "../query.rs"]
mod query;
mod token;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// Well-known folders every mailbox has: (well-known name, display name).
const WELL_KNOWN: &[(&str, &str)] = &[
    ("inbox", "Inbox"),
    ("sentitems", "Sent Items"),
    ("deleteditems", "Deleted Items"),
    ("drafts", "Drafts"),
    ("junkemail", "Junk Email"),
    ("archive", "Archive"),
];

/// The scope of app-only Graph tokens.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// Counters the tests assert on.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Graph requests (not the token endpoint).
    pub requests: u64,
    /// `$value` downloads answered 200.
    pub downloads: u64,
    /// Delta pages answered 200.
    pub delta_pages: u64,
    /// Answered 429 by the injected throttling.
    pub throttled: u64,
    /// A request that came back before the `Retry-After` of its own 429.
    pub early_retries: u64,
    pub unavailable: u64,
    /// Answered 401.
    pub unauthorized: u64,
    /// Answered 410 (expired sync state).
    pub gone: u64,
    /// Requests without `Prefer: IdType="ImmutableId"`.
    pub without_immutable_ids: u64,
    /// A fifth concurrent request to one mailbox.
    pub concurrency_violations: u64,
    /// Requests past Graph's 10,000 per 10 minutes per app and mailbox
    /// (answered 429 `ApplicationThrottled`).
    pub over_mailbox_limit: u64,
    /// Highest number of requests in flight to one mailbox.
    pub peak_in_flight: usize,
    pub tokens_issued: u64,
    pub token_refusals: u64,
    /// Accepted sendMail requests.
    pub sends: u64,
    pub patches: u64,
    /// `GET …/messages/{id}` (not `$value`).
    pub message_reads: u64,
    pub moves: u64,
    /// Accepted `PATCH …/mailFolders/{id}` (extended properties, renames).
    pub folder_patches: u64,
}

/// One Graph request as the stand-in saw it (the request log).
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    /// The mailbox (lower-case email) or the `/users/{id}` segment as sent.
    pub user: String,
    /// After `/users/{id}/`, `mailFolders('x')` written `mailFolders/x`.
    pub path: String,
    /// Decoded query pairs, in order.
    pub query: Vec<(String, String)>,
    pub status: u16,
    /// When it was answered (the test's clock).
    pub at: Instant,
}

impl LoggedRequest {
    /// The decoded value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One message as the tests see it.
#[derive(Debug, Clone)]
pub struct MessageView {
    pub id: String,
    /// Display path of its folder (`Inbox/Orders`).
    pub folder: String,
    pub internet_message_id: Option<String>,
    pub subject: String,
    pub categories: Vec<String>,
    pub mime: Arc<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub(crate) struct FolderRec {
    pub id: String,
    pub name: String,
    /// `None` only for the root (`msgfolderroot`).
    pub parent: Option<String>,
    pub well_known: Option<&'static str>,
    /// Single-value extended properties: the id's canonical form → (the id
    /// as written, value).
    pub props: HashMap<String, (String, String)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub id: String,
    pub folder: String,
    pub mime: Arc<Vec<u8>>,
    pub internet_message_id: Option<String>,
    pub subject: String,
    pub from: Option<String>,
    pub to: Vec<String>,
    /// Thread-Index, base64 as Graph shows `conversationIndex`.
    pub conversation_index: Option<String>,
    pub conversation_id: String,
    pub received: DateTime<Utc>,
    pub categories: Vec<String>,
    pub is_read: bool,
    /// The mailbox's change counter when it last changed.
    pub seq: u64,
}

/// A message moved out of or deleted from `folder` at `seq`.
#[derive(Debug, Clone)]
pub(crate) struct Tombstone {
    pub folder: String,
    pub id: String,
    pub seq: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    /// The user's object id (a GUID), used in the links Graph gives.
    pub user_id: String,
    pub email: String,
    pub folders: Vec<FolderRec>,
    pub messages: HashMap<String, Msg>,
    /// Change counter: every create, change, move and delete takes the next value.
    pub seq: u64,
    pub tombstones: Vec<Tombstone>,
    /// Sent copies not filed yet: (due, message).
    pub pending_sent: Vec<(Instant, Msg)>,
}

/// The server side of a delta or skip token.
#[derive(Debug, Clone)]
pub(crate) struct DeltaState {
    pub user: String,
    pub folder: String,
    /// Changes after this counter value.
    pub since: u64,
    /// The round's snapshot (`None` for a delta token: taken when used).
    pub snapshot: Option<u64>,
    /// Within a round: the counter of the last change listed.
    pub after: u64,
    pub generation: u64,
    pub select: Option<Vec<String>>,
    pub received_from: Option<(DateTime<Utc>, bool)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub secret: Option<String>,
    pub secret_expired: bool,
    /// (certificate DER, public key of its private key) for assertions.
    pub certificate: Option<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Percent of Graph requests answered 429.
    pub throttle_percent: u32,
    pub throttle_next: u32,
    /// `Retry-After` of injected 429s (`"1"`, `"0.5"`).
    pub retry_after: String,
    pub unavailable_next: u32,
    pub delay: Duration,
    /// Sent copies appear in Sent Items this long after the 202.
    pub sent_delay: Duration,
    /// Graph's limit per app and mailbox: requests in any window.
    pub mailbox_limit: usize,
    pub mailbox_window: Duration,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub clients: HashMap<String, Client>,
    pub tokens: HashMap<String, Instant>,
    pub token_lifetime: Duration,
    pub token_counter: u64,
    /// By lower-case email and by user id.
    pub users: HashMap<String, Mailbox>,
    pub aliases: HashMap<String, String>,
    /// RBAC for Applications: `Some` = only these (lower-case emails).
    pub scope: Option<HashSet<String>>,
    pub next_id: u64,
    pub delta_states: HashMap<String, DeltaState>,
    pub delta_generation: u64,
    pub faults: Faults,
    pub rng: u64,
    /// (user, method, uri) → not before (the `Retry-After` of its 429).
    pub not_before: HashMap<(String, String, String), Instant>,
    pub in_flight: HashMap<String, usize>,
    /// Per mailbox: when its requests of the last 10 minutes came.
    pub recent: HashMap<String, std::collections::VecDeque<Instant>>,
    pub stats: Stats,
    /// Every Graph request, in the order answered.
    pub log: Vec<LoggedRequest>,
}

impl Inner {
    pub fn new_id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        // Shaped like Exchange immutable ids: base64url with padding.
        format!(
            "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A{kind}{:012x}-_AAA=",
            self.next_id
        )
    }

    /// The mailbox key of a `/users/{id}` segment.
    pub fn user_key(&self, id: &str) -> Option<String> {
        let lower = id.to_ascii_lowercase();
        if self.users.contains_key(&lower) {
            return Some(lower);
        }
        self.aliases.get(&lower).cloned()
    }
}

pub(crate) struct Shared {
    pub inner: Mutex<Inner>,
    /// `http://127.0.0.1:P`
    pub root: String,
    pub tenant: String,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn graph(&self) -> String {
        format!("{}/v1.0", self.root)
    }

    pub fn token_url(&self) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.root, self.tenant)
    }
}

/// The running stand-in; stops when dropped.
pub struct GraphStandIn {
    /// `http://127.0.0.1:P` (the `login_url`).
    pub url: String,
    /// `http://127.0.0.1:P/v1.0` (the `graph_url`).
    pub graph_url: String,
    /// The tenant of the token URL.
    pub tenant: String,
    /// `{url}/{tenant}/oauth2/v2.0/token`.
    pub token_url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GraphStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GraphStandIn {
    /// Starts on 127.0.0.1 (ephemeral port); tokens live an hour.
    pub async fn start() -> GraphStandIn {
        Self::start_on(0).await
    }

    /// Starts on `port` (0 = ephemeral).
    pub async fn start_on(port: u16) -> GraphStandIn {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let tenant = "contoso.onmicrosoft.com".to_string();
        let inner = Inner {
            token_lifetime: Duration::from_secs(3599),
            rng: 0x2545_f491_4f6c_dd1d,
            faults: Faults {
                retry_after: "1".into(),
                mailbox_limit: 10_000,
                mailbox_window: Duration::from_secs(600),
                ..Faults::default()
            },
            ..Inner::default()
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            root: url.clone(),
            tenant: tenant.clone(),
        });
        let app = handlers::router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        GraphStandIn {
            graph_url: format!("{url}/v1.0"),
            token_url: shared.token_url(),
            url,
            tenant,
            shared,
            task,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    // --- the app registration -------------------------------------------

    /// Registers an app with a client secret.
    pub fn add_client(&self, id: &str, secret: &str) {
        self.lock().clients.insert(
            id.to_string(),
            Client {
                secret: Some(secret.to_string()),
                secret_expired: false,
                certificate: None,
            },
        );
    }

    /// Registers an app whose credential is a certificate (PEM files as
    /// the daemon reads them; the key lets the stand-in check signatures).
    pub fn add_certificate_client(&self, id: &str, cert_pem: &[u8], key_pem: &[u8]) {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let cert = CertificateDer::from_pem_slice(cert_pem).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem).unwrap();
        let pair = match &key {
            PrivateKeyDer::Pkcs8(k) => {
                ring::signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der())
            }
            PrivateKeyDer::Pkcs1(k) => ring::signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => panic!("an RSA key"),
        }
        .unwrap();
        use ring::signature::KeyPair as _;
        let public = pair.public_key().as_ref().to_vec();
        self.lock().clients.insert(
            id.to_string(),
            Client {
                secret: None,
                secret_expired: false,
                certificate: Some((cert.as_ref().to_vec(), public)),
            },
        );
    }

    /// A new secret for the app (the old one stops working).
    pub fn set_client_secret(&self, id: &str, secret: &str) {
        if let Some(c) = self.lock().clients.get_mut(id) {
            c.secret = Some(secret.to_string());
            c.secret_expired = false;
        }
    }

    /// The app's secret has passed its expiry date (AADSTS7000222).
    pub fn expire_client_secret(&self, id: &str) {
        if let Some(c) = self.lock().clients.get_mut(id) {
            c.secret_expired = true;
        }
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.lock().token_lifetime = d;
    }

    /// Every token issued so far stops working now.
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for exp in self.lock().tokens.values_mut() {
            *exp = now;
        }
    }

    /// RBAC for Applications: only these mailboxes (emails) are reachable;
    /// `None` = tenant-wide.
    pub fn set_scope(&self, emails: Option<&[&str]>) {
        self.lock().scope = emails.map(|e| e.iter().map(|s| s.to_ascii_lowercase()).collect());
    }

    // --- mailboxes and messages ------------------------------------------

    /// Creates a mailbox with the well-known folders.
    pub fn add_user(&self, email: &str) {
        let mut inner = self.lock();
        let key = email.to_ascii_lowercase();
        if inner.users.contains_key(&key) {
            return;
        }
        inner.next_id += 1;
        let user_id = format!("{:08x}-0000-4000-8000-{:012x}", 0x5e1f, inner.next_id);
        let root_id = inner.new_id("Fr");
        let mut folders = vec![FolderRec {
            id: root_id.clone(),
            name: "Top of Information Store".into(),
            parent: None,
            well_known: Some("msgfolderroot"),
            props: HashMap::new(),
        }];
        for (wk, name) in WELL_KNOWN {
            folders.push(FolderRec {
                id: inner.new_id("Fw"),
                name: name.to_string(),
                parent: Some(root_id.clone()),
                well_known: Some(wk),
                props: HashMap::new(),
            });
        }
        inner.aliases.insert(user_id.clone(), key.clone());
        inner.users.insert(
            key,
            Mailbox {
                user_id,
                email: email.to_string(),
                folders,
                ..Mailbox::default()
            },
        );
    }

    /// The user's object id.
    pub fn user_id(&self, email: &str) -> String {
        let inner = self.lock();
        inner.users[&email.to_ascii_lowercase()].user_id.clone()
    }

    /// Creates the folders of a display path (`Inbox/Orders/2026`); returns
    /// the last one's id.
    pub fn add_folder(&self, email: &str, path: &str) -> String {
        let mut inner = self.lock();
        let key = email.to_ascii_lowercase();
        let mut parent: Option<String> = None;
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            let mb = &inner.users[&key];
            let found = match &parent {
                None => wire::find_top(mb, seg),
                Some(p) => wire::find_child(mb, p, seg),
            };
            let id = match found {
                Some(id) => id,
                None => {
                    let id = inner.new_id("Fc");
                    let mb = inner.users.get_mut(&key).unwrap();
                    let root = mb.folders[0].id.clone();
                    mb.folders.push(FolderRec {
                        id: id.clone(),
                        name: seg.to_string(),
                        parent: Some(parent.clone().unwrap_or(root)),
                        well_known: None,
                        props: HashMap::new(),
                    });
                    id
                }
            };
            parent = Some(id);
        }
        parent.unwrap()
    }

    /// Deletes a folder and everything in it (its messages as `@removed`).
    pub fn delete_folder(&self, email: &str, path: &str) {
        let mut inner = self.lock();
        let key = email.to_ascii_lowercase();
        let mb = inner.users.get_mut(&key).unwrap();
        let Some(id) = wire::resolve_path(mb, path) else {
            return;
        };
        let mut gone = vec![id];
        while let Some(f) = gone.pop() {
            let kids: Vec<String> = mb
                .folders
                .iter()
                .filter(|x| x.parent.as_deref() == Some(f.as_str()))
                .map(|x| x.id.clone())
                .collect();
            gone.extend(kids);
            mb.folders.retain(|x| x.id != f);
            mb.messages.retain(|_, m| m.folder != f);
        }
    }

    /// Delivers a message (raw MIME) into a folder (display path); returns its id.
    pub fn deliver(&self, email: &str, folder_path: &str, mime: &[u8]) -> String {
        let mut inner = self.lock();
        let key = email.to_ascii_lowercase();
        let folder = wire::resolve_path(&inner.users[&key], folder_path)
            .unwrap_or_else(|| panic!("no folder {folder_path}"));
        wire::file_message(
            &mut inner,
            &key,
            &folder,
            Arc::new(mime.to_vec()),
            Utc::now(),
        )
    }

    /// Moves a message as a user would (Outlook drag and drop).
    pub fn move_message(&self, email: &str, id: &str, folder_path: &str) {
        let mut inner = self.lock();
        let key = email.to_ascii_lowercase();
        let folder = wire::resolve_path(&inner.users[&key], folder_path).unwrap();
        let mb = inner.users.get_mut(&key).unwrap();
        assert!(wire::move_msg(mb, id, &folder), "no message {id}");
    }

    /// The messages of a folder (display path), oldest first.
    pub fn messages(&self, email: &str, folder_path: &str) -> Vec<MessageView> {
        let mut inner = self.lock();
        let key = email.to_ascii_lowercase();
        wire::file_due_sent(inner.users.get_mut(&key).unwrap());
        let mb = &inner.users[&key];
        let Some(folder) = wire::resolve_path(mb, folder_path) else {
            return Vec::new();
        };
        let mut out: Vec<&Msg> = mb
            .messages
            .values()
            .filter(|m| m.folder == folder)
            .collect();
        out.sort_by_key(|m| (m.received, m.id.clone()));
        out.into_iter()
            .map(|m| MessageView {
                id: m.id.clone(),
                folder: folder_path.to_string(),
                internet_message_id: m.internet_message_id.clone(),
                subject: m.subject.clone(),
                categories: m.categories.clone(),
                mime: m.mime.clone(),
            })
            .collect()
    }

    /// Number of messages in a folder.
    pub fn count(&self, email: &str, folder_path: &str) -> usize {
        self.messages(email, folder_path).len()
    }

    // --- faults ----------------------------------------------------------

    /// `percent` of Graph requests answer 429 with `Retry-After: retry_after`.
    pub fn throttle_percent(&self, percent: u32, retry_after: &str) {
        let mut inner = self.lock();
        inner.faults.throttle_percent = percent;
        inner.faults.retry_after = retry_after.to_string();
    }

    /// The next `n` Graph requests answer 429.
    pub fn throttle_next(&self, n: u32, retry_after: &str) {
        let mut inner = self.lock();
        inner.faults.throttle_next = n;
        inner.faults.retry_after = retry_after.to_string();
    }

    /// The next `n` Graph requests answer 503.
    pub fn unavailable_next(&self, n: u32) {
        self.lock().faults.unavailable_next = n;
    }

    /// Every Graph request waits this long before it is answered.
    pub fn set_delay(&self, d: Duration) {
        self.lock().faults.delay = d;
    }

    /// Sent copies appear in Sent Items this long after sendMail's 202.
    pub fn set_sent_delay(&self, d: Duration) {
        self.lock().faults.sent_delay = d;
    }

    /// Graph's limit per app and mailbox (10,000 requests per 10 minutes):
    /// a request past it answers 429 `ApplicationThrottled`.
    pub fn set_mailbox_limit(&self, limit: usize, window: Duration) {
        let mut inner = self.lock();
        inner.faults.mailbox_limit = limit;
        inner.faults.mailbox_window = window;
    }

    /// Every delta and skip token handed out so far answers 410 Gone.
    pub fn expire_sync_states(&self) {
        self.lock().delta_generation += 1;
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn reset_stats(&self) {
        self.lock().stats = Stats::default();
    }

    /// The Graph requests answered so far, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().log.clone()
    }

    /// The value of a folder's single-value extended property (`folder`: a
    /// well-known name such as `msgfolderroot`, or a display path).
    pub fn extended_property(&self, email: &str, folder: &str, id: &str) -> Option<String> {
        let inner = self.lock();
        let mb = &inner.users[&email.to_ascii_lowercase()];
        let f = wire::resolve_ref(mb, folder).or_else(|| {
            let id = wire::resolve_path(mb, folder)?;
            mb.folders.iter().find(|f| f.id == id)
        })?;
        let key = extended::property_key(id)?;
        f.props.get(&key).map(|(_, v)| v.clone())
    }
}
