//! The IMAP [`Connector`]: incremental per-folder sync on top of [`ImapClient`].
//!
//! Position per folder = (UIDVALIDITY, next UID, HIGHESTMODSEQ), committed by the
//! pipeline in the same store batch as the activities, so a crash at any point
//! re-fetches at most the uncommitted batch (and the store's source-key dedupe
//! drops what was committed). A UIDVALIDITY change re-scans the folder under the
//! new validity; Message-ID + content-hash dedupe inside the commit keeps it free
//! of duplicate activities.
//!
//! One connection per mailbox, reused across polls; any error drops it (the next
//! call reconnects), because after a failed or cancelled command the protocol
//! state is unknown.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Credentials, IdleOutcome, ImapClient, ImapDate, ImapError};
use crate::connector::oauth::{self, TokenProvider};
use crate::connector::{
    Ack, AckKind, AckReport, Connector, ConnectorError, FetchBatch, RawMessage,
};
use crate::error::{Classify, Disposition};
use crate::model::{now, AlertLevel, FolderPosition, SourceKey, UnixTime};
use crate::net::Endpoint;
use crate::store::Store;

/// Longest single IDLE: well below the 29 minutes of RFC 2177 and below the
/// idle time-outs of common NAT boxes.
const IDLE_SLICE: Duration = Duration::from_secs(9 * 60);

/// What one mailbox syncs and how.
#[derive(Debug, Clone)]
pub struct ImapSettings {
    /// Mailbox name in the configuration (first part of every source key).
    pub mailbox: String,
    /// Server and transport.
    pub endpoint: Endpoint,
    /// Login. With a `token_provider`, the token of `Credentials::OAuth2` is
    /// replaced by a fresh one before every login.
    pub credentials: Credentials,
    /// Source of OAuth2 access tokens, asked before every login.
    pub token_provider: Option<Arc<dyn TokenProvider>>,
    /// Larger messages are not downloaded: they become quarantine records.
    pub max_message_size: u64,
    /// Folders besides INBOX (tracked folders, then extra folders).
    pub folders: Vec<String>,
    /// Messages fetched and committed per batch.
    pub batch_size: usize,
    /// Mail received before this date is not processed (first sync and re-scans).
    pub process_email_from: Option<chrono::NaiveDate>,
    /// Folder that quarantined messages are moved to (created if missing).
    pub move_failed_to: Option<String>,
    /// Keyword set on recorded messages where the folder allows keywords.
    pub processed_keyword: Option<String>,
    /// Delete recorded messages (forward mailboxes).
    pub delete_after_processing: bool,
    /// Use IDLE on INBOX between polls.
    pub idle: bool,
    /// Applied to the fetched message (forward mailbox: unwrap the original).
    pub transform: Option<fn(RawMessage) -> RawMessage>,
}

/// The follow-ups owed in one folder under one UIDVALIDITY: (UID, source).
#[derive(Default)]
struct FolderAcks {
    recorded: Vec<(u32, SourceKey)>,
    failed: Vec<(u32, SourceKey)>,
}

/// What phase 1 of a fetch found in one folder.
struct FolderScan {
    folder: String,
    state: super::FolderState,
    prev: Option<FolderPosition>,
    start: u32,
    /// New UIDs, ascending.
    candidates: Vec<u32>,
    /// How many of the first candidates go into this batch.
    take: usize,
    /// INTERNALDATE of the first candidates (only when merging folders).
    dates: Vec<i64>,
}

/// IMAP connector for one mailbox.
pub struct ImapConnector {
    settings: ImapSettings,
    store: Arc<dyn Store>,
    client: Option<ImapClient>,
    /// Next UID handed out per folder by the last fetch (committed or about to
    /// be); lets IDLE start only when nothing is already waiting.
    fetched_next: HashMap<String, (u32, u32)>,
    /// UIDVALIDITY announced once per folder, so a notice is not repeated per batch.
    announced: HashMap<String, u32>,
    /// Expiry of the OAuth token used at the last login.
    token_expiry: Option<UnixTime>,
}

