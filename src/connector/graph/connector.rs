//! The incoming Graph connector: delta rounds over the configured folders,
//! raw MIME downloads, positions committed with the batch (see the module
//! docs of [`super`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use reqwest::Method;
use tokio_util::sync::CancellationToken;

use super::client::{path_segment, Body, GraphMailbox, Request};
use super::delta::{folder_hash, initial_link, parse_page, Item, Next, Round};
use super::error::{GraphError, Target};
use super::{folders, GraphSettings};
use crate::connector::{
    Ack, AckKind, AckReport, Connector, ConnectorError, FetchBatch, Notice, RawMessage,
};
use crate::deployment::{Marker, MarkerSlot};
use crate::error::{Classify, Disposition};
use crate::model::{AlertLevel, FolderPosition, SourceKey, UnixTime};
use crate::store::Store;

/// Pages read in one fetch at most, even when they list only known
/// messages (a resync of a large folder): the position advances and is
/// committed in between.
const MAX_PAGES_PER_FETCH: usize = 20;

/// One synced folder.
#[derive(Debug)]
pub(super) struct Folder {
    pub path: String,
    pub id: String,
    pub uidvalidity: u64,
    /// The link last reported as this folder's position (what the store
    /// holds once the batch is committed); `None` = start a full round.
    pub link: Option<String>,
    /// A page in hand.
    pub round: Option<Round>,
    /// This cycle's round reached the delta link.
    pub done: bool,
}

/// The Graph connector of one mailbox.
pub struct GraphConnector {
    pub(super) mailbox: Arc<GraphMailbox>,
    pub(super) settings: GraphSettings,
    pub(super) store: Arc<dyn Store>,
    /// Resolved folders, in configuration order; empty until the first fetch.
    pub(super) folders: Vec<Folder>,
    /// The `move_failed_to` folder's id, once resolved or created.
    pub(super) failed_folder: Option<String>,
    /// A wait happened since the last fetch: start new rounds.
    new_cycle: bool,
    /// Categories of handed-out messages as their delta page listed them,
    /// until their follow-up (a restart falls back to reading them).
    pub(super) listed_categories: std::collections::HashMap<String, Vec<String>>,
}

/// Entries of `listed_categories` kept at most (follow-ups of a long
/// outage read the categories instead).
const LISTED_CATEGORIES_MAX: usize = 20_000;

impl GraphConnector {
    /// The connector for `settings.mailbox` through `mailbox` (shared with
    /// the mailbox's sender).
    pub fn new(mailbox: Arc<GraphMailbox>, settings: GraphSettings, store: Arc<dyn Store>) -> Self {
        GraphConnector {
            mailbox,
            settings,
            store,
            folders: Vec::new(),
            failed_folder: None,
            new_cycle: true,
            listed_categories: Default::default(),
        }
    }

    fn source(&self, f: &Folder, id: &str) -> SourceKey {
        SourceKey {
            mailbox: self.settings.mailbox.clone(),
            folder: f.path.clone(),
            uidvalidity: f.uidvalidity,
            uid: id.to_string(),
        }
    }

    /// Resolves the configured folders once (ids are cached; a folder that
    /// is gone clears the cache).
    async fn ensure_folders(&mut self) -> Result<(), GraphError> {
        if !self.folders.is_empty() {
            return Ok(());
        }
        let mut paths: Vec<String> = Vec::new();
        for p in &self.settings.folders {
            let norm = folders::segments(p).join("/");
            if !norm.is_empty() && !paths.iter().any(|x| x.eq_ignore_ascii_case(&norm)) {
                paths.push(norm);
            }
        }
        if paths.is_empty() {
            paths.push("Inbox".into());
        }
        let mut out = Vec::with_capacity(paths.len());
        for path in paths {
            let id = folders::require(&self.mailbox, &path).await?;
            out.push(Folder {
                uidvalidity: folder_hash(&id),
                path,
                id,
                link: None,
                round: None,
                done: false,
            });
        }
        self.folders = out;
        Ok(())
    }

    /// Forgets everything held in memory: the next fetch starts from the
    /// stored positions.
    fn reset(&mut self) {
        for f in &mut self.folders {
            f.round = None;
            f.done = false;
        }
        self.new_cycle = true;
    }

