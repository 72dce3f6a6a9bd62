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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Credentials, FolderNames, IdleOutcome, ImapClient, ImapDate, ImapError};
use crate::connector::oauth::{self, TokenProvider};
use crate::connector::{
    Ack, AckKind, AckReport, Connector, ConnectorError, FetchBatch, Notice, RawMessage,
};
use crate::deployment::{Marker, MarkerSlot};
use crate::error::{Classify, Disposition};
use crate::model::{now, AlertLevel, FolderPosition, RetryMessage, SourceKey, UnixTime};
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
    /// Later cycles a message that SEARCH lists but FETCH does not deliver is
    /// retried at before it is quarantined.
    pub missing_message_retries: u32,
}

/// The follow-ups owed in one folder under one UIDVALIDITY: (UID, source).
#[derive(Default)]
struct FolderAcks {
    recorded: Vec<(u32, SourceKey)>,
    failed: Vec<(u32, SourceKey)>,
}

/// Why a UID asked for is missing from a FETCH that succeeded.
const NOT_RETURNED: &str = "the server returned no data for it to UID FETCH";

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
    /// Messages below `start` the server did not deliver before (same
    /// UIDVALIDITY only), from the stored position.
    retry: Vec<RetryMessage>,
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
    /// When that token was written.
    token_issued: Option<UnixTime>,
    /// Configured folder names → the server's, from the last LIST.
    names: FolderNames,
    /// `names` was resolved on the current connection.
    names_resolved: bool,
    /// Configured folders the server does not have (skipped, warned about).
    missing: Vec<String>,
    /// Missing folders a Warning was raised for.
    warned_missing: HashSet<String>,
    /// Selectable folders of the server, in configuration spelling.
    existing: Vec<String>,
    /// The last fetch said `more`: the next one continues the same cycle,
    /// so messages to retry wait for the next cycle instead of being
    /// retried batch after batch within seconds.
    mid_cycle: bool,
}

