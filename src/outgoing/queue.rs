//! Queueing: the send rules, composition, and one store batch.
//!
//! An outgoing email IS an email activity (direction outgoing, tracked to
//! its record) from the moment it is queued: its composed MIME goes through
//! the same pipeline as tracked incoming mail, so its Message-ID and token
//! are indexed like any tracked email and a reply correlates by
//! `In-Reply-To` or, with the headers stripped, by the token alone.

use super::compose::{self, Draft};
use super::{OutgoingRequest, Queued};
use crate::config::{Config, Mailbox};
use crate::connector::RawMessage;
use crate::correlate::token;
use crate::model::{
    record_kind, ActivityId, ApprovalStatus, CorrelationMethod, Delivery, EmailActivity,
    OutgoingEmail, OwnerKind, RecordRef, SendState, SendStatus, SentCopy, SourceKey, UnixTime,
};
use crate::pipeline::{self, PipelineContext, PipelineError};
use crate::store::{PendingItem, QueueOutcome, Store, StoreError};

/// Folder name of the source key outgoing activities are recorded under.
pub const OUTGOING_FOLDER: &str = "$outgoing";

/// Why a request was refused; nothing was queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No configured mailbox of that name (HTTP 404).
    #[error("no mailbox named {0:?} is configured")]
    UnknownMailbox(String),
    /// The mailbox may not send (outgoing not server-side sync, address not
    /// approved, disabled) (HTTP 409), with what to do.
    #[error("{0}")]
    NotAllowed(String),
    /// The email answers automatic mail (HTTP 409).
    #[error("activity {0} is automatic mail (auto-reply, bounce, list); it is never answered")]
    AnswersAutomatic(ActivityId),
    /// The request itself is wrong, every problem listed (HTTP 400/422).
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<PipelineError> for QueueError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Store(s) => QueueError::Store(s),
            other => QueueError::Invalid(vec![other.to_string()]),
        }
    }
}

/// Whether `mailbox` may send at all, its email address approved as
/// `approval` (see [`effective_approval`]), and if not, what to change.
pub fn send_allowed(
    cfg: &Config,
    mailbox: &Mailbox,
    approval: ApprovalStatus,
) -> Result<(), String> {
    if cfg.process_only_approved && approval != ApprovalStatus::Approved {
        return Err(format!(
            "the address {} of mailbox {:?} is not approved (approval: {}); approve it (POST /api/v1/mailboxes/{}/approve, or approval = \"approved\" in the configuration) before it sends",
            mailbox.email,
            mailbox.name,
            format!("{approval:?}").to_ascii_lowercase(),
            mailbox.name,
        ));
    }
    sends(cfg, mailbox)
}

/// The approval of the mailbox's address that counts: an operator's
/// (`POST /api/v1/mailboxes/{name}/approve|reject`) over the configuration's.
pub fn effective_approval(
    store: &dyn Store,
    mailbox: &Mailbox,
) -> Result<ApprovalStatus, StoreError> {
    Ok(store
        .mailbox_control(&mailbox.name)?
        .approval
        .unwrap_or(mailbox.approval))
}

/// Whether `mailbox` is set up to send (whatever its approval: a sender
/// for an address not approved yet runs and holds its email until it is).
pub fn sends(cfg: &Config, mailbox: &Mailbox) -> Result<(), String> {
    if mailbox.outgoing != Delivery::ServerSideSync {
        return Err(format!(
            "mailbox {:?} does not send email: its outgoing delivery is \"none\"; set outgoing = \"server_side_sync\" in its [[mailboxes]] entry",
            mailbox.name
        ));
    }
    if !mailbox.enabled {
        return Err(format!(
            "mailbox {:?} is disabled (enabled = false)",
            mailbox.name
        ));
    }
    match cfg.profile_of(mailbox) {
        // SMTP submission, or Microsoft Graph sendMail.
        Some(p) if p.smtp.is_some() || p.kind == crate::model::ProfileType::ExchangeOnline => Ok(()),
        Some(p) => Err(format!(
            "mailbox {:?} uses profile {:?}, which has no SMTP submission; only imap_smtp, pop3_smtp and exchange_online profiles send",
            mailbox.name, p.name
        )),
        None => Err(format!("mailbox {:?} has no profile", mailbox.name)),
    }
}

