//! Maildir source: the embedded default and a simple import path.
//!
//! Reads `new/` and `cur/` of the inbox and of each synced folder (Maildir++:
//! folder `INBOX/Customers` or `Customers` lives in `.INBOX.Customers` or
//! `.Customers`). Files are never modified unless `delete_after_processing` is
//! set; what was processed is known from the store, keyed by the file's unique
//! name (the part before `:2,`), which survives flag changes and `new/`→`cur/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{Ack, AckKind, AckReport, Connector, ConnectorError, FetchBatch, RawMessage};
use crate::deployment::{Marker, MarkerSlot};
use crate::error::Disposition;
use crate::model::{FolderPosition, SourceKey};
use crate::store::Store;

/// Maildir connector for one mailbox.
pub struct MaildirConnector {
    mailbox: String,
    root: PathBuf,
    folders: Vec<String>,
    batch_size: usize,
    delete_after_processing: bool,
    move_failed_to: Option<String>,
    store: Arc<dyn Store>,
    /// Per folder: the modification times of `new/` and `cur/` at a scan
    /// that found nothing unseen, and when that scan was, so an idle poll
    /// costs two `stat`s instead of listing both directories.
    quiet: HashMap<String, QuietScan>,
}

/// A folder scan that found every message already seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QuietScan {
    new: Option<SystemTime>,
    cur: Option<SystemTime>,
    at: SystemTime,
}

/// A directory modified this close before a scan may change again within
/// the same timestamp tick unseen: such a scan is not trusted as quiet.
const MTIME_SETTLE: Duration = Duration::from_secs(2);

/// A quiet folder is listed again at least this often whatever its mtimes
/// say (file systems with coarse or unreliable mtimes, a clock step).
const FULL_RESCAN_EVERY: Duration = Duration::from_secs(15 * 60);

/// Modification time of a directory (`None`: missing or unreadable).
fn mtime(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir).and_then(|m| m.modified()).ok()
}

/// One message file found in a folder.
#[derive(Debug, Clone)]
struct Entry {
    unique: String,
    path: PathBuf,
}

impl MaildirConnector {
    /// `folders` are synced besides the inbox (tracked and extra folders).
    pub fn new(
        mailbox: &str,
        root: &Path,
        folders: Vec<String>,
        batch_size: usize,
        delete_after_processing: bool,
        move_failed_to: Option<String>,
        store: Arc<dyn Store>,
    ) -> Self {
        let mut all = vec!["INBOX".to_string()];
        for f in folders {
            if !all.iter().any(|x| x.eq_ignore_ascii_case(&f)) {
                all.push(f);
            }
        }
        MaildirConnector {
            mailbox: mailbox.to_string(),
            root: root.to_path_buf(),
            folders: all,
            batch_size: batch_size.max(1),
            delete_after_processing,
            move_failed_to,
            store,
            quiet: HashMap::new(),
        }
    }

    /// The `new/` and `cur/` mtimes of a folder when they can be trusted to
    /// show any change from now on; `None` when one was modified too
    /// recently (within [`MTIME_SETTLE`]) to tell a later change apart.
    fn settled_mtimes(&self, folder: &str, now: SystemTime) -> Option<QuietScan> {
        let dir = self.folder_dir(folder);
        let (new, cur) = (mtime(&dir.join("new")), mtime(&dir.join("cur")));
        let settled = |t: Option<SystemTime>| {
            t.is_none_or(|t| now.duration_since(t).is_ok_and(|age| age >= MTIME_SETTLE))
        };
        (settled(new) && settled(cur)).then_some(QuietScan { new, cur, at: now })
    }

    /// True when the folder was quiet at its last scan and neither `new/`
    /// nor `cur/` changed since (a delivery, a flag change, a move or a
    /// delete all change a directory's mtime).
    fn still_quiet(&self, folder: &str, now: SystemTime) -> bool {
        let Some(last) = self.quiet.get(folder) else {
            return false;
        };
        if now
            .duration_since(last.at)
            .map_or(true, |age| age >= FULL_RESCAN_EVERY)
        {
            return false;
        }
        let dir = self.folder_dir(folder);
        mtime(&dir.join("new")) == last.new && mtime(&dir.join("cur")) == last.cur
    }

