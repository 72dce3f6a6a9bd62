//! The incoming pipeline for one fetched batch: parse → filter → correlate →
//! a [`CommitBatch`] for persist. Shared by the daemon and `replay`.
//!
//! Messages of one batch are handled in order and see each other: a reply
//! committed in the same batch as its parent still correlates to it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{FolderRule, TrackFilter};
use crate::connector::RawMessage;
use crate::correlate::{self, CorrelationSettings, Decision, MemIndex};
use crate::filter::{self, FilterPolicy, Verdict};
use crate::model::{
    CorrelationMethod, Direction, EmailActivity, QuarantineEntry, RecordRef, SourceKey,
};
use crate::parse;
use crate::store::{CommitBatch, PendingItem, Store, StoreError};

/// Per-mailbox inputs of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineContext {
    pub mailbox: String,
    pub own_addresses: Vec<String>,
    pub folder_rules: Vec<FolderRule>,
    pub settings: CorrelationSettings,
    pub policy: FilterPolicy,
    pub max_message_size: u64,
    /// Raw bytes of quarantined messages are written here before the commit.
    pub quarantine_dir: PathBuf,
    /// A forward mailbox: activities are attributed to the forwarding user.
    pub forward_mailbox: bool,
}

impl PipelineContext {
    /// Builds the context for a configured mailbox.
    pub fn for_mailbox(cfg: &crate::config::Config, mailbox: &crate::config::Mailbox) -> Self {
        let max = cfg
            .profile_of(mailbox)
            .map(|p| p.max_message_size)
            .unwrap_or(50 << 20);
        let own = vec![mailbox.email.to_ascii_lowercase()];
        PipelineContext {
            mailbox: mailbox.name.clone(),
            own_addresses: own.clone(),
            folder_rules: mailbox.tracked_folders.clone(),
            settings: cfg.correlation.clone(),
            policy: FilterPolicy {
                own_addresses: own,
                skip_auto_generated: true,
                track: mailbox.track,
            },
            max_message_size: max,
            quarantine_dir: cfg.quarantine_dir(),
            forward_mailbox: mailbox.incoming == crate::model::IncomingDelivery::ForwardMailbox,
        }
    }
}

/// What happened to one message, for logs, metrics and `replay` output.
#[derive(Debug, Clone)]
pub enum ItemResult {
    /// Processed before (crash replay); nothing to do.
    AlreadySeen,
    Correlated {
        activity: u64,
        /// The message's own Message-ID, if it has one.
        message_id: Option<String>,
        decision: Decision,
    },
    Quarantined {
        reason: String,
    },
}

/// Failure of the pipeline itself (not of a message: those are quarantined).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot save quarantined message to {path}: {source}")]
    Quarantine {
        path: String,
        source: std::io::Error,
    },
}

impl crate::error::Classify for PipelineError {
    fn disposition(&self) -> crate::error::Disposition {
        match self {
            PipelineError::Store(e) => e.disposition(),
            PipelineError::Quarantine { .. } => crate::error::Disposition::Transient,
        }
    }
}

/// Why a message was left on the server undownloaded.
pub fn too_large_reason(size: u64, limit: u64, folder: &str) -> String {
    format!("message of {size} bytes exceeds the {limit}-byte limit (max_message_size); left on the server in {folder}")
}

/// Turns a batch of raw messages into one commit batch.
pub fn process(
    store: &dyn Store,
    ctx: &PipelineContext,
    messages: &[RawMessage],
    now: i64,
) -> Result<(CommitBatch, Vec<(SourceKey, ItemResult)>), PipelineError> {
    let pairs: Vec<(&RawMessage, Option<&RecordRef>)> =
        messages.iter().map(|m| (m, None)).collect();
    process_seeded(store, ctx, &pairs, now)
}

