//! Retrying a quarantined message: its saved bytes go through the pipeline
//! again (with today's parser and settings), and when they make an
//! activity the quarantine entry goes in the same atomic commit. What still
//! cannot be read stays quarantined, unchanged.

use crate::config::Config;
use crate::connector::RawMessage;
use crate::model::{ActivityId, QuarantineEntry, UnixTime};
use crate::pipeline::{self, ItemResult, PipelineContext, PipelineError};
use crate::store::{CommitOutcome, Store, StoreError};

/// What a retry did.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    /// The message is an activity now (`duplicate`: of one already
    /// recorded); the quarantine entry is gone.
    Recorded {
        activity_id: ActivityId,
        duplicate: bool,
    },
    /// Still not processable: the entry stays, with this reason.
    StillQuarantined { reason: String },
}

/// Why a retry could not run.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("no quarantined message {0}")]
    NotFound(u64),
    #[error("quarantined message {id} was never downloaded ({reason}); there is nothing here to retry: fix it on the server (or raise max_message_size) and move the message back into a synced folder")]
    NotDownloaded { id: u64, reason: String },
    #[error(
        "quarantined message {id} belongs to mailbox {mailbox:?}, which is no longer configured"
    )]
    MailboxGone { id: u64, mailbox: String },
    #[error("the saved bytes of quarantined message {id} cannot be read from {path}: {source}")]
    Bytes {
        id: u64,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// Processes quarantine entry `id` again; see the module docs.
pub fn retry(
    store: &dyn Store,
    config: &Config,
    id: u64,
    now: UnixTime,
) -> Result<RetryOutcome, RetryError> {
    let entry = store
        .quarantine_entry(id)?
        .ok_or(RetryError::NotFound(id))?;
    if entry.saved_as.is_empty() {
        return Err(RetryError::NotDownloaded {
            id,
            reason: entry.reason,
        });
    }
    let Some(mailbox) = config
        .mailboxes
        .iter()
        .find(|m| m.name == entry.source.mailbox)
    else {
        return Err(RetryError::MailboxGone {
            id,
            mailbox: entry.source.mailbox,
        });
    };
    let raw = std::fs::read(&entry.saved_as).map_err(|source| RetryError::Bytes {
        id,
        path: entry.saved_as.clone(),
        source,
    })?;
    let message = RawMessage {
        source: entry.source.clone(),
        raw,
        received_at: Some(entry.at),
        too_large: None,
        unfetchable: None,
    };
    let ctx = PipelineContext::for_mailbox(config, mailbox);
    let (batch, results) = pipeline::process_quarantined(store, &ctx, &message, now)?;
    if let Some((_, ItemResult::Quarantined { reason, .. })) = results.first() {
        // Not committed: the entry already says all of it.
        return Ok(RetryOutcome::StillQuarantined {
            reason: reason.clone(),
        });
    }
    let (outcomes, released) = store.commit_quarantine_retry(id, batch)?;
    let recorded = outcomes.iter().find_map(|o| match o {
        CommitOutcome::Inserted(a) => Some((*a, false)),
        CommitOutcome::Duplicate(a) => Some((*a, true)),
        _ => None,
    });
    match (recorded, released) {
        (Some((activity_id, duplicate)), true) => {
            after_release(store, &entry, now);
            Ok(RetryOutcome::Recorded {
                activity_id,
                duplicate,
            })
        }
        // Released by a concurrent retry, or filtered away (the pipeline
        // skips what it must not record): the entry stays for the operator.
        _ => Ok(RetryOutcome::StillQuarantined {
            reason: format!(
                "processing it again recorded nothing ({}); the entry stays",
                results
                    .first()
                    .map(|(_, r)| describe(r))
                    .unwrap_or("no result")
            ),
        }),
    }
}

fn describe(r: &ItemResult) -> &'static str {
    match r {
        ItemResult::AlreadySeen => "already seen",
        ItemResult::Quarantined { .. } => "quarantined",
        _ => "not recorded",
    }
}