    /// Directory of a folder; `INBOX/X` and `X` both map to Maildir++ `.INBOX.X` if
    /// it exists, else `.X`.
    fn folder_dir(&self, folder: &str) -> PathBuf {
        if folder.eq_ignore_ascii_case("INBOX") {
            return self.root.clone();
        }
        let dotted = format!(".{}", folder.replace('/', "."));
        let candidate = self.root.join(&dotted);
        if candidate.exists() {
            return candidate;
        }
        let stripped = folder.strip_prefix("INBOX/").unwrap_or(folder);
        self.root.join(format!(".{}", stripped.replace('/', ".")))
    }

    fn err(
        &self,
        path: &Path,
        detail: impl Into<String>,
        disposition: Disposition,
    ) -> ConnectorError {
        ConnectorError::Maildir {
            path: path.display().to_string(),
            detail: detail.into(),
            disposition,
        }
    }

    /// Lists message files of a folder in name order (arrival order for
    /// conventional names). A missing folder other than INBOX is a permanent error.
    fn list(&self, folder: &str) -> Result<Vec<Entry>, ConnectorError> {
        let dir = self.folder_dir(folder);
        if !dir.is_dir() {
            return Err(self.err(
                &dir,
                format!("folder {folder:?} does not exist"),
                Disposition::Permanent,
            ));
        }
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let d = dir.join(sub);
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err(&d, e.to_string(), Disposition::Transient)),
            };
            for entry in rd {
                let entry =
                    entry.map_err(|e| self.err(&d, e.to_string(), Disposition::Transient))?;
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with('.') {
                    continue;
                }
                let unique = name.split(':').next().unwrap_or(&name).to_string();
                out.push(Entry {
                    unique,
                    path: entry.path(),
                });
            }
        }
        out.sort_by(|a, b| a.unique.cmp(&b.unique));
        out.dedup_by(|a, b| a.unique == b.unique);
        Ok(out)
    }

    fn source(&self, folder: &str, unique: &str) -> SourceKey {
        SourceKey {
            mailbox: self.mailbox.clone(),
            folder: folder.to_string(),
            uidvalidity: 0,
            uid: unique.to_string(),
        }
    }

    /// Deletes (recorded) or moves to `move_failed_to` (failed) one message
    /// file. Ok(false): the file is no longer at `path`.
    async fn follow_up(&self, kind: AckKind, path: &Path) -> Result<bool, ConnectorError> {
        let fail = |p: &Path, e: std::io::Error| self.err(p, e.to_string(), io_disposition(&e));
        let done = |r: std::io::Result<()>| match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(fail(path, e)),
        };
        match (kind, &self.move_failed_to) {
            (AckKind::Recorded, _) => done(tokio::fs::remove_file(path).await),
            (AckKind::Failed, Some(target)) => {
                let dir = self.folder_dir(target).join("cur");
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|e| fail(&dir, e))?;
                let name = path
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_default();
                done(tokio::fs::rename(path, dir.join(name)).await)
            }
            (AckKind::Failed, None) => Ok(true),
        }
    }
}

/// Permission and "not a directory" problems need an operator; the rest
/// (a busy or full disk) may pass.
fn io_disposition(e: &std::io::Error) -> Disposition {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied | ErrorKind::NotADirectory | ErrorKind::ReadOnlyFilesystem => {
            Disposition::Permanent
        }
        _ => Disposition::Transient,
    }
}