/// Like [`process`], but a message paired with a record is tracked to it
/// without correlation (method `custom`): seeds for `replay` and tests.
pub fn process_seeded(
    store: &dyn Store,
    ctx: &PipelineContext,
    messages: &[(&RawMessage, Option<&RecordRef>)],
    now: i64,
) -> Result<(CommitBatch, Vec<(SourceKey, ItemResult)>), PipelineError> {
    let mut batch = CommitBatch::default();
    let mut results = Vec::with_capacity(messages.len());
    // Index entries of activities staged in this batch, so replies see parents.
    let mut staged = MemIndex::default();
    // (Message-ID, email identity) → activity staged in this batch, to mirror
    // the store's folder-move re-point for later messages of the same batch.
    let mut staged_copies: HashMap<(String, String), u64> = HashMap::new();
    for (m, seed) in messages {
        if store.is_seen(&m.source)? {
            results.push((m.source.clone(), ItemResult::AlreadySeen));
            continue;
        }
        if let Some(size) = m.too_large {
            // Not downloaded: a record without bytes, so the operator sees it
            // once and the source is not fetched again.
            let reason = too_large_reason(size, ctx.max_message_size, &m.source.folder);
            batch.items.push(PendingItem::Quarantine(QuarantineEntry {
                id: 0,
                source: m.source.clone(),
                reason: reason.clone(),
                saved_as: String::new(),
                size,
                at: now,
            }));
            results.push((m.source.clone(), ItemResult::Quarantined { reason }));
            continue;
        }
        let parsed = parse::parse_for(
            &m.raw,
            &m.source.folder,
            ctx.max_message_size,
            ctx.settings.wants_body_features(),
        );
        let mut parsed = match parsed {
            Ok(mut p) => {
                p.content_hash = parse::dedupe_hash(&m.raw, &p.features);
                p
            }
            Err(why) => {
                let reason = why.to_string();
                let saved = save_quarantined(&ctx.quarantine_dir, &m.source, &m.raw)?;
                batch.items.push(PendingItem::Quarantine(QuarantineEntry {
                    id: 0,
                    source: m.source.clone(),
                    reason: reason.clone(),
                    saved_as: saved.display().to_string(),
                    size: m.raw.len() as u64,
                    at: now,
                }));
                results.push((m.source.clone(), ItemResult::Quarantined { reason }));
                continue;
            }
        };
        let direction = if parsed
            .features
            .from
            .iter()
            .any(|a| ctx.own_addresses.contains(a))
        {
            Direction::Outgoing
        } else {
            Direction::Incoming
        };
        parsed.features.outgoing = direction == Direction::Outgoing;
        // The body fingerprint is the costliest feature: the quoted part's
        // only when scored smart matching gets to run, the whole body's only
        // when a tracked email is indexed.
        let decision = match filter::before_correlation(&parsed, &ctx.policy) {
            _ if seed.is_some() => Decision {
                method: CorrelationMethod::Custom,
                regarding: seed.cloned(),
                score: 1.0,
                reasons: vec![format!("seeded as {}", show_record(*seed))],
                correlated_with: None,
            },
            Verdict::Skip(reason) => skipped(reason),
            Verdict::Correlate => {
                let d = correlate::correlate_staged(
                    &mut parsed.features,
                    &parsed.body_text,
                    &ctx.settings,
                    |keys, idx| {
                        store.lookup_into(keys, idx)?;
                        staged.fill(keys, idx);
                        idx.folder_rules = &ctx.folder_rules;
                        Ok::<_, StoreError>(())
                    },
                )?;
                match filter::after_correlation(&d, &ctx.policy) {
                    Some(reason) if ctx.policy.track == TrackFilter::ResponsesOnly => {
                        skipped(reason)
                    }
                    _ => d,
                }
            }
        };
        let tracked = decision.regarding.is_some() || decision.correlated_with.is_some();
        if tracked && ctx.settings.wants_body_features() {
            parsed.features.add_index_features(&parsed.body_text);
        }
        let id = store.allocate_id()?;
        let f = parsed.features;
        let message_id = f.message_ids.first().cloned();
        let identity = crate::store::email_identity(&f.from, f.sent_at, &f.subject);
        if decision.method == CorrelationMethod::Folder {
            if let Some(existing) = existing_copy(store, &staged_copies, &f.message_ids, &identity)?
            {
                staged.set_regarding(existing, decision.regarding.clone());
            }
        }
        for mid in &f.message_ids {
            staged_copies
                .entry((correlate::normalize_message_id(mid), identity.clone()))
                .or_insert(id);
        }
        staged.insert_message_ids(&f.message_ids, id, decision.regarding.clone());
        // Only tracked email (a record, or linked to a tracked thread) feeds
        // the token, conversation and smart-matching indexes.
        if tracked {
            let entry = correlate::index_entry(&f, id, &ctx.settings);
            staged.insert_entry(&entry, decision.regarding.clone());
            batch.index.push(entry);
        }
        let activity = EmailActivity {
            id,
            mailbox: ctx.mailbox.clone(),
            source: m.source.clone(),
            message_ids: f.message_ids,
            in_reply_to: f.in_reply_to,
            references: f.references,
            direction,
            subject: f.subject,
            from: f.from,
            to: f.to,
            cc: f.cc,
            sent_at: f.sent_at,
            received_at: m.received_at.unwrap_or(now),
            regarding: decision.regarding.clone(),
            method: decision.method,
            score: decision.score,
            reasons: decision.reasons.clone(),
            correlated_with: decision.correlated_with,
            content_hash: parsed.content_hash,
            size: parsed.size,
            also_seen_as: Vec::new(),
            // Anyone can write this header into a mail; only the forward-mailbox
            // connector's own (prepended, first) one counts, and only there.
            forwarded_by: if ctx.forward_mailbox {
                parsed.forwarded_by.clone()
            } else {
                None
            },
        };
        batch.items.push(PendingItem::Activity(Box::new(activity)));
        results.push((
            m.source.clone(),
            ItemResult::Correlated {
                activity: id,
                message_id,
                decision,
            },
        ));
    }
    Ok((batch, results))
}