/// Once an entry is gone: its saved bytes go too (the activity has what it
/// needs), and the mailbox's alert of the entry's class resolves when it
/// has no entry of that class left (the alerts are per mailbox and class).
/// Neither may fail the retry, which is committed.
fn after_release(store: &dyn Store, entry: &QuarantineEntry, now: UnixTime) {
    if let Err(e) = std::fs::remove_file(&entry.saved_as) {
        tracing::warn!(path = %entry.saved_as, error = %e, "cannot delete the saved bytes of a released quarantine entry");
    }
    let mailbox = &entry.source.mailbox;
    let class = entry.class();
    let left = store.quarantined(usize::MAX).map(|all| {
        all.iter()
            .any(|q| &q.source.mailbox == mailbox && q.class() == class)
    });
    if let Ok(false) = left {
        let kind = format!("{}:{class}", crate::alerts::kind::QUARANTINE);
        if let Err(e) = store.resolve_alerts(mailbox, &kind, now) {
            tracing::warn!(%mailbox, error = %e, "cannot resolve the quarantine alert");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourceKey;
    use crate::store::SledStore;

    fn config(dir: &std::path::Path, max_message_size: u64) -> Config {
        let text = format!(
            r#"
[daemon]
state_dir = "{state}"
[admin]
enabled = false
[[profiles]]
name = "local"
type = "maildir"
max_message_size = {max_message_size}
[[mailboxes]]
name = "support"
profile = "local"
email = "support@example.test"
approval = "approved"
path = "{maildir}"
"#,
            state = dir.join("state").display(),
            maildir = dir.join("maildir").display(),
        );
        crate::config::from_toml_str(&text, [], dir).unwrap()
    }

    fn message(uid: &str, raw: &[u8]) -> RawMessage {
        RawMessage {
            source: SourceKey {
                mailbox: "support".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: uid.into(),
            },
            raw: raw.to_vec(),
            received_at: Some(1),
            too_large: None,
            unfetchable: None,
        }
    }

    /// Runs `m` through the pipeline as the mailbox task would, committing it.
    fn ingest(store: &dyn Store, cfg: &Config, m: &RawMessage) {
        let ctx = PipelineContext::for_mailbox(cfg, &cfg.mailboxes[0]);
        let (batch, _) = pipeline::process(store, &ctx, std::slice::from_ref(m), 5).unwrap();
        store.commit(batch).unwrap();
    }

    /// An email of about 2 KB: over the first config's 1,024-byte limit.
    fn big() -> Vec<u8> {
        format!(
            "From: c@customer.example\r\nTo: support@example.test\r\nSubject: a long one\r\nMessage-ID: <big@x>\r\n\r\n{}\r\n",
            "hello ".repeat(350)
        )
        .into_bytes()
    }

    #[test]
    fn a_message_quarantined_as_too_large_is_recorded_once_the_limit_is_raised() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        let small = config(dir.path(), 1024);
        ingest(&store, &small, &message("1", &big()));
        let q = store.quarantined(10).unwrap();
        assert_eq!(q.len(), 1);
        let id = q[0].id;
        assert!(std::path::Path::new(&q[0].saved_as).exists());
        store
            .raise_alert(
                crate::model::NewAlert {
                    kind: "quarantine:unparseable",
                    level: crate::model::AlertLevel::Warning,
                    mailbox: Some("support"),
                    profile: Some("local"),
                    text: "messages quarantined",
                },
                5,
            )
            .unwrap();

        // The same limit: still too large, nothing changes.
        match retry(&store, &small, id, 6).unwrap() {
            RetryOutcome::StillQuarantined { reason } => {
                assert!(reason.contains("1024"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(store.quarantined(10).unwrap().len(), 1);
        assert_eq!(store.count_activities(None).unwrap(), 0);

        let large = config(dir.path(), 1 << 20);
        let saved = q[0].saved_as.clone();
        let RetryOutcome::Recorded {
            activity_id,
            duplicate: false,
        } = retry(&store, &large, id, 7).unwrap()
        else {
            panic!("not recorded")
        };
        let a = store.activity(activity_id).unwrap().unwrap();
        assert_eq!(a.subject, "a long one");
        assert_eq!(a.source, message("1", &big()).source);
        assert!(store.quarantined(10).unwrap().is_empty());
        assert!(!std::path::Path::new(&saved).exists(), "bytes deleted");
        assert_eq!(
            store.events_after(0, 10).unwrap().len(),
            1,
            "one activity.created"
        );
        assert!(
            store.alerts(10).unwrap()[0].resolved_at.is_some(),
            "no entry left: resolved"
        );

        // Once: the entry is gone, and the source is a normal seen one now.
        assert!(matches!(
            retry(&store, &large, id, 8),
            Err(RetryError::NotFound(_))
        ));
        ingest(&store, &large, &message("1", &big()));
        assert_eq!(store.count_activities(None).unwrap(), 1);
    }

    #[test]
    fn garbage_stays_quarantined_and_an_undownloaded_message_cannot_be_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        let cfg = config(dir.path(), 1 << 20);
        ingest(&store, &cfg, &message("1", b"\x00\x01 not an email at all"));
        let mut too_large = message("2", b"");
        too_large.too_large = Some(50_000_000);
        ingest(&store, &cfg, &too_large);
        let q = store.quarantined(10).unwrap();
        assert_eq!(q.len(), 2);
        let garbage = q.iter().find(|e| e.source.uid == "1").unwrap();
        let undownloaded = q.iter().find(|e| e.source.uid == "2").unwrap();
        assert!(matches!(
            retry(&store, &cfg, garbage.id, 9).unwrap(),
            RetryOutcome::StillQuarantined { .. }
        ));
        let e = retry(&store, &cfg, undownloaded.id, 9).unwrap_err();
        assert!(matches!(e, RetryError::NotDownloaded { .. }), "{e}");
        assert!(e.to_string().contains("never downloaded"), "{e}");
        assert_eq!(store.quarantined(10).unwrap(), q, "both entries unchanged");
        assert_eq!(store.count_activities(None).unwrap(), 0);
    }

    /// Regression: a released entry resolved the mailbox's quarantine
    /// alerts only once no entry of any class was left, so the class whose
    /// messages were all retried kept its alert open.
    #[test]
    fn a_retry_resolves_the_alert_of_its_class_once_that_class_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        let small = config(dir.path(), 1024);
        ingest(&store, &small, &message("1", &big()));
        let mut undownloaded = message("2", b"");
        undownloaded.too_large = Some(50_000_000);
        ingest(&store, &small, &undownloaded);
        let q = store.quarantined(10).unwrap();
        let classes: Vec<&str> = q.iter().map(|e| e.class()).collect();
        assert_eq!(classes.len(), 2);
        assert!(classes.contains(&"unparseable") && classes.contains(&"too_large"));
        for kind in ["quarantine:unparseable", "quarantine:too_large"] {
            store
                .raise_alert(
                    crate::model::NewAlert {
                        kind,
                        level: crate::model::AlertLevel::Warning,
                        mailbox: Some("support"),
                        profile: Some("local"),
                        text: "messages quarantined",
                    },
                    5,
                )
                .unwrap();
        }
        let saved = q.iter().find(|e| e.source.uid == "1").unwrap();
        let large = config(dir.path(), 1 << 20);
        assert!(matches!(
            retry(&store, &large, saved.id, 7).unwrap(),
            RetryOutcome::Recorded { .. }
        ));
        let open: Vec<String> = store
            .alerts(10)
            .unwrap()
            .into_iter()
            .filter(|a| a.resolved_at.is_none())
            .map(|a| a.kind)
            .collect();
        assert_eq!(
            open,
            vec!["quarantine:too_large"],
            "the emptied class is resolved, the other stays"
        );
    }

    #[test]
    fn an_entry_from_before_the_class_was_kept_gets_one_from_its_bytes() {
        let mut e = QuarantineEntry {
            id: 1,
            source: message("1", b"").source,
            reason: "x".into(),
            saved_as: String::new(),
            size: 1,
            at: 1,
            class: None,
        };
        assert_eq!(e.class(), "too_large");
        e.saved_as = "/q/1.eml".into();
        assert_eq!(e.class(), "unparseable");
        e.class = Some("unfetchable".into());
        assert_eq!(e.class(), "unfetchable");
        // As stored before: no `class` key.
        let mut stored = serde_json::to_value(&e).unwrap();
        stored.as_object_mut().unwrap().remove("class");
        let old: QuarantineEntry = serde_json::from_value(stored).unwrap();
        assert_eq!(old.class, None);
    }
}