impl Connector for MaildirConnector {
    fn protocol(&self) -> &'static str {
        "maildir"
    }

    async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
        let mut batch = FetchBatch::default();
        // Unseen messages of all folders, merged in arrival order (Maildir unique
        // names start with the delivery time), so a reply filed in one folder is
        // not processed before its parent filed in another.
        let mut unseen: Vec<(String, Entry)> = Vec::new();
        let mut stored: Option<HashMap<String, FolderPosition>> = None;
        for folder in self.folders.clone() {
            let now = SystemTime::now();
            if self.still_quiet(&folder, now) {
                continue;
            }
            // Taken before listing: a change made during the listing moves
            // the mtime past what is recorded, so it is not missed.
            let before = self.settled_mtimes(&folder, now);
            let entries = self.list(&folder)?;
            let total = entries.len() as u64;
            let mut found = false;
            for e in entries {
                if !self.store.is_seen(&self.source(&folder, &e.unique))? {
                    unseen.push((folder.clone(), e));
                    found = true;
                }
            }
            match before {
                Some(scan) if !found => {
                    self.quiet.insert(folder.clone(), scan);
                }
                _ => {
                    self.quiet.remove(&folder);
                }
            }
            let position = FolderPosition {
                uidvalidity: 0,
                next_uid: 0,
                highest_modseq: None,
                seen_count: total,
                retry: Vec::new(),
                delta_link: None,
            };
            // Only a changed position is committed: an idle poll writes nothing.
            let stored = match &mut stored {
                Some(s) => s,
                None => stored.insert(self.store.folder_positions(&self.mailbox)?),
            };
            if stored.get(&folder) != Some(&position) {
                batch.positions.push((folder.clone(), position));
            }
        }
        unseen.sort_by(|a, b| a.1.unique.cmp(&b.1.unique).then_with(|| a.0.cmp(&b.0)));
        let waiting = unseen.len() as u64;
        for (folder, e) in unseen.into_iter().take(self.batch_size) {
            match tokio::fs::read(&e.path).await {
                Ok(raw) => {
                    let received_at = std::fs::metadata(&e.path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs() as i64);
                    batch.messages.push(RawMessage {
                        source: self.source(&folder, &e.unique),
                        raw,
                        received_at,
                        too_large: None,
                        unfetchable: None,
                    });
                }
                // Renamed (new/→cur/) or removed between listing and reading:
                // the next cycle sees it again under its new path.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                // One unreadable file (permissions, a bad block) must not stop
                // the mailbox: it is quarantined with the reason and stays put.
                Err(err) => batch.messages.push(RawMessage {
                    source: self.source(&folder, &e.unique),
                    raw: Vec::new(),
                    received_at: None,
                    too_large: None,
                    unfetchable: Some(format!("cannot read {}: {err}", e.path.display())),
                }),
            }
        }
        batch.backlog = waiting.saturating_sub(batch.messages.len() as u64);
        batch.more = batch.backlog > 0;
        Ok(batch)
    }

    async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
        let mut report = AckReport::default();
        // Each folder is listed once per call, not once per message.
        let mut listed: HashMap<String, HashMap<String, PathBuf>> = HashMap::new();
        for ack in acks {
            if !self.wants_follow_up(ack.kind) {
                continue;
            }
            let folder = ack.source.folder.clone();
            if !listed.contains_key(&folder) {
                let files = match self.list(&folder) {
                    Ok(entries) => entries.into_iter().map(|e| (e.unique, e.path)).collect(),
                    // A folder that is gone holds nothing to delete or move.
                    Err(_) if !self.folder_dir(&folder).exists() => HashMap::new(),
                    Err(e) => {
                        report.fail_all([&ack.source], &e);
                        continue;
                    }
                };
                listed.insert(folder.clone(), files);
            }
            // Already deleted or moved (a replay): nothing left to do.
            let Some(path) = listed
                .get_mut(&folder)
                .and_then(|files| files.remove(&ack.source.uid))
            else {
                continue;
            };
            let mut done = self.follow_up(ack.kind, &path).await;
            if let Ok(false) = done {
                // Renamed meanwhile (new/ → cur/, a flag change): look again, once.
                let renamed = self
                    .list(&folder)
                    .ok()
                    .and_then(|entries| entries.into_iter().find(|e| e.unique == ack.source.uid));
                done = match renamed {
                    Some(e) => self.follow_up(ack.kind, &e.path).await,
                    None => Ok(true),
                };
            }
            if let Err(e) = done {
                report.fail_all([&ack.source], &e);
            }
        }
        Ok(report)
    }

    fn wants_follow_up(&self, kind: AckKind) -> bool {
        match kind {
            AckKind::Recorded => self.delete_after_processing,
            AckKind::Failed => self.move_failed_to.is_some(),
        }
    }

    fn holds_connection(&self) -> bool {
        false
    }

    async fn wait_for_changes(
        &mut self,
        max: Duration,
        _keep_connection: bool,
        cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        tokio::select! {
            _ = tokio::time::sleep(max) => {}
            _ = cancel.cancelled() => {}
        }
        Ok(())
    }

    async fn test(&mut self) -> Result<String, ConnectorError> {
        let mut total = 0;
        for folder in self.folders.clone() {
            total += self.list(&folder)?.len();
        }
        Ok(format!(
            "maildir {} readable: {} folder(s), {} message(s)",
            self.root.display(),
            self.folders.len(),
            total
        ))
    }

    async fn close(&mut self) {}

    async fn read_marker(&mut self) -> Result<MarkerSlot, ConnectorError> {
        let path = self.root.join(MARKER_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Marker::from_json(&text).map_or(MarkerSlot::Empty, MarkerSlot::Held)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MarkerSlot::Empty),
            Err(e) => Err(self.marker_error(&path, "read", &e)),
        }
    }

    async fn write_marker(&mut self, marker: &Marker) -> Result<(), ConnectorError> {
        // Written beside and renamed over, so a reader never sees half a marker.
        let path = self.root.join(MARKER_FILE);
        let tmp = self.root.join(format!("{MARKER_FILE}.tmp"));
        let written = crate::private_fs::create_file(&tmp).and_then(|mut f| {
            std::io::Write::write_all(&mut f, format!("{}\n", marker.to_json()).as_bytes())?;
            f.sync_all()
        });
        written
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| self.marker_error(&path, "write", &e))
    }
}