/// The activity this message duplicates (same Message-ID and
/// [`crate::store::email_identity`], as the store decides it), staged in this
/// batch or stored, which the store will re-point on commit.
fn existing_copy(
    store: &dyn Store,
    staged: &HashMap<(String, String), u64>,
    message_ids: &[String],
    identity: &str,
) -> Result<Option<u64>, PipelineError> {
    for mid in message_ids {
        let n = correlate::normalize_message_id(mid);
        if let Some(id) = staged.get(&(n.clone(), identity.to_string())) {
            return Ok(Some(*id));
        }
        if let Some(t) = store
            .tracked_by_message_ids(std::slice::from_ref(&n))?
            .get(&n)
        {
            if store.activity(t.activity)?.is_some_and(|a| {
                crate::store::email_identity(&a.from, a.sent_at, &a.subject) == identity
            }) {
                return Ok(Some(t.activity));
            }
        }
    }
    Ok(None)
}

fn show_record(r: Option<&RecordRef>) -> String {
    r.map_or_else(|| "-".to_string(), |r| r.to_string())
}

fn skipped(reason: String) -> Decision {
    Decision {
        method: CorrelationMethod::Skipped,
        regarding: None,
        score: 0.0,
        reasons: vec![reason],
        correlated_with: None,
    }
}

/// Writes a quarantined message's bytes durably; the file name derives from the
/// source so a replay after a crash overwrites instead of piling up copies.
fn save_quarantined(dir: &Path, source: &SourceKey, raw: &[u8]) -> Result<PathBuf, PipelineError> {
    let err = |path: &Path, source: std::io::Error| PipelineError::Quarantine {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, source.to_string().as_bytes());
    let name: String = digest
        .as_ref()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join(format!("{name}.eml"));
    let tmp = dir.join(format!("{name}.eml.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| err(&tmp, e))?;
    f.write_all(raw)
        .and_then(|_| f.sync_all())
        .map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourceKey;
    use crate::store::SledStore;

    fn ctx(dir: &Path) -> PipelineContext {
        PipelineContext {
            mailbox: "m".into(),
            own_addresses: vec!["me@us.test".into()],
            folder_rules: vec![
                FolderRule {
                    folder: "INBOX/A".into(),
                    regarding: "account:a".parse().unwrap(),
                },
                FolderRule {
                    folder: "INBOX/B".into(),
                    regarding: "account:b".parse().unwrap(),
                },
            ],
            settings: CorrelationSettings::default(),
            policy: FilterPolicy {
                own_addresses: vec!["me@us.test".into()],
                skip_auto_generated: true,
                track: TrackFilter::All,
            },
            max_message_size: 1 << 20,
            quarantine_dir: dir.join("q"),
            forward_mailbox: false,
        }
    }

    fn raw(folder: &str, uid: &str, headers: &str) -> RawMessage {
        RawMessage {
            source: SourceKey {
                mailbox: "m".into(),
                folder: folder.into(),
                uidvalidity: 1,
                uid: uid.into(),
            },
            raw: format!("From: c@them.test\r\nTo: me@us.test\r\nDate: Mon, 5 Jan 2026 10:00:00 +0000\r\n{headers}\r\nbody\r\n").into_bytes(),
            received_at: None,
            too_large: None,
        }
    }

    fn run(store: &SledStore, c: &PipelineContext, msgs: &[RawMessage]) -> Vec<Decision> {
        let (batch, results) = process(store, c, msgs, 0).unwrap();
        store.commit(batch).unwrap();
        results
            .into_iter()
            .filter_map(|(_, r)| match r {
                ItemResult::Correlated { decision, .. } => Some(decision),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn token_chain_in_one_batch_and_folder_move_re_points() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let c = ctx(dir.path());
        let d = run(
            &store,
            &c,
            &[
                raw(
                    "INBOX/A",
                    "1",
                    "Message-ID: <p@x>\r\nSubject: Offer CRM:0001001\r\n",
                ),
                raw(
                    "INBOX",
                    "2",
                    "Message-ID: <r@x>\r\nSubject: RE: [EXTERNAL] Offer [CRM:0001001]\r\n",
                ),
            ],
        );
        assert_eq!(d[0].method, CorrelationMethod::Folder);
        assert_eq!(d[1].method, CorrelationMethod::TrackingToken);
        assert_eq!(d[1].regarding.as_ref().unwrap().to_string(), "account:a");
        // The user moves the first message to folder B: it follows.
        run(
            &store,
            &c,
            &[raw(
                "INBOX/B",
                "9",
                "Message-ID: <p@x>\r\nSubject: Offer CRM:0001001\r\n",
            )],
        );
        let a = store.tracked_by_message_ids(&["p@x".into()]).unwrap();
        assert_eq!(
            a["p@x"].regarding.as_ref().unwrap().to_string(),
            "account:b"
        );
        // ... and a later reply to it follows the record too.
        let d = run(
            &store,
            &c,
            &[raw(
                "INBOX",
                "3",
                "Message-ID: <s@x>\r\nIn-Reply-To: <p@x>\r\nSubject: Re: Offer\r\n",
            )],
        );
        assert_eq!(d[0].regarding.as_ref().unwrap().to_string(), "account:b");
    }
}
