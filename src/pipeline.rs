//! The incoming pipeline for one fetched batch: parse → filter → correlate →
//! a [`CommitBatch`] for persist. Shared by the daemon and `replay`.
//!
//! Messages of one batch are handled in order and see each other: a reply
//! committed in the same batch as its parent still correlates to it.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{FolderRule, PartySettings};
use crate::connector::RawMessage;
use crate::correlate::{self, CorrelationSettings, Decision, MemIndex};
use crate::crm::parties::{self, AddressResolution};
use crate::filter::{self, FilterPolicy, Verdict};
use crate::model::{
    ActivityId, AutomaticClass, CorrelationMethod, Direction, EmailActivity, Party,
    QuarantineEntry, Record, RecordRef, SourceKey, UnixTime,
};
use crate::parse;
use crate::store::{AutomaticMark, CommitBatch, PendingItem, Store, StoreError};

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
    /// Party resolution (`[crm.parties]`): order, limit, auto-create.
    pub parties: PartySettings,
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
                automatic: mailbox.automatic_mail.clone(),
                track: mailbox.track,
            },
            max_message_size: max,
            quarantine_dir: cfg.quarantine_dir(),
            forward_mailbox: mailbox.incoming == crate::model::IncomingDelivery::ForwardMailbox,
            parties: cfg.crm.parties.clone(),
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
        /// Its automatic-mail class, if it is automatic.
        automatic: Option<AutomaticClass>,
        /// The outgoing side must never answer it.
        no_reply: bool,
        /// A Warning for the operator (a mail loop detected), raised by the
        /// caller: the pipeline itself raises nothing.
        notice: Option<String>,
        /// From, to, cc and bcc as resolved (stored on the activity too).
        parties: Vec<Party>,
    },
    Quarantined {
        reason: String,
        /// What kind of trouble: quarantine alerts aggregate per class.
        class: QuarantineClass,
    },
}

/// Why a message was quarantined, coarsely: one alert per mailbox and class
/// rather than one per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineClass {
    /// Over `max_message_size`: left on the server undownloaded.
    TooLarge,
    /// The server would not deliver it.
    Unfetchable,
    /// Downloaded, but not an email we can read.
    Unparseable,
}

impl QuarantineClass {
    /// The class as the alert kind spells it (`quarantine:<class>`).
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineClass::TooLarge => "too_large",
            QuarantineClass::Unfetchable => "unfetchable",
            QuarantineClass::Unparseable => "unparseable",
        }
    }

    /// What the messages of this class have in common, for the alert.
    pub fn describe(self) -> &'static str {
        match self {
            QuarantineClass::TooLarge => "exceed max_message_size and stay on the server",
            QuarantineClass::Unfetchable => {
                "the server would not deliver (they stay on the server)"
            }
            QuarantineClass::Unparseable => "are not readable as email (their bytes are kept)",
        }
    }
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

/// The Warnings a batch's results ask the caller to raise.
pub fn notices(results: &[(SourceKey, ItemResult)]) -> impl Iterator<Item = &str> {
    results.iter().filter_map(|(_, r)| match r {
        ItemResult::Correlated {
            notice: Some(n), ..
        } => Some(n.as_str()),
        _ => None,
    })
}

/// Why a message was left on the server undownloaded.
pub fn too_large_reason(size: u64, limit: u64, folder: &str) -> String {
    format!("message of {size} bytes exceeds the {limit}-byte limit (max_message_size); left on the server in {folder}")
}

/// Why a message the server would not deliver was left there.
pub fn unfetchable_reason(why: &str, folder: &str) -> String {
    format!("the server did not deliver the message: {why}; left on the server in {folder}")
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
    process_inner(store, ctx, messages, now, None)
}

/// Processes a quarantined message again (an operator's retry): its source
/// counts as seen only because it is in quarantine, so that one source is
/// not skipped. Commit the batch with [`Store::commit_quarantine_retry`].
pub fn process_quarantined(
    store: &dyn Store,
    ctx: &PipelineContext,
    message: &RawMessage,
    now: i64,
) -> Result<(CommitBatch, Vec<(SourceKey, ItemResult)>), PipelineError> {
    process_inner(store, ctx, &[(message, None)], now, Some(&message.source))
}