impl ImapConnector {
    /// A connector; it connects lazily.
    pub fn new(mut settings: ImapSettings, store: Arc<dyn Store>) -> Self {
        let mut folders = vec!["INBOX".to_string()];
        for f in std::mem::take(&mut settings.folders) {
            if !folders.iter().any(|x| x.eq_ignore_ascii_case(&f)) {
                folders.push(f);
            }
        }
        settings.folders = folders;
        settings.batch_size = settings.batch_size.max(1);
        ImapConnector {
            settings,
            store,
            client: None,
            fetched_next: HashMap::new(),
            announced: HashMap::new(),
            token_expiry: None,
        }
    }

    /// Takes the connection out (connecting if needed); callers put it back
    /// only on success, so an error always leaves no half-used connection.
    async fn take_client(&mut self) -> Result<ImapClient, ConnectorError> {
        if let Some(c) = self.client.take() {
            return Ok(c);
        }
        let (Some(provider), Credentials::OAuth2 { user, .. }) =
            (&self.settings.token_provider, &self.settings.credentials)
        else {
            return Ok(ImapClient::connect_and_authenticate(
                &self.settings.endpoint,
                &self.settings.credentials,
            )
            .await?);
        };
        let token = provider.token().await?;
        self.token_expiry = token.expires_at;
        let creds = Credentials::OAuth2 {
            user: user.clone(),
            token: token.token.expose().to_string(),
        };
        ImapClient::connect_and_authenticate(&self.settings.endpoint, &creds)
            .await
            .map_err(|e| oauth::label_auth_error(provider.as_ref(), &token, e.into(), now()))
    }

    /// Drops the connection after an error (its state is unknown).
    fn fail(&mut self, e: impl Into<ConnectorError>) -> ConnectorError {
        self.client = None;
        e.into()
    }

    fn source(&self, folder: &str, uidvalidity: u32, uid: u32) -> SourceKey {
        SourceKey {
            mailbox: self.settings.mailbox.clone(),
            folder: folder.to_string(),
            uidvalidity: u64::from(uidvalidity),
            uid: uid.to_string(),
        }
    }

    async fn fetch_inner(&mut self) -> Result<FetchBatch, ConnectorError> {
        let stored = self.store.folder_positions(&self.settings.mailbox)?;
        let since = self.settings.process_email_from.and_then(|d| {
            use chrono::Datelike;
            ImapDate::new(d.year(), d.month() as u8, d.day() as u8)
        });
        let budget = self.settings.batch_size;
        let mut batch = FetchBatch::default();
        let mut client = self.take_client().await?;

        // Phase 1: what is new in each folder.
        let mut scans: Vec<FolderScan> = Vec::with_capacity(self.settings.folders.len());
        for folder in self.settings.folders.clone() {
            let state = client.select(&folder).await?;
            let prev = stored.get(&folder).cloned();
            let same_validity = prev
                .as_ref()
                .is_some_and(|p| p.uidvalidity == u64::from(state.uidvalidity));
            let start = match &prev {
                Some(p) if same_validity => u32::try_from(p.next_uid).unwrap_or(u32::MAX).max(1),
                _ => 1,
            };
            if let Some(p) = prev.as_ref().filter(|_| !same_validity) {
                if self.announced.get(&folder) != Some(&state.uidvalidity) {
                    self.announced.insert(folder.clone(), state.uidvalidity);
                    batch.notices.push((
                        AlertLevel::Information,
                        format!(
                            "UIDVALIDITY of folder {folder:?} changed ({} → {}): re-scanning it; messages already recorded are recognised by Message-ID and not duplicated",
                            p.uidvalidity, state.uidvalidity
                        ),
                    ));
                }
            }
            // Nothing new: UIDNEXT says so without a SEARCH.
            let nothing_new = state.uidnext.is_some_and(|n| n <= start) || state.exists == 0;
            let candidates = if nothing_new {
                Vec::new()
            } else {
                match since {
                    Some(d) => client.uids_from_since(start, d).await?,
                    None => client.uids_from(start).await?,
                }
            };
            scans.push(FolderScan {
                folder,
                state,
                prev,
                start,
                candidates,
                take: 0,
                dates: Vec::new(),
            });
        }

        // Phase 2: how many of each folder's first candidates go into this batch.
        // With new mail in several folders, merge them in arrival order (a k-way
        // merge on INTERNALDATE over per-folder prefixes, so positions stay
        // "everything below next UID"): a reply filed in INBOX must not be
        // processed before its parent filed in a tracked folder.
        let busy = scans.iter().filter(|s| !s.candidates.is_empty()).count();
        if busy <= 1 {
            for s in &mut scans {
                s.take = s.candidates.len().min(budget);
            }
        } else {
            for s in scans.iter_mut().filter(|s| !s.candidates.is_empty()) {
                let head = &s.candidates[..s.candidates.len().min(budget)];
                client.select(&s.folder).await?;
                let dates: HashMap<u32, Option<i64>> = client
                    .fetch_internal_dates(head)
                    .await?
                    .into_iter()
                    .collect();
                // A message expunged meanwhile sorts first and is simply missing later.
                s.dates = head
                    .iter()
                    .map(|u| dates.get(u).copied().flatten().unwrap_or(i64::MIN))
                    .collect();
            }
            for _ in 0..budget {
                let next = scans
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.take < s.dates.len())
                    .min_by_key(|(i, s)| (s.dates[s.take], *i))
                    .map(|(i, _)| i);
                match next {
                    Some(i) => scans[i].take += 1,
                    None => break,
                }
            }
        }

