//! The POP3 [`Connector`]: UIDL-based incremental sync of the maildrop.
//!
//! POP3 shows a snapshot of the maildrop taken at login, so one session serves
//! one sync cycle (its batches) and ends with `QUIT`, which is also what makes
//! the server carry out `DELE`s. What was processed is known from the store by
//! source key (mailbox, `INBOX`, 0, UIDL); a server without UIDL gets a
//! SHA-256 of the message's header section (`TOP n 0`) as its id instead,
//! which together with the pipeline's Message-ID + content-hash dedupe keeps
//! it exactly-once. `DELE` is sent only after the commit (in
//! [`Connector::acknowledge`]), and a processed message still present after a
//! crash is deleted on the next cycle without being fetched again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::oauth::{self, TokenProvider};
use super::pop3::{Credentials, Pop3Client, Pop3Error};
use super::{Ack, AckKind, AckReport, Connector, ConnectorError, FetchBatch, RawMessage};
use crate::model::{now, SourceKey, UnixTime};
use crate::net::Endpoint;
use crate::store::Store;

/// What one POP3 mailbox syncs and how.
#[derive(Debug, Clone)]
pub struct Pop3Settings {
    /// Mailbox name in the configuration.
    pub mailbox: String,
    /// Server and transport.
    pub endpoint: Endpoint,
    /// Login. With a `token_provider`, the token of `Credentials::OAuth2` is
    /// replaced by a fresh one before every login.
    pub credentials: Credentials,
    /// Source of OAuth2 access tokens, asked before every login.
    pub token_provider: Option<Arc<dyn TokenProvider>>,
    /// Messages fetched and committed per batch.
    pub batch_size: usize,
    /// Larger messages are not downloaded: they become quarantine records.
    pub max_message_size: u64,
    /// `DELE` recorded messages (after their commit).
    pub delete_after_processing: bool,
    /// Applied to each fetched message (forward mailbox: unwrap the original).
    pub transform: Option<fn(RawMessage) -> RawMessage>,
}

/// One open session and what it found.
struct Session {
    client: Pop3Client,
    /// UIDL (or header hash) → message number, for this session.
    numbers: HashMap<String, u32>,
    /// Not yet processed: (number, id, size).
    pending: VecDeque<(u32, String, u64)>,
    /// DELE sent in this session (committed by QUIT).
    deleted: usize,
}

/// POP3 connector for one mailbox.
pub struct Pop3Connector {
    settings: Pop3Settings,
    store: Arc<dyn Store>,
    session: Option<Session>,
    /// Expiry of the OAuth token used at the last login.
    token_expiry: Option<UnixTime>,
    /// When that token was written.
    token_issued: Option<UnixTime>,
}

impl Pop3Connector {
    /// A connector; it connects when there is work.
    pub fn new(mut settings: Pop3Settings, store: Arc<dyn Store>) -> Self {
        settings.batch_size = settings.batch_size.max(1);
        Pop3Connector {
            settings,
            store,
            session: None,
            token_expiry: None,
            token_issued: None,
        }
    }

    fn source(&self, id: &str) -> SourceKey {
        SourceKey {
            mailbox: self.settings.mailbox.clone(),
            folder: "INBOX".into(),
            uidvalidity: 0,
            uid: id.to_string(),
        }
    }

    async fn login(&mut self) -> Result<Pop3Client, ConnectorError> {
        let mut client = Pop3Client::connect(&self.settings.endpoint).await?;
        let (Some(provider), Credentials::OAuth2 { user, .. }) =
            (&self.settings.token_provider, &self.settings.credentials)
        else {
            client.authenticate(&self.settings.credentials).await?;
            return Ok(client);
        };
        let token = provider.token().await?;
        self.token_expiry = token.expires_at;
        self.token_issued = token.issued_at;
        let creds = Credentials::OAuth2 {
            user: user.clone(),
            token: token.token.expose().to_string(),
        };
        match client.authenticate(&creds).await {
            Ok(()) => Ok(client),
            Err(e) => Err(oauth::label_auth_error(
                provider.as_ref(),
                &token,
                e.into(),
                now(),
            )),
        }
    }

    /// Opens a session: lists the maildrop, deletes what was processed before
    /// (a crash between commit and QUIT), queues the rest.
    async fn open(&mut self) -> Result<Session, ConnectorError> {
        let mut client = self.login().await?;
        let sizes: HashMap<u32, u64> = client.list_all().await?.into_iter().collect();
        let ids = match client.uidl_all().await? {
            Some(ids) => ids,
            None => {
                // No UIDL: identify messages by a hash of their header section.
                let mut ids = Vec::with_capacity(sizes.len());
                let mut numbers: Vec<u32> = sizes.keys().copied().collect();
                numbers.sort_unstable();
                for n in numbers {
                    let head = client.top(n, 0).await?;
                    let digest = ring::digest::digest(&ring::digest::SHA256, &head);
                    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                    ids.push((n, format!("sha256:{hex}")));
                }
                ids
            }
        };
        let mut session = Session {
            client,
            numbers: HashMap::new(),
            pending: VecDeque::new(),
            deleted: 0,
        };
        // Recorded without its bytes (over the cap, or the server would not
        // deliver it): the server's copy is the only one, so it stays there
        // whatever delete_after_processing says.
        let keep: HashSet<String> = if self.settings.delete_after_processing {
            self.store
                .quarantined(usize::MAX)?
                .into_iter()
                .filter(|q| q.saved_as.is_empty() && q.source.mailbox == self.settings.mailbox)
                .map(|q| q.source.uid)
                .collect()
        } else {
            HashSet::new()
        };
        for (n, id) in ids {
            session.numbers.insert(id.clone(), n);
            let size = sizes.get(&n).copied().unwrap_or(0);
            if self.store.is_seen(&self.source(&id))? {
                if self.settings.delete_after_processing
                    && size <= self.settings.max_message_size
                    && !keep.contains(&id)
                {
                    session.client.dele(n).await?;
                    session.deleted += 1;
                }
            } else {
                session.pending.push_back((n, id, size));
            }
        }
        Ok(session)
    }