fn process_inner(
    store: &dyn Store,
    ctx: &PipelineContext,
    messages: &[(&RawMessage, Option<&RecordRef>)],
    now: i64,
    retried: Option<&SourceKey>,
) -> Result<(CommitBatch, Vec<(SourceKey, ItemResult)>), PipelineError> {
    let mut batch = CommitBatch::default();
    let mut results = Vec::with_capacity(messages.len());
    // Index entries of activities staged in this batch, so replies see parents.
    let mut staged = MemIndex::default();
    // (Message-ID, email identity) → activity staged in this batch, to mirror
    // the store's folder-move re-point for later messages of the same batch.
    let mut staged_copies: HashMap<(String, String), u64> = HashMap::new();
    // Activities of this batch recorded as skipped: a link to one is no
    // correlation for automatic mail.
    let mut staged_skipped: HashSet<ActivityId> = HashSet::new();
    // Loop-detector marks of this batch (pair, time), not committed yet.
    let mut staged_marks: Vec<(String, UnixTime)> = Vec::new();
    // One directory lookup per distinct address of the batch.
    let mut resolved: HashMap<String, AddressResolution> = HashMap::new();
    // Records auto-created for unknown senders, upserted before the batch
    // is handed back for commit (deterministic ids: a retry re-creates
    // the same records).
    let mut created: Vec<Record> = Vec::new();
    for (m, seed) in messages {
        if retried != Some(&m.source) && store.is_seen(&m.source)? {
            results.push((m.source.clone(), ItemResult::AlreadySeen));
            continue;
        }
        let not_downloaded = match (&m.too_large, &m.unfetchable) {
            (Some(size), _) => Some((
                *size,
                too_large_reason(*size, ctx.max_message_size, &m.source.folder),
                QuarantineClass::TooLarge,
            )),
            (None, Some(why)) => Some((
                0,
                unfetchable_reason(why, &m.source.folder),
                QuarantineClass::Unfetchable,
            )),
            (None, None) => None,
        };
        if let Some((size, reason, class)) = not_downloaded {
            // Not downloaded: a record without bytes, so the operator sees it
            // once and the source is not fetched again.
            batch.items.push(PendingItem::Quarantine(QuarantineEntry {
                id: 0,
                source: m.source.clone(),
                reason: reason.clone(),
                saved_as: String::new(),
                size,
                at: now,
                class: Some(class.as_str().to_string()),
            }));
            results.push((m.source.clone(), ItemResult::Quarantined { reason, class }));
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
                    class: Some(QuarantineClass::Unparseable.as_str().to_string()),
                }));
                results.push((
                    m.source.clone(),
                    ItemResult::Quarantined {
                        reason,
                        class: QuarantineClass::Unparseable,
                    },
                ));
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
        let addresses = parties::party_addresses(
            &parsed.features.from,
            &parsed.features.to,
            &parsed.features.cc,
            &parsed.bcc,
        );
        for (_, a) in &addresses {
            if !resolved.contains_key(a) {
                let r = parties::resolve_for(a, &store.records_by_address(a)?, &ctx.parties);
                resolved.insert(a.clone(), r);
            }
        }
        // Whom the track filter looks at: the sender of incoming mail, the
        // recipients of mail the mailbox sent.
        let counterparts: Vec<filter::Counterpart<'_>> = addresses
            .iter()
            .filter(|(role, _)| match direction {
                Direction::Incoming => *role == crate::model::PartyRole::From,
                Direction::Outgoing => *role != crate::model::PartyRole::From,
            })
            .filter_map(|(_, a)| {
                resolved.get(a).map(|r| filter::Counterpart {
                    address: a,
                    resolution: r,
                })
            })
            .collect();
        let automatic = filter::classify(&parsed);
        // A bounce answers the message it returns: looked up as In-Reply-To,
        // the stored activity keeps its own headers.
        let returned = returned_message_ids(&parsed);
        let header_in_reply_to = parsed.features.in_reply_to.clone();
        if !returned.is_empty() {
            let mut ids = returned.clone();
            ids.extend(header_in_reply_to.iter().cloned());
            parsed.features.in_reply_to = ids;
        }
        let mut no_reply = automatic.is_some();
        // The body fingerprint is the costliest feature: the quoted part's
        // only when scored smart matching gets to run, the whole body's only
        // when a tracked email is indexed.
        let mut decision = match filter::before_correlation(&parsed, &ctx.policy) {
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
                let d = match &automatic {
                    None => d,
                    Some(a) => {
                        let linked_to_skipped = match (&d.regarding, d.correlated_with) {
                            (None, Some(id)) => is_skipped(store, &staged_skipped, id)?,
                            _ => false,
                        };
                        let mut d = d;
                        if let (true, Some(id)) = (linked_to_skipped, d.correlated_with) {
                            d.reasons
                                .push(format!("activity {id} was skipped itself: not tracked"));
                        }
                        let correlation = filter::correlation_of(&d, linked_to_skipped);
                        let v = filter::automatic_verdict(a, d, correlation, &ctx.policy.automatic);
                        no_reply = v.no_reply;
                        v.decision
                    }
                };
                if d.method == CorrelationMethod::Skipped {
                    d
                } else {
                    match filter::track_verdict(&d, ctx.policy.track, &counterparts) {
                        Some(reason) => {
                            let mut s = skipped(reason);
                            s.reasons.extend(d.reasons);
                            s
                        }
                        None => d,
                    }
                }
            }
        };
        if !returned.is_empty() {
            parsed.features.in_reply_to = header_in_reply_to;
        }
        describe_bounce(&mut decision, &parsed, &returned);
        // Loop detector: automatic replies and bounces between one pair of
        // addresses, counted across batches through the store's marks.
        let mut notice = None;
        let mut mark = None;
        let policy = &ctx.policy.automatic;
        if let Some(a) = automatic
            .as_ref()
            .filter(|a| filter::counts_toward_loops(a.class))
        {
            let f = &parsed.features;
            if let Some(pair) = filter::loop_pair(&f.from, &f.to, &f.cc, &ctx.own_addresses) {
                let at = m.received_at.or(f.sent_at).unwrap_or(now);
                let since = at.saturating_sub(policy.loop_window);
                let limit = policy.loop_limit as usize;
                let before = store.automatic_since(&ctx.mailbox, &pair, since, limit + 1)?
                    + staged_marks
                        .iter()
                        .filter(|(p, t)| *p == pair && *t >= since)
                        .count();
                if before >= limit {
                    let mut d = skipped(filter::loop_reason(&pair, before + 1, policy));
                    d.reasons.push(format!("{}: {}", a.class, a.why));
                    decision = d;
                    if before == limit {
                        notice = Some(filter::loop_notice(&pair, policy));
                    }
                }
                staged_marks.push((pair.clone(), at));
                mark = Some((pair, at));
            }
        }
        let sender = parsed
            .features
            .from
            .first()
            .map(|a| parties::normalize_address(a));
        if let (Some(kind), Some(sender), Direction::Incoming) =
            (&ctx.parties.auto_create, &sender, direction)
        {
            let unknown = resolved.get(sender).is_some_and(|r| r.unknown);
            if unknown && decision.method != CorrelationMethod::Skipped {
                let record = parties::auto_created_record(kind, sender);
                if let Ok(reference) = record.reference() {
                    resolved.insert(
                        sender.clone(),
                        AddressResolution {
                            record: Some(reference),
                            kind: Some(kind.clone()),
                            email_enabled: record.email_enabled,
                            note: Some(parties::AUTO_CREATED_NOTE.into()),
                            unknown: false,
                        },
                    );
                    created.push(record);
                }
            }
        }
        let activity_parties = parties::resolve_parties(&addresses, &mut |a: &str| {
            Ok::<_, StoreError>(match resolved.get(a) {
                Some(r) => r.clone(),
                None => parties::resolve_for(a, &store.records_by_address(a)?, &ctx.parties),
            })
        })?;
        decision.reasons.push(parties::sender_line(
            sender.as_deref(),
            sender.as_ref().and_then(|s| resolved.get(s)),
        ));
        let tracked = decision.regarding.is_some() || decision.correlated_with.is_some();
        if tracked && ctx.settings.wants_body_features() {
            parsed.features.add_index_features(&parsed.body_text);
        }
        let id = store.allocate_id()?;
        if decision.method == CorrelationMethod::Skipped {
            staged_skipped.insert(id);
        }
        if let Some((pair, at)) = mark {
            batch.automatic.push(AutomaticMark {
                mailbox: ctx.mailbox.clone(),
                pair,
                at,
                activity: id,
            });
        }
        let automatic = automatic.map(|a| a.class);
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
            automatic,
            no_reply,
            parties: activity_parties.clone(),
            send: None,
        };
        batch.items.push(PendingItem::Activity(Box::new(activity)));
        results.push((
            m.source.clone(),
            ItemResult::Correlated {
                activity: id,
                message_id,
                decision,
                automatic,
                no_reply,
                notice,
                parties: activity_parties,
            },
        ));
    }
    if !created.is_empty() {
        store.upsert_records(created, &[], None, now)?;
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

/// Whether activity `id` (staged in this batch or stored) was skipped.
fn is_skipped(
    store: &dyn Store,
    staged: &HashSet<ActivityId>,
    id: ActivityId,
) -> Result<bool, PipelineError> {
    if staged.contains(&id) {
        return Ok(true);
    }
    Ok(store
        .activity(id)?
        .is_some_and(|a| a.method == CorrelationMethod::Skipped))
}

/// The Message-IDs a delivery status notification returns, not already in
/// its In-Reply-To.
fn returned_message_ids(p: &parse::ParsedMessage<'_>) -> Vec<String> {
    let Some(report) = &p.auto.delivery_report else {
        return Vec::new();
    };
    report
        .returned_message_ids
        .iter()
        .filter(|id| {
            !p.features
                .in_reply_to
                .iter()
                .any(|h| h.eq_ignore_ascii_case(id))
        })
        .cloned()
        .collect()
}

/// Says in a bounce's reasons which returned message it was linked through
/// and what failed for whom.
fn describe_bounce(d: &mut Decision, p: &parse::ParsedMessage<'_>, returned: &[String]) {
    let Some(report) = &p.auto.delivery_report else {
        return;
    };
    for r in &mut d.reasons {
        let Some(rest) = r.strip_prefix("In-Reply-To <") else {
            continue;
        };
        let id = rest.split('>').next().unwrap_or_default();
        let ours = returned
            .iter()
            .any(|x| correlate::normalize_message_id(x) == id);
        if ours {
            *r = format!("bounce returns <{rest}");
        }
    }
    for f in &report.recipients {
        let mut line = format!(
            "bounce: delivery to {} {}",
            f.recipient,
            f.action.as_deref().unwrap_or("failed")
        );
        if let Some(s) = &f.status {
            line.push_str(&format!(", status {s}"));
        }
        if let Some(diag) = &f.diagnostic {
            line.push_str(&format!(" ({diag})"));
        }
        d.reasons.push(line);
    }
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
    crate::private_fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, source.to_string().as_bytes());
    let name: String = digest
        .as_ref()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join(format!("{name}.eml"));
    let tmp = dir.join(format!("{name}.eml.tmp"));
    let mut f = crate::private_fs::create_file(&tmp).map_err(|e| err(&tmp, e))?;
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
                automatic: Default::default(),
                track: crate::config::TrackFilter::All,
            },
            max_message_size: 1 << 20,
            quarantine_dir: dir.join("q"),
            forward_mailbox: false,
            parties: crate::config::CrmSettings::default().parties,
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
            unfetchable: None,
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

    /// (activity, decision, class, no_reply, notice) of a processed message.
    type Outcome = (u64, Decision, Option<AutomaticClass>, bool, Option<String>);

    /// Every result of a batch, committed.
    fn run_full(store: &SledStore, c: &PipelineContext, msgs: &[RawMessage]) -> Vec<Outcome> {
        let (batch, results) = process(store, c, msgs, 1_767_600_000).unwrap();
        store.commit(batch).unwrap();
        results
            .into_iter()
            .filter_map(|(_, r)| match r {
                ItemResult::Correlated {
                    activity,
                    decision,
                    automatic,
                    no_reply,
                    notice,
                    ..
                } => Some((activity, decision, automatic, no_reply, notice)),
                _ => None,
            })
            .collect()
    }

    const LIST: &str = "Precedence: list\r\nList-Id: <dev.lists.example>\r\nList-Unsubscribe: <mailto:dev-leave@lists.example>\r\n";

    /// Issue #17: every message with a Precedence header was skipped before
    /// correlation, so customers' replies through lists were lost.
    #[test]
    fn replies_through_lists_are_tracked_not_dropped_as_bulk() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let c = ctx(dir.path());
        let got = run_full(
            &store,
            &c,
            &[
                raw("INBOX/A", "1", "Message-ID: <p@x>\r\nSubject: Offer\r\n"),
                raw(
                    "INBOX",
                    "2",
                    &format!("Message-ID: <r@x>\r\nIn-Reply-To: <p@x>\r\nSubject: Re: Offer\r\n{LIST}"),
                ),
                // ... and a reply to that reply, in the next position.
                raw(
                    "INBOX",
                    "3",
                    &format!("Message-ID: <r2@x>\r\nReferences: <p@x> <r@x>\r\nSubject: Re: Offer\r\n{LIST}"),
                ),
            ],
        );
        let (parent, _, parent_class, parent_no_reply, _) = &got[0];
        assert_eq!((*parent_class, *parent_no_reply), (None, false));
        let (_, d, class, no_reply, _) = &got[1];
        assert_eq!(d.method, CorrelationMethod::InReplyTo, "{d:?}");
        assert_eq!(d.regarding.as_ref().unwrap().to_string(), "account:a");
        assert_eq!(d.correlated_with, Some(*parent));
        assert_eq!((*class, *no_reply), (Some(AutomaticClass::List), true));
        assert_eq!(
            got[2].1.regarding.as_ref().map(ToString::to_string),
            Some("account:a".into())
        );
        // The class and the flag are stored on the activity.
        let stored = store.activity(got[1].0).unwrap().unwrap();
        assert_eq!(stored.automatic, Some(AutomaticClass::List));
        assert!(stored.no_reply);
    }

    #[test]
    fn uncorrelated_list_mail_and_replies_to_it_are_skipped_naming_the_class() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let c = ctx(dir.path());
        let got = run_full(
            &store,
            &c,
            &[
                raw(
                    "INBOX",
                    "1",
                    &format!("Message-ID: <l1@x>\r\nSubject: Release plan\r\n{LIST}"),
                ),
                raw(
                    "INBOX",
                    "2",
                    &format!("Message-ID: <l2@x>\r\nIn-Reply-To: <l1@x>\r\nSubject: Re: Release plan\r\n{LIST}"),
                ),
            ],
        );
        for (_, d, class, no_reply, _) in &got {
            assert_eq!(d.method, CorrelationMethod::Skipped, "{d:?}");
            assert!(d.reasons[0].contains("(list: List-Id"), "{d:?}");
            assert_eq!((*class, *no_reply), (Some(AutomaticClass::List), true));
        }
        // In a later batch too (the skipped parent read from the store).
        let d = run(
            &store,
            &c,
            &[raw(
                "INBOX",
                "3",
                &format!("Message-ID: <l3@x>\r\nIn-Reply-To: <l2@x>\r\nSubject: Re: Release plan\r\n{LIST}"),
            )],
        );
        assert_eq!(d[0].method, CorrelationMethod::Skipped, "{d:?}");
        // An ordinary message still links to a skipped one, as before.
        let d = run(
            &store,
            &c,
            &[raw(
                "INBOX",
                "4",
                "Message-ID: <o@x>\r\nIn-Reply-To: <l2@x>\r\nSubject: Re: Release plan\r\n",
            )],
        );
        assert_eq!(d[0].method, CorrelationMethod::InReplyTo, "{d:?}");
    }

    #[test]
    fn correlated_out_of_office_is_tracked_and_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let c = ctx(dir.path());
        let got = run_full(
            &store,
            &c,
            &[
                raw("INBOX/B", "1", "Message-ID: <p@x>\r\nSubject: Offer\r\n"),
                raw(
                    "INBOX",
                    "2",
                    "Message-ID: <ooo@x>\r\nIn-Reply-To: <p@x>\r\nAuto-Submitted: auto-replied\r\nSubject: Out of office\r\n",
                ),
                raw(
                    "INBOX",
                    "3",
                    "Message-ID: <ooo2@x>\r\nAuto-Submitted: auto-replied\r\nSubject: Out of office\r\n",
                ),
            ],
        );
        let (_, d, class, no_reply, _) = &got[1];
        assert_eq!(d.regarding.as_ref().unwrap().to_string(), "account:b");
        assert_eq!((*class, *no_reply), (Some(AutomaticClass::AutoReply), true));
        assert_eq!(got[2].1.method, CorrelationMethod::Skipped);
        assert!(got[2].1.reasons[0].contains("auto_reply"), "{:?}", got[2].1);
    }

    fn reopen(path: &Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(path) {
                Ok(s) => return s,
                Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen {}: {e}", path.display()),
            }
        }
    }

    fn auto_reply(uid: &str, at: i64) -> RawMessage {
        let mut m = raw(
            "INBOX",
            uid,
            &format!(
                "Message-ID: <a{uid}@x>\r\nAuto-Submitted: auto-replied\r\nSubject: Re: ticket {uid}\r\n"
            ),
        );
        m.received_at = Some(at);
        m
    }

    #[test]
    fn loop_detector_warns_once_and_skips_the_rest_across_batches_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let c = ctx(dir.path());
        let t0 = 1_767_600_000;
        let store = SledStore::open(&path).unwrap();
        // 4 in one batch, 1 in another: the limit (5) is not exceeded.
        let first = run_full(
            &store,
            &c,
            &(1..=4)
                .map(|i| auto_reply(&i.to_string(), t0 + i * 60))
                .collect::<Vec<_>>(),
        );
        let second = run_full(&store, &c, &[auto_reply("5", t0 + 300)]);
        for (_, d, _, _, notice) in first.iter().chain(&second) {
            assert!(!d.reasons[0].starts_with("mail loop"), "{d:?}");
            assert_eq!(notice, &None);
        }
        drop(store);
        let store = reopen(&path);
        // The 6th and 7th within the hour: one Warning, both skipped.
        let got = run_full(
            &store,
            &c,
            &[auto_reply("6", t0 + 360), auto_reply("7", t0 + 420)],
        );
        assert!(
            got[0].1.reasons[0].starts_with("mail loop suspected: 6 automatic"),
            "{:?}",
            got[0].1
        );
        assert!(got[0]
            .4
            .as_deref()
            .unwrap()
            .contains("c@them.test and me@us.test"));
        assert!(got[1].1.reasons[0].starts_with("mail loop suspected"));
        assert_eq!(got[1].4, None, "one Warning only");
        // An hour after the loop stopped, auto-replies count afresh.
        let later = run_full(&store, &c, &[auto_reply("8", t0 + 420 + 3601)]);
        assert!(
            !later[0].1.reasons[0].starts_with("mail loop"),
            "{:?}",
            later[0].1
        );
        // Ordinary mail between the same pair never counts.
        let mut ordinary: Vec<RawMessage> = (10..20)
            .map(|i| {
                raw(
                    "INBOX",
                    &i.to_string(),
                    &format!("Message-ID: <o{i}@x>\r\n"),
                )
            })
            .collect();
        for m in &mut ordinary {
            m.received_at = Some(t0 + 420 + 3700);
        }
        for (_, d, _, _, _) in run_full(&store, &c, &ordinary) {
            assert_eq!(d.method, CorrelationMethod::None);
        }
    }

    fn dsn(uid: &str, returned: &str) -> RawMessage {
        let body = format!(
            "From: Mail Delivery System <MAILER-DAEMON@mx.them.test>\r\n\
To: me@us.test\r\n\
Date: Mon, 5 Jan 2026 11:00:00 +0000\r\n\
Message-ID: <dsn{uid}@mx.them.test>\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\
\r\n\
--B\r\n\
Content-Type: text/plain\r\n\
\r\n\
I could not deliver your message.\r\n\
--B\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.them.test\r\n\
\r\n\
Final-Recipient: rfc822; gone@them.test\r\n\
Original-Recipient: rfc822;gone@them.test\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <gone@them.test>: Recipient address\r\n\
\x20rejected: User unknown\r\n\
\r\n\
--B\r\n\
{returned}\
--B--\r\n"
        );
        RawMessage {
            source: SourceKey {
                mailbox: "m".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: uid.into(),
            },
            raw: body.into_bytes(),
            received_at: None,
            too_large: None,
            unfetchable: None,
        }
    }

    #[test]
    fn bounce_links_to_the_message_it_returns_with_recipient_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let c = ctx(dir.path());
        let mut sent = raw(
            "INBOX/A",
            "1",
            "Message-ID: <out-1@us.test>\r\nSubject: Offer\r\n",
        );
        sent.raw = String::from_utf8(sent.raw)
            .unwrap()
            .replace(
                "From: c@them.test\r\nTo: me@us.test",
                "From: me@us.test\r\nTo: gone@them.test",
            )
            .into_bytes();
        let parent = run_full(&store, &c, &[sent])[0].0;
        let got = run_full(
            &store,
            &c,
            &[
                dsn(
                    "2",
                    "Content-Type: message/rfc822\r\n\r\nMessage-ID: <out-1@us.test>\r\nFrom: me@us.test\r\nTo: gone@them.test\r\nSubject: Offer\r\n\r\nbody\r\n",
                ),
                dsn(
                    "3",
                    "Content-Type: text/rfc822-headers\r\n\r\nFrom: me@us.test\r\nMessage-ID:\r\n <out-1@us.test>\r\nSubject: Offer\r\n\r\n",
                ),
                dsn("4", "Content-Type: text/plain\r\n\r\nnothing returned\r\n"),
            ],
        );
        for (_, d, class, no_reply, _) in &got[..2] {
            assert_eq!(*class, Some(AutomaticClass::Bounce));
            assert!(*no_reply);
            assert_eq!(
                d.regarding.as_ref().unwrap().to_string(),
                "account:a",
                "{d:?}"
            );
            assert_eq!(d.correlated_with, Some(parent));
            assert_eq!(
                d.reasons[0],
                format!("bounce returns <out-1@us.test> = activity {parent}")
            );
            assert!(
                d.reasons.iter().any(|r| r
                    == "bounce: delivery to gone@them.test failed, status 5.1.1 (550 5.1.1 <gone@them.test>: Recipient address rejected: User unknown)"),
                "{d:?}"
            );
        }
        // Nothing returned: a bounce about nothing tracked, skipped by default.
        let (_, d, class, _, _) = &got[2];
        assert_eq!(*class, Some(AutomaticClass::Bounce));
        assert_eq!(d.method, CorrelationMethod::Skipped);
        assert!(
            d.reasons[0].contains("(bounce: delivery status notification"),
            "{d:?}"
        );
        assert!(d
            .reasons
            .iter()
            .any(|r| r.contains("gone@them.test failed")));
        // The stored bounce keeps its own (empty) In-Reply-To.
        assert!(store
            .activity(got[0].0)
            .unwrap()
            .unwrap()
            .in_reply_to
            .is_empty());
    }

    #[test]
    fn unknown_senders_of_tracked_mail_are_auto_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let mut c = ctx(dir.path());
        c.parties.auto_create = Some("lead".into());
        let msgs = [
            raw("INBOX", "1", "Message-ID: <n1@x>\r\nSubject: Hello\r\n"),
            raw("INBOX", "2", "Message-ID: <n2@x>\r\nSubject: Again\r\n"),
        ];
        // A batch processed, then (a crash before its commit) again.
        let (_, first) = process(&store, &c, &msgs, 0).unwrap();
        let (batch, again) = process(&store, &c, &msgs, 0).unwrap();
        store.commit(batch).unwrap();
        let leads = store.records(Some("lead"), None, 0).unwrap();
        assert_eq!(leads.len(), 1, "{leads:?}");
        assert_eq!(leads[0].emails, vec!["c@them.test".to_string()]);
        let want = format!("lead:{}", leads[0].id);
        for (_, r) in first.iter().chain(&again) {
            let ItemResult::Correlated {
                parties, decision, ..
            } = r
            else {
                panic!("{r:?}");
            };
            assert_eq!(parties[0].record.as_ref().unwrap().to_string(), want);
            assert_eq!(parties[0].note.as_deref(), Some("auto-created"));
            assert!(
                decision
                    .reasons
                    .contains(&format!("sender c@them.test: {want} (auto-created)")),
                "{decision:?}"
            );
        }
        // Skipped mail creates nothing.
        let dir2 = tempfile::tempdir().unwrap();
        let store2 = SledStore::open(&dir2.path().join("s")).unwrap();
        c.policy.track = crate::config::TrackFilter::ResponsesToCrmEmail;
        let (batch, results) = process(&store2, &c, &msgs[..1], 0).unwrap();
        store2.commit(batch).unwrap();
        assert!(store2.records(Some("lead"), None, 0).unwrap().is_empty());
        let ItemResult::Correlated {
            parties, decision, ..
        } = &results[0].1
        else {
            panic!()
        };
        assert_eq!(decision.method, CorrelationMethod::Skipped);
        assert_eq!(parties[0].record, None);
        // Off by default.
        let c = ctx(dir.path());
        assert_eq!(c.parties.auto_create, None);
    }
}