        // Phase 3: fetch, positions, messages in merge (date) order.
        let mut fetched: Vec<(i64, usize, RawMessage)> = Vec::new();
        for (index, s) in scans.iter().enumerate() {
            let uids = &s.candidates[..s.take];
            batch.backlog += (s.candidates.len() - s.take) as u64;
            if !uids.is_empty() {
                if client.selected_folder() != Some(s.folder.as_str()) {
                    client.select(&s.folder).await?;
                }
                // Sizes first: a message over the cap is recorded, not downloaded.
                let limit = self.settings.max_message_size;
                let mut small = Vec::with_capacity(uids.len());
                for (uid, size) in client.fetch_sizes(uids).await? {
                    if u64::from(size) > limit {
                        fetched.push((
                            i64::MIN,
                            index,
                            RawMessage {
                                source: self.source(&s.folder, s.state.uidvalidity, uid),
                                raw: Vec::new(),
                                received_at: None,
                                too_large: Some(u64::from(size)),
                            },
                        ));
                    } else {
                        small.push(uid);
                    }
                }
                for m in client.fetch_messages(&small).await? {
                    let raw = RawMessage {
                        source: self.source(&s.folder, s.state.uidvalidity, m.uid),
                        raw: m.raw,
                        received_at: m.internal_date,
                        too_large: None,
                    };
                    let raw = match self.settings.transform {
                        Some(f) => f(raw),
                        None => raw,
                    };
                    fetched.push((m.internal_date.unwrap_or(i64::MIN), index, raw));
                }
            }
            let uidnext = s.state.uidnext.unwrap_or(0);
            let next_uid = if s.take < s.candidates.len() {
                batch.more = true;
                uids.last().map(|u| u + 1).unwrap_or(s.start)
            } else {
                // Everything up to UIDNEXT was considered (or is older than the
                // process-from date): skip it for good.
                let last = s.candidates.last().map(|u| u + 1).unwrap_or(s.start);
                last.max(uidnext).max(s.start)
            };
            self.fetched_next
                .insert(s.folder.clone(), (s.state.uidvalidity, next_uid));
            let position = FolderPosition {
                uidvalidity: u64::from(s.state.uidvalidity),
                next_uid: u64::from(next_uid),
                highest_modseq: s.state.highest_modseq,
                seen_count: u64::from(s.state.exists),
            };
            if s.prev.as_ref() != Some(&position) {
                batch.positions.push((s.folder.clone(), position));
            }
        }
        // Arrival order (INTERNALDATE); the sort is stable, so ties keep folder
        // order and, within a folder, UID order.
        fetched.sort_by_key(|(date, index, _)| (*date, *index));
        batch.messages = fetched.into_iter().map(|(_, _, m)| m).collect();
        self.client = Some(client);
        Ok(batch)
    }

    /// Carries out follow-ups folder by folder. A folder the server refuses
    /// (`NO`) fails only its own follow-ups; a broken connection fails the call.
    async fn acknowledge_inner(
        &mut self,
        acks: Vec<Ack>,
        report: &mut AckReport,
    ) -> Result<(), ConnectorError> {
        // Group per folder and kind, so each folder is selected once.
        let mut groups: BTreeMap<(String, u64), FolderAcks> = BTreeMap::new();
        for a in acks {
            if !self.wants_follow_up(a.kind) {
                continue;
            }
            let Ok(uid) = a.source.uid.parse::<u32>() else {
                report
                    .obsolete
                    .push((a.source, "not an IMAP UID".to_string()));
                continue;
            };
            let g = groups
                .entry((a.source.folder.clone(), a.source.uidvalidity))
                .or_default();
            match a.kind {
                AckKind::Recorded => g.recorded.push((uid, a.source)),
                AckKind::Failed => g.failed.push((uid, a.source)),
            }
        }
        if groups.is_empty() {
            return Ok(());
        }
        let mut client = self.take_client().await?;
        for ((folder, validity), g) in groups {
            let sources = g.recorded.iter().chain(&g.failed).map(|(_, s)| s);
            match self
                .follow_up_folder(&mut client, &folder, validity, &g)
                .await
            {
                Ok(None) => {}
                Ok(Some(why)) => report
                    .obsolete
                    .extend(sources.map(|s| (s.clone(), why.clone()))),
                // A `NO` leaves the connection usable for the other folders.
                Err(e) if e.disposition() == Disposition::Permanent => {
                    report.fail_all(sources, &e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.client = Some(client);
        Ok(())
    }

    /// The follow-ups of one folder; Ok(Some(why)) when they can never apply.
    /// Each is idempotent: a keyword set twice is one keyword, and a delete
    /// or move of a UID that is gone is a no-op.
    async fn follow_up_folder(
        &self,
        client: &mut ImapClient,
        folder: &str,
        validity: u64,
        g: &FolderAcks,
    ) -> Result<Option<String>, ImapError> {
        let state = match client.select(folder).await {
            Ok(state) => state,
            Err(ImapError::FolderMissing { .. }) => {
                return Ok(Some(format!("folder {folder:?} no longer exists")))
            }
            Err(e) => return Err(e),
        };
        if u64::from(state.uidvalidity) != validity {
            return Ok(Some(format!(
                "UIDVALIDITY of folder {folder:?} changed ({validity} → {}): its UIDs name other messages now",
                state.uidvalidity
            )));
        }
        let recorded: Vec<u32> = g.recorded.iter().map(|(u, _)| *u).collect();
        if !recorded.is_empty() {
            if self.settings.delete_after_processing {
                client.delete(&recorded).await?;
            } else if let Some(k) = &self.settings.processed_keyword {
                // A folder that takes no keywords: there is nothing to do.
                if client.can_set_keywords() {
                    client.add_keyword(&recorded, k).await?;
                }
            }
        }
        let (false, Some(target)) = (g.failed.is_empty(), &self.settings.move_failed_to) else {
            return Ok(None);
        };
        // Only UIDs still here: moved before (a replay), they are done, and
        // not every server answers a MOVE of missing UIDs with OK.
        let failed: Vec<u32> = g.failed.iter().map(|(u, _)| *u).collect();
        let present: Vec<u32> = client
            .fetch_sizes(&failed)
            .await?
            .into_iter()
            .map(|(u, _)| u)
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        match client.move_to(&present, target).await {
            Err(ImapError::FolderMissing { .. }) => {
                client.create_folder(target).await?;
                client.select(folder).await?;
                client.move_to(&present, target).await?;
            }
            other => {
                other?;
            }
        }
        Ok(None)
    }

    async fn test_inner(&mut self) -> Result<String, ConnectorError> {
        let folders = self.settings.folders.clone();
        let mut client = self.take_client().await?;
        let listed = client.list_folders().await?;
        for f in &folders {
            if !f.eq_ignore_ascii_case("INBOX") && !listed.iter().any(|l| &l.name == f) {
                return Err(ImapError::FolderMissing {
                    folder: f.clone(),
                    code: None,
                    text: "not in the server's folder list".into(),
                }
                .into());
            }
        }
        let inbox = client.examine("INBOX").await?;
        let caps: Vec<&str> = ["IDLE", "CONDSTORE", "MOVE", "UIDPLUS"]
            .into_iter()
            .filter(|c| client.cached_capabilities().has(c))
            .collect();
        let line = format!(
            "IMAP {}:{} ({:?}) logged in; INBOX has {} message(s); {} folder(s) synced; server offers {}",
            self.settings.endpoint.host,
            self.settings.endpoint.port,
            self.settings.endpoint.tls,
            inbox.exists,
            folders.len(),
            caps.join(" ")
        );
        self.client = Some(client);
        Ok(line)
    }

    /// IDLE on INBOX until news or `max`. Ok(false) = IDLE unavailable.
    async fn idle_inner(&mut self, max: Duration) -> Result<bool, ConnectorError> {
        let known = self.fetched_next.get("INBOX").copied();
        let mut client = self.take_client().await?;
        let state = client.select("INBOX").await?;
        let result = Self::idle_on(&mut client, known, &state, max).await;
        if result.is_ok() {
            self.client = Some(client);
        }
        Ok(result?)
    }

    async fn idle_on(
        client: &mut ImapClient,
        known: Option<(u32, u32)>,
        state: &super::FolderState,
        max: Duration,
    ) -> Result<bool, ImapError> {
        // Mail that arrived since the last fetch: no need to wait at all.
        if let (Some((validity, next)), Some(uidnext)) = (known, state.uidnext) {
            if validity != state.uidvalidity || uidnext > next {
                return Ok(true);
            }
        }
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(true);
            }
            match client.idle_wait(left.min(IDLE_SLICE)).await? {
                IdleOutcome::Unsupported => return Ok(false),
                IdleOutcome::NewData => {
                    // EXPUNGE or flag changes are not new mail: keep waiting.
                    let news = client.take_events();
                    if news
                        .iter()
                        .any(|e| matches!(e, super::ImapEvent::Exists(_)))
                    {
                        return Ok(true);
                    }
                }
                IdleOutcome::Timeout => {}
            }
        }
    }
}

impl Connector for ImapConnector {
    fn protocol(&self) -> &'static str {
        "imap"
    }

    async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
        self.fetch_inner().await.map_err(|e| self.fail(e))
    }

    async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
        let mut report = AckReport::default();
        match self.acknowledge_inner(acks, &mut report).await {
            Ok(()) => Ok(report),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn wants_follow_up(&self, kind: AckKind) -> bool {
        match kind {
            AckKind::Recorded => {
                self.settings.delete_after_processing || self.settings.processed_keyword.is_some()
            }
            AckKind::Failed => self.settings.move_failed_to.is_some(),
        }
    }

    async fn wait_for_changes(
        &mut self,
        max: Duration,
        keep_connection: bool,
        cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        if !keep_connection {
            self.close().await;
        } else if self.settings.idle {
            let outcome = tokio::select! {
                r = self.idle_inner(max) => Some(r),
                _ = cancel.cancelled() => None,
            };
            match outcome {
                Some(Ok(true)) => return Ok(()),
                Some(Ok(false)) => {}
                Some(Err(e)) => {
                    // Poll this time; the next wait tries IDLE again on a new connection.
                    tracing::info!(mailbox = %self.settings.mailbox, error = %e, "IDLE failed; polling");
                    self.client = None;
                }
                None => {
                    // Cancelled mid-IDLE: the connection is in an unknown state.
                    self.client = None;
                    return Ok(());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(max) => {}
            _ = cancel.cancelled() => {}
        }
        Ok(())
    }

    async fn test(&mut self) -> Result<String, ConnectorError> {
        self.test_inner().await.map_err(|e| self.fail(e))
    }

    async fn close(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.logout()).await;
        }
    }

    fn token_expires_at(&self) -> Option<UnixTime> {
        self.token_expiry
    }
}