/// The deployment marker of a Maildir: a file in its root, which Maildir
/// readers ignore (only `new/`, `cur/`, `tmp/` and `.Folder` directories
/// hold mail).
pub const MARKER_FILE: &str = ".crm-mailsync-deployment";

impl MaildirConnector {
    fn marker_error(&self, path: &Path, action: &str, e: &std::io::Error) -> ConnectorError {
        ConnectorError::Maildir {
            path: path.display().to_string(),
            detail: format!("cannot {action} the deployment marker: {e}"),
            disposition: Disposition::Transient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    /// Follow-ups are replayed after a crash, so each must be idempotent:
    /// a delete or move of a file already gone succeeds quietly, a file
    /// renamed meanwhile (new/ → cur/, flags) is still found, and a
    /// connector that never fetched it works from the source key alone.
    #[tokio::test]
    async fn follow_ups_are_idempotent_and_find_renamed_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("Maildir");
        for d in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let connector = |delete| {
            MaildirConnector::new(
                "m",
                &root,
                Vec::new(),
                10,
                delete,
                Some("Failed".into()),
                store.clone(),
            )
        };
        std::fs::write(root.join("new/1.M1P1.a"), "Subject: a\n\nx\n").unwrap();
        std::fs::write(root.join("new/2.M2P1.b"), "garbage").unwrap();
        let ack = |uid: &str, kind| Ack {
            source: SourceKey {
                mailbox: "m".into(),
                folder: "INBOX".into(),
                uidvalidity: 0,
                uid: uid.into(),
            },
            kind,
        };
        let acks = || {
            vec![
                ack("1.M1P1.a", AckKind::Recorded),
                ack("2.M2P1.b", AckKind::Failed),
            ]
        };
        // Renamed by a mail client after our listing would have been taken.
        std::fs::rename(root.join("new/1.M1P1.a"), root.join("cur/1.M1P1.a:2,S")).unwrap();
        for round in 0..2 {
            let report = connector(true).acknowledge(acks()).await.unwrap();
            assert!(report.failed.is_empty(), "round {round}: {report:?}");
            assert!(report.obsolete.is_empty(), "round {round}: {report:?}");
            assert!(!root.join("cur/1.M1P1.a:2,S").exists(), "round {round}");
            assert!(root.join(".Failed/cur/2.M2P1.b").exists(), "round {round}");
            assert!(!root.join("new/2.M2P1.b").exists(), "round {round}");
        }
        // Without delete_after_processing nothing is owed for recorded mail.
        assert!(!connector(false).wants_follow_up(AckKind::Recorded));
        assert!(connector(false).wants_follow_up(AckKind::Failed));
    }

    /// Regression (#17 §3): one file that cannot be read failed the whole
    /// fetch, every cycle. Now it comes back as unfetchable (quarantined by
    /// the pipeline, file left in place) and the others are fetched.
    #[tokio::test]
    async fn unreadable_file_is_unfetchable_and_the_rest_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("Maildir");
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let mail = b"From: a@b.example\r\nSubject: s\r\n\r\nbody\r\n";
        std::fs::write(root.join("new/1000.a.host"), mail).unwrap();
        // Tests run as root, who can read any file: a directory in its place
        // is unreadable as a file for everyone.
        std::fs::create_dir(root.join("new/1001.b.host")).unwrap();
        std::fs::write(root.join("new/1002.c.host"), mail).unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let mut c = MaildirConnector::new("m", &root, vec![], 10, false, None, store);
        let batch = c.fetch().await.unwrap();
        let got: Vec<(&str, bool, Option<&str>)> = batch
            .messages
            .iter()
            .map(|m| {
                (
                    m.source.uid.as_str(),
                    m.raw.is_empty(),
                    m.unfetchable.as_deref(),
                )
            })
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!((got[0].0, got[0].1), ("1000.a.host", false));
        assert_eq!((got[2].0, got[2].1), ("1002.c.host", false));
        assert_eq!(got[1].0, "1001.b.host");
        let why = got[1].2.unwrap_or_default();
        assert!(
            why.contains("cannot read") && why.contains("1001.b.host"),
            "{why}"
        );
    }