    async fn fetch_batch(&mut self) -> Result<FetchBatch, ConnectorError> {
        self.ensure_folders().await?;
        let stored = self.store.folder_positions(&self.settings.mailbox)?;
        if std::mem::take(&mut self.new_cycle) {
            for f in &mut self.folders {
                f.done = false;
            }
        }
        let mut batch = FetchBatch::default();
        let batch_size = self.settings.batch_size.max(1);
        let mut picked: Vec<(usize, Item)> = Vec::new();
        // A message changed during a round is listed again on a later page.
        let mut in_batch: std::collections::HashSet<(usize, String)> = Default::default();
        let mut pages = 0usize;
        let mut stored_links: Vec<Option<String>> = Vec::with_capacity(self.folders.len());
        'folders: for fi in 0..self.folders.len() {
            let prev = stored.get(&self.folders[fi].path);
            let f = &mut self.folders[fi];
            let stored_link = prev
                .filter(|p| p.uidvalidity == f.uidvalidity)
                .and_then(|p| p.delta_link.clone());
            stored_links.push(stored_link.clone());
            if f.link != stored_link {
                // The last batch was not committed (or this is the first
                // fetch): go on from what the store holds.
                f.round = None;
                f.done = false;
                f.link = stored_link.clone();
            }
            if f.link.is_none()
                && f.round.is_none()
                && prev.is_some_and(|p| p.uidvalidity != f.uidvalidity && p.delta_link.is_some())
            {
                batch.notices.push(Notice::new(
                    AlertLevel::Information,
                    format!("folder_recreated:{}", f.path),
                    format!(
                        "folder {} of mailbox {} has a new id (deleted and recreated?): syncing it from the start; known messages are not recorded twice",
                        f.path, self.settings.mailbox
                    ),
                ));
            }
            if f.done {
                continue;
            }
            let mut resynced = false;
            loop {
                if let Some(mut round) = self.folders[fi].round.take() {
                    let path = self.folders[fi].path.clone();
                    let uidvalidity = self.folders[fi].uidvalidity;
                    while picked.len() < batch_size {
                        let Some(item) = round.items.pop_front() else {
                            break;
                        };
                        let key = SourceKey {
                            mailbox: self.settings.mailbox.clone(),
                            folder: path.clone(),
                            uidvalidity,
                            uid: item.id.clone(),
                        };
                        // Changed messages (our own category PATCH, a read
                        // flag) come again: known ids are skipped unread.
                        if !in_batch.contains(&(fi, item.id.clone()))
                            && !self.store.is_seen(&key)?
                        {
                            in_batch.insert((fi, item.id.clone()));
                            picked.push((fi, item));
                        }
                    }
                    let f = &mut self.folders[fi];
                    if !round.items.is_empty() {
                        // The batch is full inside this page: the page is
                        // asked again next time (its handed-out messages
                        // are known by then).
                        f.link = Some(round.page_link.clone());
                        batch.backlog = round.items.len() as u64;
                        f.round = Some(round);
                        batch.more = true;
                        break 'folders;
                    }
                    f.link = Some(round.next.link().to_string());
                    if let Next::Done(_) = round.next {
                        f.done = true;
                        break;
                    }
                    if picked.len() >= batch_size {
                        batch.more = true;
                        break 'folders;
                    }
                }
                if pages >= MAX_PAGES_PER_FETCH {
                    batch.more = true;
                    break 'folders;
                }
                let f = &self.folders[fi];
                let link = f
                    .link
                    .clone()
                    .unwrap_or_else(|| initial_link(&f.id, self.settings.process_email_from));
                let what = format!("reading changes of folder {}", f.path);
                let prefer = format!("odata.maxpagesize={}", self.settings.page_size.max(1));
                pages += 1;
                match self
                    .mailbox
                    .get_json(&link, Some(prefer), Target::Mailbox, &what)
                    .await
                {
                    Ok(v) => {
                        let page = parse_page(&v, &what)?;
                        self.folders[fi].round = Some(Round {
                            page_link: link,
                            items: VecDeque::from(page.items),
                            next: page.next,
                        });
                    }
                    Err(e) if e.is_resync() && self.folders[fi].link.is_some() && !resynced => {
                        resynced = true;
                        let f = &mut self.folders[fi];
                        tracing::info!(connector = "graph", mailbox = %self.settings.mailbox, folder = %f.path, error = %e, "delta state no longer valid; full resync");
                        // One text per mailbox (not per folder): the
                        // store aggregates the folders into one alert.
                        batch.notices.push(Notice::new(
                            AlertLevel::Information,
                            "sync_state_dropped",
                            format!(
                                "mailbox {}: Microsoft Graph dropped the sync state of its folders ({}); they are synced again from the start, known messages are not recorded twice",
                                self.settings.mailbox,
                                e.code().filter(|c| !c.is_empty()).unwrap_or("410 Gone")
                            ),
                        ));
                        f.link = None;
                    }
                    Err(e) => {
                        if e.is_gone() {
                            // The folder itself is gone: resolve the paths again.
                            self.folders.clear();
                        }
                        return Err(e.into());
                    }
                }
            }
        }
        if !batch.more {
            // Every folder's round is complete: the next fetch (after a wait) starts new ones.
            self.new_cycle = true;
        }
        for (f, stored_link) in self.folders.iter().zip(stored_links) {
            if f.link != stored_link {
                batch.positions.push((
                    f.path.clone(),
                    FolderPosition {
                        uidvalidity: f.uidvalidity,
                        delta_link: f.link.clone(),
                        ..FolderPosition::default()
                    },
                ));
            }
        }
        if self.listed_categories.len() + picked.len() > LISTED_CATEGORIES_MAX {
            self.listed_categories.clear();
        }
        for (_, item) in &picked {
            if let Some(c) = &item.categories {
                self.listed_categories.insert(item.id.clone(), c.clone());
            }
        }
        batch.messages = self.download(picked).await?;
        Ok(batch)
    }

    /// Downloads `$value` of each item, as many at once as the mailbox allows.
    async fn download(
        &self,
        picked: Vec<(usize, Item)>,
    ) -> Result<Vec<RawMessage>, ConnectorError> {
        let max = self.settings.max_message_size;
        let jobs = picked.into_iter().map(|(fi, item)| {
            let source = self.source(&self.folders[fi], &item.id);
            let mb = self.mailbox.clone();
            async move {
                let path = format!("messages/{}/$value", path_segment(&item.id));
                let r = mb
                    .request(Request {
                        method: Method::GET,
                        path: &path,
                        body: Body::None,
                        prefer: None,
                        target: Target::Message,
                        what: "downloading a message ($value)",
                        max_body: (max > 0).then_some(max),
                    })
                    .await;
                (source, item.received_at, r)
            }
        });
        let results: Vec<_> = futures::stream::iter(jobs)
            .buffered(self.mailbox.max_in_flight())
            .collect()
            .await;
        let mut out = Vec::with_capacity(results.len());
        for (source, received_at, r) in results {
            match r {
                Ok(a) => out.push(RawMessage {
                    source,
                    raw: a.body,
                    received_at,
                    too_large: a.too_large,
                    unfetchable: None,
                }),
                // Deleted between the listing and the download: nothing to record.
                Err(e) if e.is_gone() => {}
                Err(e) if message_level(&e) => out.push(RawMessage {
                    source,
                    raw: Vec::new(),
                    received_at,
                    too_large: None,
                    unfetchable: Some(e.to_string()),
                }),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }
}

/// A permanent failure of one message (not of the mailbox, the token or
/// the network): quarantined, the rest goes on.
fn message_level(e: &GraphError) -> bool {
    matches!(e, GraphError::Refused { .. } | GraphError::BadAnswer { .. })
        && e.disposition() == Disposition::Permanent
}

impl Connector for GraphConnector {
    fn protocol(&self) -> &'static str {
        "graph"
    }

    async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
        let r = self.fetch_batch().await;
        if r.is_err() {
            self.reset();
        }
        r
    }

    async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
        super::ack::acknowledge(self, acks).await
    }

    fn wants_follow_up(&self, kind: AckKind) -> bool {
        match kind {
            AckKind::Recorded => {
                self.settings.delete_after_processing || self.settings.processed_category.is_some()
            }
            AckKind::Failed => self.settings.move_failed_to.is_some(),
        }
    }

    async fn wait_for_changes(
        &mut self,
        max: Duration,
        _keep_connection: bool,
        cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        // Polling: Graph's push (change notifications) needs a public
        // HTTPS endpoint, which a self-hosted daemon may not have.
        tokio::select! {
            _ = tokio::time::sleep(max) => {}
            _ = cancel.cancelled() => {}
        }
        self.new_cycle = true;
        Ok(())
    }

    async fn test(&mut self) -> Result<String, ConnectorError> {
        self.mailbox.check_token().await?;
        let inbox = self.mailbox.probe_inbox().await?;
        self.folders.clear();
        self.ensure_folders().await?;
        let expires = self
            .mailbox
            .token_expires_at()
            .map(|t| format!(" (token valid until {})", crate::model::format_time(t)))
            .unwrap_or_default();
        Ok(format!(
            "token issued{expires}; mailbox {} reachable; {inbox}; {} folder(s) found: {}",
            self.mailbox.user(),
            self.folders.len(),
            self.folders
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    async fn close(&mut self) {}

    fn token_expires_at(&self) -> Option<UnixTime> {
        self.settings.client_secret_expires_at
    }

    fn expiring_credential(&self) -> &'static str {
        "the Entra app's client secret"
    }

    async fn read_marker(&mut self) -> Result<MarkerSlot, ConnectorError> {
        Ok(super::marker::read(&self.mailbox).await?)
    }

    async fn write_marker(&mut self, marker: &Marker) -> Result<(), ConnectorError> {
        Ok(super::marker::write(&self.mailbox, marker).await?)
    }
}