    async fn fetch_inner(&mut self) -> Result<FetchBatch, ConnectorError> {
        let mut session = match self.session.take() {
            Some(s) => s,
            None => self.open().await?,
        };
        let mut batch = FetchBatch::default();
        // RETRs answered -ERR in this batch, and the first such error.
        let (mut retrieved, mut refused, mut first_refusal) = (0usize, 0usize, None);
        while batch.messages.len() < self.settings.batch_size {
            let Some((n, id, size)) = session.pending.pop_front() else {
                break;
            };
            // Over the cap: not downloaded but recorded (quarantine, no bytes),
            // so it is reported once instead of skipped again every cycle.
            let too_large = |size: u64| RawMessage {
                source: self.source(&id),
                raw: Vec::new(),
                received_at: None,
                too_large: Some(size),
                unfetchable: None,
            };
            if size > self.settings.max_message_size {
                batch.messages.push(too_large(size));
                continue;
            }
            retrieved += 1;
            let raw = match session.client.retr(n, self.settings.max_message_size).await {
                Ok(raw) => raw,
                // LIST under-reported the size; the response was drained.
                Err(Pop3Error::TooLarge { size, .. }) => {
                    batch.messages.push(too_large(size));
                    continue;
                }
                // This message only (the session is still in step): it is
                // quarantined with the server's reason, the batch goes on.
                Err(e @ Pop3Error::Server { .. }) => {
                    refused += 1;
                    batch.messages.push(RawMessage {
                        source: self.source(&id),
                        raw: Vec::new(),
                        received_at: None,
                        too_large: None,
                        unfetchable: Some(e.to_string()),
                    });
                    first_refusal.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let msg = RawMessage {
                source: self.source(&id),
                raw,
                received_at: None,
                too_large: None,
                unfetchable: None,
            };
            batch.messages.push(match self.settings.transform {
                Some(f) => f(msg),
                None => msg,
            });
        }
        if let Some(e) = first_refusal.filter(|_| refused == retrieved && retrieved > 1) {
            // Every message refused: the server's trouble, not one message's.
            // Nothing is recorded; the cycle fails and is retried.
            return Err(e.into());
        }
        batch.backlog = session.pending.len() as u64;
        batch.more = !session.pending.is_empty();
        self.session = Some(session);
        if !batch.more && batch.messages.is_empty() {
            // Nothing to acknowledge: end the session now (commits earlier DELEs).
            self.quit().await?;
        }
        Ok(batch)
    }

    async fn quit(&mut self) -> Result<(), ConnectorError> {
        if let Some(s) = self.session.take() {
            s.client.quit().await?;
        }
        Ok(())
    }

    async fn acknowledge_inner(&mut self, acks: Vec<Ack>) -> Result<(), ConnectorError> {
        let delete = self.settings.delete_after_processing;
        let mut done = false;
        if let Some(s) = self.session.as_mut() {
            if delete {
                for a in acks.iter().filter(|a| a.kind == AckKind::Recorded) {
                    if let Some(n) = s.numbers.get(&a.source.uid).copied() {
                        s.client.dele(n).await?;
                        s.deleted += 1;
                    }
                }
            }
            done = s.pending.is_empty();
        }
        if done {
            // Last batch of the cycle: QUIT commits the deletions and lets the
            // next cycle see new mail.
            self.quit().await?;
        }
        Ok(())
    }
}

impl Connector for Pop3Connector {
    fn protocol(&self) -> &'static str {
        "pop3"
    }

    async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
        let r = self.fetch_inner().await;
        if r.is_err() {
            // Unknown protocol state: drop without QUIT (no DELE takes effect).
            self.session = None;
        }
        r
    }

    async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
        let r = self.acknowledge_inner(acks).await;
        if r.is_err() {
            self.session = None;
        }
        r.map(|()| AckReport::default())
    }

    /// No: every session deletes the seen messages it lists ([`Self::open`]),
    /// which is the durable record of the DELEs owed, and a DELE takes effect
    /// only at the QUIT that ends a cycle.
    fn wants_follow_up(&self, _kind: AckKind) -> bool {
        false
    }

    async fn wait_for_changes(
        &mut self,
        max: Duration,
        _keep_connection: bool,
        cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        // POP3 has no push, and an open session would hide new mail.
        let quit = self.quit().await;
        tokio::select! {
            _ = tokio::time::sleep(max) => {}
            _ = cancel.cancelled() => {}
        }
        quit
    }

    async fn test(&mut self) -> Result<String, ConnectorError> {
        let mut client = self.login().await?;
        let (count, bytes) = client.stat().await?;
        let uidl = client.capabilities().has("UIDL");
        let tls = client.is_tls();
        client.quit().await?;
        Ok(format!(
            "POP3 {}:{} (TLS {}) logged in; {count} message(s), {bytes} bytes; UIDL {}",
            self.settings.endpoint.host,
            self.settings.endpoint.port,
            if tls { "on" } else { "off" },
            if uidl { "yes" } else { "no (header-hash ids)" }
        ))
    }

    async fn close(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.client.quit()).await;
        }
    }

    fn token_expires_at(&self) -> Option<UnixTime> {
        self.token_expiry
    }

    fn token_issued_at(&self) -> Option<UnixTime> {
        self.token_issued
    }
}