/// Errors of a FETCH that one bad message can cause (the server refuses or
/// fails it, drops the connection over it, or sends what cannot be parsed);
/// fetching one UID at a time tells which message it is.
fn per_message(e: &ImapError) -> bool {
    matches!(
        e,
        ImapError::No { .. }
            | ImapError::Bad { .. }
            | ImapError::Bye { .. }
            | ImapError::ConnectionLost(_)
            | ImapError::Io { .. }
            | ImapError::Protocol(_)
    )
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
            token_issued: None,
            names: FolderNames::default(),
            names_resolved: false,
            missing: Vec::new(),
            warned_missing: HashSet::new(),
            existing: Vec::new(),
            mid_cycle: false,
        }
    }

    /// Takes the connection out (connecting if needed); callers put it back
    /// only on success, so an error always leaves no half-used connection.
    async fn take_client(&mut self) -> Result<ImapClient, ConnectorError> {
        if let Some(c) = self.client.take() {
            return Ok(c);
        }
        let mut client = self.connect().await?;
        // Names as last resolved; a new connection resolves them again in
        // the next fetch (folders may have been created or renamed).
        client.set_folder_names(self.names.clone());
        self.names_resolved = false;
        Ok(client)
    }

    /// Connects and logs in (with a fresh OAuth token where configured).
    async fn connect(&mut self) -> Result<ImapClient, ConnectorError> {
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
        self.token_issued = token.issued_at;
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

    /// Maps the configured folders (`/` between levels) to the server's
    /// names from LIST: verbatim, else with the server's hierarchy
    /// delimiter, else ignoring case. What is not there goes to `missing`.
    async fn resolve_folders(&mut self, client: &mut ImapClient) -> Result<(), ImapError> {
        let listed = client.list_folders().await?;
        let mut names = FolderNames::from_listing(&listed);
        let selectable: Vec<&str> = listed
            .iter()
            .filter(|f| f.is_selectable())
            .map(|f| f.name.as_str())
            .collect();
        let mut missing = Vec::new();
        for f in &self.settings.folders {
            if f.eq_ignore_ascii_case("INBOX") {
                continue;
            }
            let translated = names.server_name(f);
            let found = selectable
                .iter()
                .find(|l| **l == f.as_str())
                .or_else(|| selectable.iter().find(|l| **l == translated))
                .or_else(|| {
                    selectable
                        .iter()
                        .find(|l| l.eq_ignore_ascii_case(f) || l.eq_ignore_ascii_case(&translated))
                });
            match found {
                Some(l) => {
                    names.exact.insert(f.clone(), l.to_string());
                }
                None => missing.push(f.clone()),
            }
        }
        self.existing = selectable.iter().map(|l| names.config_name(l)).collect();
        self.missing = missing;
        client.set_folder_names(names.clone());
        self.names = names;
        self.names_resolved = true;
        Ok(())
    }

    /// One Warning per missing folder (again if it disappears after coming back).
    fn note_missing(&mut self, batch: &mut FetchBatch) {
        let missing = self.missing.clone();
        self.warned_missing.retain(|f| missing.contains(f));
        for f in missing {
            if self.warned_missing.insert(f.clone()) {
                let text = self.missing_folder_text(&f);
                batch.notices.push(Notice::new(
                    AlertLevel::Warning,
                    format!("missing_folder:{f}"),
                    text,
                ));
            }
        }
    }

    fn missing_folder_text(&self, folder: &str) -> String {
        let near = nearest_folders(folder, &self.existing);
        let near = if near.is_empty() {
            "the server lists no other folders".to_string()
        } else {
            let quoted: Vec<String> = near.iter().map(|n| format!("{n:?}")).collect();
            format!("nearest existing: {}", quoted.join(", "))
        };
        let looked = match self.names.delimiter.as_deref() {
            Some(d) if d != "/" => format!(
                " (looked for {:?}: the server separates levels with {d:?})",
                self.names.server_name(folder)
            ),
            _ => String::new(),
        };
        format!(
            "folder {folder:?} does not exist on the server{looked}; {near}. It is skipped and the rest of the mailbox keeps syncing: fix the name in tracked_folders or folders (levels separated by \"/\")"
        )
    }

    /// A fresh connection with `folder` selected, after the old one died
    /// over one message.
    async fn reconnect(&mut self, folder: &str) -> Result<ImapClient, ConnectorError> {
        self.client = None;
        let mut client = self.take_client().await?;
        client.select(folder).await?;
        Ok(client)
    }

    /// Downloads `uids` of the selected `folder`. When the FETCH fails in a
    /// way one message can cause, the UIDs are fetched one at a time
    /// (reconnecting where the server dropped the connection), so a poison
    /// message holds up nothing but itself. Returns the messages and, per
    /// UID not delivered, why. If every UID fails on its own too, the
    /// trouble is the server's, not a message's: the first error is returned.
    async fn fetch_isolating(
        &mut self,
        client: &mut ImapClient,
        folder: &str,
        uids: &[u32],
    ) -> Result<(Vec<super::FetchedMail>, Vec<(u32, String)>), ConnectorError> {
        if uids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let first = match client.fetch_messages(uids).await {
            Ok(mails) => {
                let failed = uids
                    .iter()
                    .filter(|u| mails.binary_search_by_key(*u, |m| m.uid).is_err())
                    .map(|u| (*u, NOT_RETURNED.to_string()))
                    .collect();
                return Ok((mails, failed));
            }
            Err(e) if per_message(&e) => e,
            Err(e) => return Err(e.into()),
        };
        tracing::info!(mailbox = %self.settings.mailbox, folder, error = %first, count = uids.len(), "UID FETCH failed; fetching the messages one at a time");
        let mut mails = Vec::new();
        let mut failed = Vec::new();
        let mut errors = 0usize;
        for &uid in uids {
            if !client.is_connected() {
                *client = self.reconnect(folder).await?;
            }
            match client.fetch_messages(&[uid]).await {
                Ok(m) if m.is_empty() => failed.push((uid, NOT_RETURNED.to_string())),
                Ok(m) => mails.extend(m),
                Err(e) if per_message(&e) => {
                    errors += 1;
                    failed.push((uid, e.to_string()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        if uids.len() > 1 && errors == uids.len() {
            return Err(first.into());
        }
        if !client.is_connected() {
            *client = self.reconnect(folder).await?;
        }
        Ok((mails, failed))
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

        // Folder names: resolved once per connection, and while one is missing.
        if !self.names_resolved || !self.missing.is_empty() {
            self.resolve_folders(&mut client).await?;
        }
        self.note_missing(&mut batch);

        // Phase 1: what is new in each folder.
        let mut scans: Vec<FolderScan> = Vec::with_capacity(self.settings.folders.len());
        for folder in self.settings.folders.clone() {
            if self.missing.contains(&folder) {
                continue;
            }
            let state = match client.select(&folder).await {
                Ok(state) => state,
                // Deleted since LIST: skipped like any missing folder.
                Err(ImapError::FolderMissing { .. }) if !folder.eq_ignore_ascii_case("INBOX") => {
                    self.missing.push(folder);
                    self.note_missing(&mut batch);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
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
                    batch.notices.push(Notice::new(
                        AlertLevel::Information,
                        format!("uidvalidity_changed:{folder}"),
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
            let retry = match &prev {
                Some(p) if same_validity => p.retry.clone(),
                _ => Vec::new(),
            };
            scans.push(FolderScan {
                folder,
                state,
                prev,
                start,
                candidates,
                take: 0,
                dates: Vec::new(),
                retry,
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
        // Messages that failed before are retried once per cycle, at its start.
        let retry_now = !self.mid_cycle;
        let retries = self.settings.missing_message_retries;
        let mut fetched: Vec<(i64, usize, RawMessage)> = Vec::new();
        for (index, s) in scans.iter().enumerate() {
            let uids = &s.candidates[..s.take];
            batch.backlog += (s.candidates.len() - s.take) as u64;
            let mut wanted: Vec<u32> = uids.to_vec();
            let mut retry_next: Vec<RetryMessage> = Vec::new();
            if retry_now {
                wanted.extend(s.retry.iter().filter_map(|r| u32::try_from(r.uid).ok()));
                wanted.sort_unstable();
                wanted.dedup();
            } else {
                retry_next = s.retry.clone();
            }
            if !wanted.is_empty() {
                if client.selected_folder() != Some(s.folder.as_str()) {
                    client.select(&s.folder).await?;
                }
                // Sizes first: a message over the cap is recorded, not downloaded.
                let limit = self.settings.max_message_size;
                let sizes = client.fetch_sizes(&wanted).await?;
                let mut small = Vec::with_capacity(wanted.len());
                let mut failed: Vec<(u32, String)> = Vec::new();
                for &uid in &wanted {
                    match sizes.binary_search_by_key(&uid, |(u, _)| *u) {
                        Ok(i) if u64::from(sizes[i].1) > limit => fetched.push((
                            i64::MIN,
                            index,
                            RawMessage {
                                source: self.source(&s.folder, s.state.uidvalidity, uid),
                                raw: Vec::new(),
                                received_at: None,
                                too_large: Some(u64::from(sizes[i].1)),
                                unfetchable: None,
                            },
                        )),
                        Ok(_) => small.push(uid),
                        Err(_) => failed.push((uid, NOT_RETURNED.to_string())),
                    }
                }
                let (mails, more_failed) =
                    self.fetch_isolating(&mut client, &s.folder, &small).await?;
                failed.extend(more_failed);
                for m in mails {
                    let raw = RawMessage {
                        source: self.source(&s.folder, s.state.uidvalidity, m.uid),
                        raw: m.raw,
                        received_at: m.internal_date,
                        too_large: None,
                        unfetchable: None,
                    };
                    let raw = match self.settings.transform {
                        Some(f) => f(raw),
                        None => raw,
                    };
                    fetched.push((m.internal_date.unwrap_or(i64::MIN), index, raw));
                }
                // Not delivered: never skipped silently. Gone meanwhile
                // (expunged) is fine; still there means retry, and after
                // the configured retries a quarantine record says why.
                if !failed.is_empty() {
                    let asked: Vec<u32> = failed.iter().map(|(u, _)| *u).collect();
                    let alive = client.existing_uids(&asked).await?;
                    for (uid, reason) in failed {
                        if alive.binary_search(&uid).is_err() {
                            continue;
                        }
                        let tries = s
                            .retry
                            .iter()
                            .find(|r| r.uid == u64::from(uid))
                            .map_or(0, |r| r.tries)
                            + 1;
                        if tries > retries {
                            fetched.push((
                                i64::MIN,
                                index,
                                RawMessage {
                                    source: self.source(&s.folder, s.state.uidvalidity, uid),
                                    raw: Vec::new(),
                                    received_at: None,
                                    too_large: None,
                                    unfetchable: Some(format!(
                                        "UID {uid} failed {tries} times ({reason})"
                                    )),
                                },
                            ));
                        } else {
                            tracing::warn!(mailbox = %self.settings.mailbox, folder = %s.folder, uid, tries, %reason, "message not delivered by the server; retrying next cycle");
                            retry_next.push(RetryMessage {
                                uid: u64::from(uid),
                                tries,
                                reason,
                            });
                        }
                    }
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
                retry: retry_next,
                delta_link: None,
            };
            if s.prev.as_ref() != Some(&position) {
                batch.positions.push((s.folder.clone(), position));
            }
        }
        // Arrival order (INTERNALDATE); the sort is stable, so ties keep folder
        // order and, within a folder, UID order.
        fetched.sort_by_key(|(date, index, _)| (*date, *index));
        batch.messages = fetched.into_iter().map(|(_, _, m)| m).collect();
        self.mid_cycle = batch.more;
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
        // Configured names map to the server's; a replay at the start of a
        // cycle may come before any fetch resolved them on this connection.
        if !self.names_resolved {
            self.resolve_folders(&mut client).await?;
        }
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
        // A missing folder is not a failed test: the mailbox syncs the rest
        // and the first cycle raises a Warning naming it.
        self.resolve_folders(&mut client).await?;
        let inbox = client.examine("INBOX").await?;
        let caps: Vec<&str> = ["IDLE", "CONDSTORE", "MOVE", "UIDPLUS"]
            .into_iter()
            .filter(|c| client.cached_capabilities().has(c))
            .collect();
        let line = format!(
            "IMAP {}:{} ({:?}) logged in; INBOX has {} message(s); {} folder(s) synced{}; server offers {}",
            self.settings.endpoint.host,
            self.settings.endpoint.port,
            self.settings.endpoint.tls,
            inbox.exists,
            folders.len() - self.missing.len(),
            if self.missing.is_empty() {
                String::new()
            } else {
                format!(" ({} missing on the server: {})", self.missing.len(), self.missing.join(", "))
            },
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
        self.fetch_inner().await.map_err(|e| {
            // The cycle ends with the error; the next fetch starts a new one.
            self.mid_cycle = false;
            self.fail(e)
        })
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

    fn holds_connection(&self) -> bool {
        self.client.is_some()
    }

    async fn close(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.logout()).await;
        }
    }

    fn token_expires_at(&self) -> Option<UnixTime> {
        self.token_expiry
    }

    fn token_issued_at(&self) -> Option<UnixTime> {
        self.token_issued
    }

    async fn read_marker(&mut self) -> Result<MarkerSlot, ConnectorError> {
        let mut client = self.take_client().await?;
        match client.read_marker().await {
            Ok(slot) => {
                self.client = Some(client);
                Ok(slot)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn write_marker(&mut self, marker: &Marker) -> Result<(), ConnectorError> {
        let mut client = self.take_client().await?;
        match client.write_marker(marker).await {
            Ok(()) => {
                self.client = Some(client);
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }
}

/// Up to three of `existing` closest to `wanted` by edit distance (ignoring
/// case; a shared parent folder breaks ties), for "did you mean" hints.
pub fn nearest_folders(wanted: &str, existing: &[String]) -> Vec<String> {
    let parent = |n: &str| n.rsplit_once('/').map(|(p, _)| p.to_ascii_lowercase());
    let mut ranked: Vec<(usize, bool, &String)> = existing
        .iter()
        .filter(|e| *e != wanted)
        .map(|e| {
            let d = edit_distance(&wanted.to_lowercase(), &e.to_lowercase());
            (d, parent(e) != parent(wanted), e)
        })
        .collect();
    ranked.sort();
    ranked
        .into_iter()
        .take(3)
        .map(|(_, _, e)| e.clone())
        .collect()
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row.first().copied().unwrap_or(0);
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let up = row.get(j + 1).copied().unwrap_or(usize::MAX);
            let left = row.get(j).copied().unwrap_or(usize::MAX);
            let cost = usize::from(ca != *cb);
            let next = (diag + cost)
                .min(up.saturating_add(1))
                .min(left.saturating_add(1));
            diag = up;
            if let Some(cell) = row.get_mut(j + 1) {
                *cell = next;
            }
        }
    }
    row.last().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_folders_rank_by_edit_distance() {
        let existing: Vec<String> = [
            "INBOX",
            "INBOX/Customers",
            "INBOX/Contoso",
            "Archive",
            "Sent",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        let near = nearest_folders("INBOX/Custmers", &existing);
        assert_eq!(
            near.first().map(String::as_str),
            Some("INBOX/Customers"),
            "{near:?}"
        );
        assert_eq!(near.len(), 3);
        assert!(nearest_folders("X", &[]).is_empty());
    }
}