    /// Sets a directory's modification time (as if last changed `ago`).
    fn age(dir: &Path, ago: Duration) {
        let f = std::fs::File::open(dir).unwrap();
        f.set_modified(SystemTime::now() - ago).unwrap();
    }

    /// An idle poll of a folder whose `new/` and `cur/` did not change since
    /// a scan that found everything seen lists nothing and reports no
    /// position (so the scheduler commits nothing); a delivery (which moves
    /// the directory's mtime) is found at the next poll.
    #[tokio::test]
    async fn unchanged_folders_are_not_listed_again_and_new_mail_is_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("Maildir");
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let hour = Duration::from_secs(3600);
        let store = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let mut c = MaildirConnector::new("m", &root, vec![], 10, false, None, store.clone());
        age(&root.join("new"), hour);
        age(&root.join("cur"), hour);
        let first = c.fetch().await.unwrap();
        assert!(first.messages.is_empty());
        assert_eq!(
            first.positions.len(),
            1,
            "the first scan reports its position"
        );
        store
            .commit(crate::store::CommitBatch {
                positions: first
                    .positions
                    .iter()
                    .map(|(f, p)| ("m".to_string(), f.clone(), p.clone()))
                    .collect(),
                ..Default::default()
            })
            .unwrap();
        // A file that appears without moving the directory's mtime (as on a
        // file system that does not keep them) shows the listing is skipped.
        let was = std::fs::metadata(root.join("new"))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::write(root.join("new/1000.a.host"), "Subject: a\n\nx\n").unwrap();
        let f = std::fs::File::open(root.join("new")).unwrap();
        f.set_modified(was).unwrap();
        let idle = c.fetch().await.unwrap();
        assert!(
            idle.messages.is_empty() && idle.positions.is_empty(),
            "{:?}",
            idle.positions
        );
        // A real delivery moves the mtime: both files are found.
        std::fs::write(root.join("tmp/1001.b.host"), "Subject: b\n\ny\n").unwrap();
        std::fs::rename(root.join("tmp/1001.b.host"), root.join("new/1001.b.host")).unwrap();
        let got = c.fetch().await.unwrap();
        let uids: Vec<&str> = got.messages.iter().map(|m| m.source.uid.as_str()).collect();
        assert_eq!(uids, ["1000.a.host", "1001.b.host"]);
        assert_eq!(got.positions[0].1.seen_count, 2);
    }
}
