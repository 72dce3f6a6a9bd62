//! Maildir source: the embedded default and a simple import path.
//!
//! Reads `new/` and `cur/` of the inbox and of each synced folder (Maildir++:
//! folder `INBOX/Customers` or `Customers` lives in `.INBOX.Customers` or
//! `.Customers`). Files are never modified unless `delete_after_processing` is
//! set; what was processed is known from the store, keyed by the file's unique
//! name (the part before `:2,`), which survives flag changes and `new/`→`cur/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Ack, AckKind, Connector, ConnectorError, FetchBatch, RawMessage};
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
        }
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

    fn find(&self, source: &SourceKey) -> Result<Option<PathBuf>, ConnectorError> {
        Ok(self
            .list(&source.folder)?
            .into_iter()
            .find(|e| e.unique == source.uid)
            .map(|e| e.path))
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
        for folder in self.folders.clone() {
            let entries = self.list(&folder)?;
            let total = entries.len() as u64;
            for e in entries {
                if !self.store.is_seen(&self.source(&folder, &e.unique))? {
                    unseen.push((folder.clone(), e));
                }
            }
            batch.positions.push((
                folder.clone(),
                FolderPosition {
                    uidvalidity: 0,
                    next_uid: 0,
                    highest_modseq: None,
                    seen_count: total,
                    retry: Vec::new(),
                },
            ));
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

    async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<(), ConnectorError> {
        for ack in acks {
            let wants_delete = ack.kind == AckKind::Recorded && self.delete_after_processing;
            let wants_move = ack.kind == AckKind::Failed && self.move_failed_to.is_some();
            if !wants_delete && !wants_move {
                continue;
            }
            let Some(path) = self.find(&ack.source)? else {
                continue;
            };
            if wants_delete {
                tokio::fs::remove_file(&path)
                    .await
                    .map_err(|e| self.err(&path, e.to_string(), Disposition::Transient))?;
            } else if let Some(target) = &self.move_failed_to {
                let dir = self.folder_dir(target).join("cur");
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|e| self.err(&dir, e.to_string(), Disposition::Transient))?;
                let name = path
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_default();
                tokio::fs::rename(&path, dir.join(name))
                    .await
                    .map_err(|e| self.err(&path, e.to_string(), Disposition::Transient))?;
            }
        }
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

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
}