/// The user number of the tracking token: the mailbox's own, else the
/// owning user's from the record directory.
fn user_number(store: &dyn Store, mailbox: &Mailbox) -> Result<u32, StoreError> {
    if mailbox.user_number != 0 || mailbox.owner_kind != OwnerKind::User {
        return Ok(mailbox.user_number);
    }
    Ok(store
        .record(record_kind::USER, &mailbox.owner_id)?
        .and_then(|r| r.user_number)
        .unwrap_or(0))
}

/// `RE: subject` of a reply, unless it already is one.
fn reply_subject(parent: &str) -> String {
    let lower = parent.trim_start().to_ascii_lowercase();
    if lower.starts_with("re:") || lower.starts_with("aw:") || lower.starts_with("sv:") {
        parent.trim().to_owned()
    } else {
        format!("RE: {}", parent.trim())
    }
}

/// At most this many References are carried (RFC 5322 suggests trimming;
/// the first and the latest matter for threading).
const MAX_REFERENCES: usize = 20;

fn references_of(parent: &EmailActivity) -> (Option<String>, Vec<String>) {
    let own = parent.message_ids.first().cloned();
    let mut refs = parent.references.clone();
    if refs.is_empty() {
        refs.extend(parent.in_reply_to.iter().take(1).cloned());
    }
    refs.extend(own.iter().cloned());
    if refs.len() > MAX_REFERENCES {
        let first = refs.remove(0);
        let keep = refs.split_off(refs.len() - (MAX_REFERENCES - 1));
        refs = std::iter::once(first).chain(keep).collect();
    }
    (own, refs)
}

/// The answer for an idempotency key seen before.
fn existing(store: &dyn Store, row: &OutgoingEmail) -> Result<Queued, QueueError> {
    let activity = store.activity(row.activity_id)?;
    Ok(Queued {
        id: row.activity_id,
        message_id: row.message_id.clone(),
        subject: activity
            .as_ref()
            .map(|a| a.subject.clone())
            .unwrap_or_default(),
        token: activity
            .as_ref()
            .and_then(|a| a.send.as_ref())
            .and_then(|s| s.token.clone()),
        status: row.status,
        existing: true,
    })
}

/// Validates `req` against the send rules, composes it and queues it with
/// its activity in one batch (see [`Store::queue_outgoing`]).
pub fn queue(
    store: &dyn Store,
    cfg: &Config,
    req: &OutgoingRequest,
    now: UnixTime,
) -> Result<Queued, QueueError> {
    let key = req
        .idempotency_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty());
    if let Some(k) = key {
        let found = match store.outgoing_by_key(k)? {
            Some(id) => store.outgoing(id)?,
            None => None,
        };
        if let Some(row) = found {
            return existing(store, &row);
        }
    }
    let mailbox = cfg
        .mailboxes
        .iter()
        .find(|m| m.name == req.mailbox)
        .ok_or_else(|| QueueError::UnknownMailbox(req.mailbox.clone()))?;
    let approval = effective_approval(store, mailbox)?;
    send_allowed(cfg, mailbox, approval).map_err(QueueError::NotAllowed)?;

    let mut problems = Vec::new();
    let parent = match req.in_reply_to {
        None => None,
        Some(id) => match store.activity(id)? {
            None => {
                problems.push(format!("in_reply_to: there is no activity {id}"));
                None
            }
            Some(p) if p.no_reply || p.automatic.is_some() => {
                return Err(QueueError::AnswersAutomatic(id));
            }
            Some(p) => Some(p),
        },
    };
    let regarding: Option<RecordRef> = match req.regarding.as_deref().map(str::trim) {
        Some(r) if !r.is_empty() => match r.parse() {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(format!("regarding: {e}"));
                None
            }
        },
        _ => parent.as_ref().and_then(|p| p.regarding.clone()),
    };
    if regarding.is_none() && req.regarding.is_none() && req.in_reply_to.is_none() {
        problems.push(
            "regarding is required: the record this email is about (kind:id, e.g. case:42), or in_reply_to an activity that has one"
                .into(),
        );
    } else if regarding.is_none() && req.regarding.is_none() && parent.is_some() {
        problems.push(format!(
            "activity {} that this answers is not tracked to a record; give regarding",
            req.in_reply_to.unwrap_or_default()
        ));
    }
    let (attachments, attachment_problems) =
        compose::decode_attachments(&req.attachments, &cfg.outgoing);
    problems.extend(attachment_problems);
    let mut subject = req.subject.trim().to_owned();
    if subject.is_empty() {
        if let Some(p) = &parent {
            subject = reply_subject(&p.subject);
        }
    }
    let no_body = req.text.as_deref().is_none_or(str::is_empty)
        && req.html.as_deref().is_none_or(str::is_empty)
        && attachments.is_empty();
    if subject.is_empty() && no_body {
        problems.push("the email is empty: give a subject or a body (text or html)".into());
    }
    if subject.contains(['\r', '\n']) {
        problems.push("subject: must be one line".into());
    }
    // Every recipient is checked before a token counter value is spent.
    let mut probe = Draft {
        from: mailbox.email.clone(),
        to: req.to.clone(),
        cc: req.cc.clone(),
        bcc: req.bcc.clone(),
        subject: subject.clone(),
        text: req.text.clone(),
        html: req.html.clone(),
        message_id: compose::new_message_id(&mailbox.email),
        automated: req.automated,
        date: now,
        ..Draft::default()
    };
    if let Err(errs) = compose::compose(&probe, &cfg.outgoing) {
        problems.extend(errs);
    }
    let Some(regarding) = regarding.filter(|_| problems.is_empty()) else {
        return Err(QueueError::Invalid(problems));
    };

    let token = if cfg
        .correlation
        .order
        .contains(&CorrelationMethod::TrackingToken)
    {
        let settings = &cfg.correlation.token;
        let user = user_number(store, mailbox)?;
        let counter = store.next_token_counter(user)?;
        let counterpart = req
            .to
            .iter()
            .chain(&req.cc)
            .chain(&req.bcc)
            .find_map(|a| compose::parse_address(a).ok())
            .map(|a| a.email.domain().to_owned())
            .unwrap_or_default();
        let t = token::generate_signed(
            settings,
            user,
            counter,
            &regarding.to_string(),
            &counterpart,
        );
        subject = token::append_to_subject_with(settings, &subject, &t);
        Some(t.to_string())
    } else {
        None
    };
    let (parent_id, references) = parent.as_ref().map(references_of).unwrap_or_default();
    probe.subject = subject.clone();
    probe.attachments = attachments;
    probe.in_reply_to = parent_id;
    probe.references = references;
    let composed = compose::compose(&probe, &cfg.outgoing).map_err(QueueError::Invalid)?;
    let message_id = probe.message_id.clone();

    let raw = RawMessage {
        source: SourceKey {
            mailbox: mailbox.name.clone(),
            folder: OUTGOING_FOLDER.into(),
            uidvalidity: 0,
            uid: compose::marker_of(&message_id).to_owned(),
        },
        raw: composed.mime.clone().into_bytes(),
        received_at: Some(now),
        too_large: None,
        unfetchable: None,
    };
    let ctx = PipelineContext::for_mailbox(cfg, mailbox);
    let (mut batch, _) = pipeline::process_seeded(store, &ctx, &[(&raw, Some(&regarding))], now)?;
    let mut send = SendState::new(SendStatus::PendingSend, now);
    send.token = token.clone();
    send.crm_email_id = req.crm_email_id.clone();
    let mut activity_id = None;
    for item in &mut batch.items {
        if let PendingItem::Activity(a) = item {
            a.send = Some(send.clone());
            a.method = CorrelationMethod::Custom;
            a.reasons = vec![format!(
                "queued to send from {} regarding {regarding}",
                mailbox.email
            )];
            if let Some(p) = &parent {
                a.correlated_with = Some(p.id);
                a.reasons.push(format!("answers activity {}", p.id));
            }
            activity_id = Some(a.id);
        }
    }
    let Some(activity_id) = activity_id else {
        return Err(QueueError::Invalid(vec![
            "the composed message could not be recorded as an activity".into(),
        ]));
    };
    let row = OutgoingEmail {
        activity_id,
        mailbox: mailbox.name.clone(),
        message_id: message_id.clone(),
        envelope_from: composed.envelope_from,
        recipients: composed.recipients,
        mime: composed.mime,
        status: SendStatus::PendingSend,
        attempts: 0,
        next_attempt_at: now,
        last_error: None,
        sent_copy: SentCopy::NotNeeded,
        server_message_ids: Vec::new(),
        idempotency_key: key.map(str::to_owned),
        in_reply_to: req.in_reply_to,
        queued_at: now,
        sent_at: None,
        retry_from: None,
        accepted_at: None,
        server_item_id: None,
    };
    match store.queue_outgoing(batch, row)? {
        QueueOutcome::Queued(id) => Ok(Queued {
            id,
            message_id,
            subject,
            token,
            status: SendStatus::PendingSend,
            existing: false,
        }),
        // A concurrent request with the same key won the race.
        QueueOutcome::Existing(id) => match store.outgoing(id)? {
            Some(row) => existing(store, &row),
            None => Err(QueueError::Store(StoreError::Corrupt(format!(
                "queue row {id} of an idempotency key is missing"
            )))),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::SledStore;
    use std::path::Path;

    pub(crate) const CONFIG: &str = r#"
        [admin]
        token = "0123456789abcdef"
        [[profiles]]
        name = "mail"
        type = "imap_smtp"
        host = "mail.example.test"
        username = "u"
        password = "p"
        [[mailboxes]]
        name = "support"
        profile = "mail"
        email = "support@example.test"
        outgoing = "server_side_sync"
        approval = "approved"
        user_number = 7
        [[mailboxes]]
        name = "receiving"
        profile = "mail"
        email = "in@example.test"
        approval = "approved"
        [[mailboxes]]
        name = "pending"
        profile = "mail"
        email = "pending@example.test"
        outgoing = "server_side_sync"
        approval = "pending"
    "#;

    pub(crate) fn config(dir: &Path) -> Config {
        let text = format!(
            "{CONFIG}\n[daemon]\nstate_dir = {:?}\n",
            dir.display().to_string()
        );
        crate::config::from_toml_str(&text, Vec::new(), Path::new(".")).unwrap()
    }

    pub(crate) fn request() -> OutgoingRequest {
        OutgoingRequest {
            mailbox: "support".into(),
            regarding: Some("case:42".into()),
            to: vec!["Carol <carol@customer.example>".into()],
            subject: "Your order".into(),
            text: Some("It ships tomorrow.".into()),
            ..OutgoingRequest::default()
        }
    }

    fn incoming(source_uid: &str, headers: &str) -> RawMessage {
        RawMessage {
            source: SourceKey {
                mailbox: "support".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: source_uid.into(),
            },
            raw: format!(
                "From: carol@customer.example\r\nTo: support@example.test\r\n{headers}\r\nthanks\r\n"
            )
            .into_bytes(),
            received_at: Some(1_800_000_100),
            too_large: None,
            unfetchable: None,
        }
    }

    #[test]
    fn queued_email_is_a_tracked_activity_that_replies_correlate_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let cfg = config(dir.path());
        let q = queue(&store, &cfg, &request(), 1_800_000_000).unwrap();
        let token = q.token.clone().unwrap();
        assert!(token.starts_with("CRM:"), "{token}");
        assert!(q.subject.ends_with(&token), "{}", q.subject);
        assert!(!q.existing);
        let row = store.outgoing(q.id).unwrap().unwrap();
        assert_eq!(row.status, SendStatus::PendingSend);
        assert_eq!(row.message_id, q.message_id);
        assert_eq!(row.recipients, vec!["carol@customer.example"]);
        assert!(row
            .mime
            .contains(&format!("Message-ID: <{}>", q.message_id)));
        let a = store.activity(q.id).unwrap().unwrap();
        assert_eq!(a.regarding.as_ref().unwrap().to_string(), "case:42");
        assert_eq!(a.send.as_ref().unwrap().status, SendStatus::PendingSend);
        assert_eq!(a.send.as_ref().unwrap().dynamics_statuscode, 6);
        assert_eq!(a.direction, crate::model::Direction::Outgoing);
        let events = store.events_after(0, 10).unwrap();
        assert_eq!(events.len(), 1, "one activity.created event");
        assert_eq!(events[0].activity_id, q.id);

        let ctx = PipelineContext::for_mailbox(&cfg, &cfg.mailboxes[0]);
        // A reply by header…
        let by_header = incoming(
            "1",
            &format!(
                "Subject: Re: Your order\r\nIn-Reply-To: <{}>\r\n",
                q.message_id
            ),
        );
        // …and one whose client dropped the threading headers: the token alone.
        let by_token = incoming("2", &format!("Subject: Re: Your order {token}\r\n"));
        let (batch, results) =
            pipeline::process(&store, &ctx, &[by_header, by_token], 1_800_000_100).unwrap();
        Store::commit(&store, batch).unwrap();
        let decisions: Vec<_> = results
            .into_iter()
            .filter_map(|(_, r)| match r {
                pipeline::ItemResult::Correlated { decision, .. } => Some(decision),
                _ => None,
            })
            .collect();
        assert_eq!(decisions.len(), 2);
        assert_eq!(decisions[0].method, CorrelationMethod::InReplyTo);
        assert_eq!(decisions[1].method, CorrelationMethod::TrackingToken);
        for d in decisions {
            assert_eq!(d.regarding.unwrap().to_string(), "case:42");
        }
    }

    #[test]
    fn idempotency_key_returns_the_first_email_and_tokens_count_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let cfg = config(dir.path());
        let mut req = request();
        req.idempotency_key = Some("crm-42-1".into());
        let first = queue(&store, &cfg, &req, 1_800_000_000).unwrap();
        let again = queue(&store, &cfg, &req, 1_800_000_001).unwrap();
        assert!(again.existing);
        assert_eq!((again.id, &again.message_id), (first.id, &first.message_id));
        assert_eq!(again.token, first.token);
        let other = queue(&store, &cfg, &request(), 1_800_000_002).unwrap();
        assert_ne!(other.token, first.token);
        assert_eq!(store.outgoing_queued(None, 10).unwrap().len(), 2);
    }

    #[test]
    fn send_rules_refuse_with_what_to_do_and_queue_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let cfg = config(dir.path());
        let mut r = request();
        r.mailbox = "nope".into();
        assert!(matches!(
            queue(&store, &cfg, &r, 1).unwrap_err(),
            QueueError::UnknownMailbox(_)
        ));
        r.mailbox = "receiving".into();
        let e = queue(&store, &cfg, &r, 1).unwrap_err().to_string();
        assert!(e.contains("outgoing = \"server_side_sync\""), "{e}");
        r.mailbox = "pending".into();
        let e = queue(&store, &cfg, &r, 1).unwrap_err().to_string();
        assert!(e.contains("not approved"), "{e}");
        let mut bad = request();
        bad.to = vec!["nobody".into()];
        bad.regarding = Some("no-colon".into());
        bad.attachments = vec![crate::outgoing::AttachmentRequest {
            filename: "run.exe".into(),
            content_type: None,
            content_base64: "TVo=".into(),
        }];
        match queue(&store, &cfg, &bad, 1).unwrap_err() {
            QueueError::Invalid(p) => assert_eq!(p.len(), 3, "{p:?}"),
            other => panic!("{other:?}"),
        }
        let mut none = request();
        none.regarding = None;
        let e = queue(&store, &cfg, &none, 1).unwrap_err().to_string();
        assert!(e.contains("regarding is required"), "{e}");
        assert!(store.outgoing_queued(None, 10).unwrap().is_empty());
        assert!(store.events_after(0, 10).unwrap().is_empty());
    }

    #[test]
    fn a_reply_threads_under_its_parent_and_automatic_mail_is_never_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let cfg = config(dir.path());
        let first = queue(&store, &cfg, &request(), 1_800_000_000).unwrap();
        let ctx = PipelineContext::for_mailbox(&cfg, &cfg.mailboxes[0]);
        let reply = incoming(
            "1",
            &format!(
                "Message-ID: <r1@customer.example>\r\nSubject: Re: Your order\r\nIn-Reply-To: <{}>\r\n",
                first.message_id
            ),
        );
        let ooo = incoming(
            "2",
            "Message-ID: <ooo@customer.example>\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n",
        );
        let (batch, results) =
            pipeline::process(&store, &ctx, &[reply, ooo], 1_800_000_100).unwrap();
        Store::commit(&store, batch).unwrap();
        let ids: Vec<ActivityId> = results
            .iter()
            .filter_map(|(_, r)| match r {
                pipeline::ItemResult::Correlated { activity, .. } => Some(*activity),
                _ => None,
            })
            .collect();
        let answer = OutgoingRequest {
            regarding: None,
            subject: String::new(),
            in_reply_to: Some(ids[0]),
            ..request()
        };
        let q = queue(&store, &cfg, &answer, 1_800_000_200).unwrap();
        assert!(
            q.subject.starts_with("Re: Your order CRM:"),
            "{}",
            q.subject
        );
        let row = store.outgoing(q.id).unwrap().unwrap();
        assert!(
            row.mime.contains("In-Reply-To: <r1@customer.example>"),
            "{}",
            row.mime
        );
        assert!(
            row.mime.contains(&format!("<{}>", first.message_id)),
            "References carry the thread"
        );
        let a = store.activity(q.id).unwrap().unwrap();
        assert_eq!(a.regarding.unwrap().to_string(), "case:42");
        let to_ooo = OutgoingRequest {
            in_reply_to: Some(ids[1]),
            ..request()
        };
        assert!(matches!(
            queue(&store, &cfg, &to_ooo, 1_800_000_300).unwrap_err(),
            QueueError::AnswersAutomatic(_)
        ));
    }
}
