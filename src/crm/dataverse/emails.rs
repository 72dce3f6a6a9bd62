//! Activities out: an outbox event becomes (or changes) one `email` row.
//!
//! Exactly once, from the CRM's side: `messageid` is the key. Before every
//! create the adapter asks `GET emails?$select=activityid&$filter=messageid
//! eq '<…>'`; a row found is the one an earlier attempt created (its answer
//! lost, the daemon killed before it recorded the id), and its id is
//! returned instead of creating a second. Mail without a Message-ID gets a
//! stable synthetic one ([`synthetic_message_id`]) so the same lookup works.
//!
//! Columns follow the email table reference: `subject`, `description`,
//! `messageid`, `directioncode`, `actualstart`/`actualend` (`senton` is not
//! writable), `statecode` 1 Completed with `statuscode` 4 Received (3 Sent
//! for outgoing mail seen in a mailbox; mail the daemon sends carries its
//! send status instead, see [`super::send_status`]),
//! `regardingobjectid_<table>_email@odata.bind` and the
//! `email_activity_parties` collection (deep insert). `correlationmethod` is
//! read-only in Dataverse, so our method and its Dataverse value go into the
//! description instead.

use reqwest::StatusCode;
use serde_json::{json, Map, Value};

use super::{is_guid, odata_string, query_encode, table_of, DataverseAdapter};
use crate::crm::{CrmError, DeliveryReceipt};
use crate::model::{
    format_time, CorrelationMethod, Direction, EmailActivity, EventKind, OutboxEvent, Party,
    PartyRole, RecordRef,
};

/// `messageid` holds at most this many characters.
const MESSAGE_ID_MAX: usize = 320;
/// `subject` holds at most this many characters.
const SUBJECT_MAX: usize = 800;

/// Dataverse's `correlationmethod` value for our method: 0 None, 1 Skipped,
/// 3 InReplyTo, 4 TrackingToken, 5 ConversationIndex, 6 SmartMatching;
/// folder tracking and our own rules have no value of their own and count
/// as 7 CustomCorrelation (2 XHeader is Dynamics' own header correlation,
/// which we do not use).
pub fn correlation_method_value(m: CorrelationMethod) -> u8 {
    match m {
        CorrelationMethod::None => 0,
        CorrelationMethod::Skipped => 1,
        CorrelationMethod::InReplyTo => 3,
        CorrelationMethod::TrackingToken => 4,
        CorrelationMethod::ConversationIndex => 5,
        CorrelationMethod::SmartMatching => 6,
        CorrelationMethod::Folder | CorrelationMethod::Custom => 7,
    }
}

fn correlation_method_name(v: u8) -> &'static str {
    match v {
        0 => "None",
        1 => "Skipped",
        2 => "XHeader",
        3 => "InReplyTo",
        4 => "TrackingToken",
        5 => "ConversationIndex",
        6 => "SmartMatching",
        _ => "CustomCorrelation",
    }
}

/// The `messageid` for mail that has no usable Message-ID (none, or longer
/// than the column): built from the activity id and the content hash, so it
/// is the same on every retry of the same activity and differs between
/// daemons' stores (their ids collide, their contents do not).
pub fn synthetic_message_id(a: &EmailActivity) -> String {
    let hash: String = a
        .content_hash
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(24)
        .collect();
    format!("<crm-mailsync.{}.{hash}@activity.invalid>", a.id)
}

/// The `messageid` we write and look up: the email's first Message-ID in
/// angle brackets, as Dynamics stores it.
pub(super) fn message_id_of(a: &EmailActivity) -> String {
    match a.message_ids.first().map(|m| m.trim()) {
        Some(m) if !m.is_empty() && m.len() + 2 <= MESSAGE_ID_MAX => format!("<{m}>"),
        _ => synthetic_message_id(a),
    }
}

fn receipt(id: String) -> DeliveryReceipt {
    DeliveryReceipt { crm_id: Some(id) }
}

/// Delivers one event (see the module docs).
pub(super) async fn deliver(
    dv: &DataverseAdapter,
    event: &OutboxEvent,
    crm_id: Option<&str>,
) -> Result<DeliveryReceipt, CrmError> {
    let a = &event.activity;
    match event.kind {
        EventKind::ActivityCreated => {
            if let Some(id) = crm_id {
                return Ok(receipt(id.to_string()));
            }
            // An email the CRM left in Pending Send: that email becomes
            // ours (never a second one beside it).
            if let Some(id) = super::send_status::crm_email_id(a) {
                if super::send_status::adopt(dv, &id, a, &message_id_of(a)).await? {
                    return Ok(receipt(id));
                }
            }
            create_once(dv, a).await
        }
        EventKind::ActivityUpdated => {
            let known = match crm_id
                .map(String::from)
                .or_else(|| super::send_status::crm_email_id(a))
            {
                Some(id) => Some(id),
                None => lookup(dv, &message_id_of(a)).await?,
            };
            match known {
                Some(id) => {
                    if update(dv, &id, a, &event.changes).await? {
                        return Ok(receipt(id));
                    }
                    // Gone from Dataverse (deleted there): the activity as it
                    // is now goes in again, once.
                    create_once(dv, a).await
                }
                // Never created (its create was dead-lettered, or the row
                // was deleted): the full current state is the update.
                None => create_once(dv, a).await,
            }
        }
    }
}

/// The `activityid` of the email with this `messageid`, if Dataverse has one.
async fn lookup(dv: &DataverseAdapter, message_id: &str) -> Result<Option<String>, CrmError> {
    let filter = format!("messageid eq {}", odata_string(message_id));
    let path = format!(
        "emails?$select=activityid&$filter={}",
        query_encode(&filter)
    );
    let page = dv
        .get_json(&path, &[], "looking up the email by its messageid")
        .await?;
    Ok(page
        .get("value")
        .and_then(|v| v.as_array())
        .and_then(|rows| rows.first())
        .and_then(|r| r.get("activityid"))
        .and_then(|v| v.as_str())
        .map(String::from))
}

/// Looks the email up by `messageid` and creates it only when absent.
async fn create_once(
    dv: &DataverseAdapter,
    a: &EmailActivity,
) -> Result<DeliveryReceipt, CrmError> {
    let message_id = message_id_of(a);
    if let Some(id) = lookup(dv, &message_id).await? {
        return Ok(receipt(id));
    }
    let body = email_body(a, &message_id)?;
    let purpose = format!("creating the email for activity {}", a.id);
    let answer = dv
        .request(reqwest::Method::POST, "emails", &[], Some(&body), &purpose)
        .await?;
    // 204 with `OData-EntityId: …/emails(<guid>)`; 201 with the row when
    // someone configured `return=representation` in front of us.
    let from_header = answer
        .headers
        .get("OData-EntityId")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let inner = v.rsplit_once('(')?.1;
            inner.strip_suffix(')').map(String::from)
        });
    let id = from_header.or_else(|| {
        serde_json::from_str::<Value>(&answer.body)
            .ok()?
            .get("activityid")?
            .as_str()
            .map(String::from)
    });
    match id {
        Some(id) => Ok(receipt(id)),
        None => Err(CrmError::permanent(format!(
            "{purpose}: Dataverse answered {} without an OData-EntityId header",
            answer.status
        ))),
    }
}

/// Applies an `activity.updated` to email `id`; `false` when Dataverse has
/// no such email any more.
async fn update(
    dv: &DataverseAdapter,
    id: &str,
    a: &EmailActivity,
    changes: &[String],
) -> Result<bool, CrmError> {
    if !is_guid(id) {
        return Err(CrmError::permanent(format!(
            "the stored Dataverse id {id:?} of activity {} is not a GUID",
            a.id
        )));
    }
    let changed = |what: &str| changes.iter().any(|c| c == what);
    if changed("regarding") {
        if let Some(r) = &a.regarding {
            let mut patch = Map::new();
            let (prop, target) = regarding_bind(r)?;
            patch.insert(prop, Value::String(target));
            let purpose = format!("re-pointing the email of activity {} to {r}", a.id);
            // `If-Match: *`: update only; a PATCH to a missing id would
            // otherwise create a row with that id (upsert).
            let answer = dv
                .request_accepting(
                    reqwest::Method::PATCH,
                    &format!("emails({id})"),
                    &[("If-Match", "*".to_string())],
                    Some(&Value::Object(patch)),
                    &purpose,
                    &[StatusCode::NOT_FOUND],
                )
                .await?;
            if answer.status == StatusCode::NOT_FOUND {
                // The email itself, or the record the bind points to?
                return gone_or_error(dv, id, &answer, &purpose).await;
            }
        }
        // A regarding that was removed stays in Dataverse: taking it off
        // needs the old table's navigation property, which the event does
        // not carry.
    }
    if changed("parties") {
        let body = json!({ "value": parties_json(a) });
        let purpose = format!("replacing the parties of the email of activity {}", a.id);
        let answer = dv
            .request_accepting(
                reqwest::Method::PUT,
                &format!("emails({id})/email_activity_parties"),
                &[],
                Some(&body),
                &purpose,
                &[StatusCode::NOT_FOUND],
            )
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return gone_or_error(dv, id, &answer, &purpose).await;
        }
    }
    if changed(super::send_status::CHANGE) {
        if let Some(send) = &a.send {
            let body = super::send_status::status_body(send)?;
            let purpose = format!(
                "setting the email of activity {} to {} ({})",
                a.id, send.dynamics_status, send.dynamics_statuscode
            );
            if !super::send_status::patch_email(dv, id, &body, &purpose).await? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// After a 404 on an update: `Ok(false)` when email `id` no longer exists,
/// else the 404 was about something the body binds (a record deleted in
/// Dynamics) and is a permanent error with Dataverse's text.
pub(super) async fn gone_or_error(
    dv: &DataverseAdapter,
    id: &str,
    answer: &super::Answer,
    purpose: &str,
) -> Result<bool, CrmError> {
    let check = dv
        .request_accepting(
            reqwest::Method::GET,
            &format!("emails({id})?$select=activityid"),
            &[],
            None,
            "checking whether the email still exists",
            &[StatusCode::NOT_FOUND],
        )
        .await?;
    if check.status == StatusCode::NOT_FOUND {
        return Ok(false);
    }
    Err(super::classify(
        answer.status,
        &answer.headers,
        &answer.body,
        purpose,
    ))
}

/// `regardingobjectid_<table>_email@odata.bind` and `/<set>(<guid>)`.
fn regarding_bind(r: &RecordRef) -> Result<(String, String), CrmError> {
    if !is_guid(r.id()) {
        return Err(CrmError::permanent(format!(
            "regarding {r} cannot be linked in Dataverse: its id is not a Dataverse GUID (give tracked folders and records their Dataverse ids)"
        )));
    }
    let (logical, set) = table_of(r.kind());
    Ok((
        format!("regardingobjectid_{logical}_email@odata.bind"),
        format!("/{set}({})", r.id()),
    ))
}

/// The activity party list: resolved parties bound to their record
/// (`partyid_<table>@odata.bind`) with the address used, unresolved ones by
/// `addressused` alone. Without stored parties (activities older than party
/// resolution) the from/to/cc addresses are used, unresolved.
fn parties_json(a: &EmailActivity) -> Vec<Value> {
    let mut parties: Vec<Party> = a.parties.clone();
    if parties.is_empty() {
        for (role, list) in [
            (PartyRole::From, &a.from),
            (PartyRole::To, &a.to),
            (PartyRole::Cc, &a.cc),
        ] {
            for address in list {
                parties.push(Party {
                    role,
                    address: crate::model::normalize_address(address),
                    record: None,
                    note: None,
                });
            }
        }
    }
    parties
        .iter()
        .map(|p| {
            let mut o = Map::new();
            o.insert(
                "participationtypemask".into(),
                Value::from(p.role.participation_type_mask()),
            );
            if let Some(r) = p.record.as_ref().filter(|r| is_guid(r.id())) {
                let (logical, set) = table_of(r.kind());
                o.insert(
                    format!("partyid_{logical}@odata.bind"),
                    Value::String(format!("/{set}({})", r.id())),
                );
            }
            o.insert("addressused".into(), Value::String(p.address.clone()));
            Value::Object(o)
        })
        .collect()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `description` (an HTML body in Dataverse). The daemon keeps no
/// message body, only what it decided: where the mail was seen, how it was
/// correlated and why.
fn description(a: &EmailActivity) -> String {
    let value = correlation_method_value(a.method);
    let mut out = format!(
        "<p>Tracked by crm-mailsync from mailbox {} (folder {}).</p><p>Correlation: {} ({} = {value}).</p>",
        html_escape(&a.mailbox),
        html_escape(&a.source.folder),
        html_escape(a.method.as_str()),
        correlation_method_name(value),
    );
    if !a.reasons.is_empty() {
        out.push_str("<ul>");
        for r in &a.reasons {
            out.push_str("<li>");
            out.push_str(&html_escape(r));
            out.push_str("</li>");
        }
        out.push_str("</ul>");
    }
    out
}

/// The create body (see the module docs).
fn email_body(a: &EmailActivity, message_id: &str) -> Result<Value, CrmError> {
    let mut o = Map::new();
    let subject: String = a.subject.chars().take(SUBJECT_MAX).collect();
    o.insert("subject".into(), Value::String(subject));
    o.insert("description".into(), Value::String(description(a)));
    o.insert("messageid".into(), Value::String(message_id.to_string()));
    let outgoing = a.direction == Direction::Outgoing;
    o.insert("directioncode".into(), Value::Bool(outgoing));
    if let Some(sent) = a.sent_at {
        o.insert("actualstart".into(), Value::String(format_time(sent)));
    }
    o.insert(
        "actualend".into(),
        Value::String(format_time(a.received_at)),
    );
    match &a.send {
        // Mail the daemon sends: its send status as it is now.
        Some(send) => {
            for (k, v) in super::send_status::status_body(send)?
                .as_object()
                .into_iter()
                .flatten()
            {
                o.insert(k.clone(), v.clone());
            }
            if let Some(t) = super::send_status::tracking_token(send) {
                o.insert("trackingtoken".into(), Value::String(t));
            }
        }
        // Completed (1) with Received (4), or Sent (3) for our own outgoing
        // mail seen in a mailbox.
        None => {
            o.insert("statecode".into(), Value::from(1));
            o.insert(
                "statuscode".into(),
                Value::from(if outgoing { 3 } else { 4 }),
            );
        }
    }
    if let Some(r) = &a.regarding {
        let (prop, target) = regarding_bind(r)?;
        o.insert(prop, Value::String(target));
    }
    o.insert(
        "email_activity_parties".into(),
        Value::Array(parties_json(a)),
    );
    Ok(Value::Object(o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourceKey;

    fn activity() -> EmailActivity {
        EmailActivity {
            id: 7,
            mailbox: "support".into(),
            source: SourceKey {
                mailbox: "support".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: "1".into(),
            },
            message_ids: vec!["abc@example.test".into()],
            in_reply_to: vec![],
            references: vec![],
            direction: Direction::Incoming,
            subject: "Broken <pump>".into(),
            from: vec!["Ann@Example.test".into()],
            to: vec!["support@example.test".into()],
            cc: vec![],
            sent_at: Some(1_700_000_000),
            received_at: 1_700_000_060,
            regarding: Some("case:00aa00aa-bb11-cc22-dd33-44ee44ee44ee".parse().unwrap()),
            method: CorrelationMethod::InReplyTo,
            score: 1.0,
            reasons: vec!["In-Reply-To <x@y>".into()],
            correlated_with: None,
            content_hash: "0123456789abcdef0123456789abcdef".into(),
            size: 10,
            also_seen_as: vec![],
            forwarded_by: None,
            automatic: None,
            no_reply: false,
            send: None,
            parties: vec![
                Party {
                    role: PartyRole::From,
                    address: "ann@example.test".into(),
                    record: Some(
                        "contact:11111111-2222-3333-4444-555555555555"
                            .parse()
                            .unwrap(),
                    ),
                    note: None,
                },
                Party {
                    role: PartyRole::Cc,
                    address: "who@else.test".into(),
                    record: None,
                    note: Some("no record".into()),
                },
            ],
        }
    }

    #[test]
    fn body_follows_the_email_table() {
        let a = activity();
        let b = email_body(&a, &message_id_of(&a)).unwrap();
        assert_eq!(b["messageid"], "<abc@example.test>");
        assert_eq!(b["directioncode"], false);
        assert_eq!(b["statuscode"], 4);
        assert_eq!(b["statecode"], 1);
        assert_eq!(
            b["regardingobjectid_incident_email@odata.bind"],
            "/incidents(00aa00aa-bb11-cc22-dd33-44ee44ee44ee)"
        );
        let parties = b["email_activity_parties"].as_array().unwrap();
        assert_eq!(parties[0]["participationtypemask"], 1);
        assert_eq!(
            parties[0]["partyid_contact@odata.bind"],
            "/contacts(11111111-2222-3333-4444-555555555555)"
        );
        assert_eq!(parties[1]["participationtypemask"], 3);
        assert_eq!(parties[1]["addressused"], "who@else.test");
        assert!(parties[1].get("partyid_contact@odata.bind").is_none());
        let d = b["description"].as_str().unwrap();
        assert!(d.contains("InReplyTo = 3"), "{d}");
        assert!(b.get("correlationmethod").is_none());
    }

    #[test]
    fn synthetic_message_id_is_stable_and_per_store() {
        let mut a = activity();
        a.message_ids.clear();
        let m = message_id_of(&a);
        assert_eq!(
            m,
            "<crm-mailsync.7.0123456789abcdef01234567@activity.invalid>"
        );
        assert_eq!(m, message_id_of(&a));
        a.content_hash = "ffff".into();
        assert_ne!(m, message_id_of(&a));
    }

    #[test]
    fn non_guid_regarding_is_a_permanent_error() {
        let mut a = activity();
        a.regarding = Some("case:42".parse().unwrap());
        let e = email_body(&a, "<x>").unwrap_err();
        assert!(matches!(e, CrmError::Permanent { .. }));
    }

    #[test]
    fn correlation_values_match_dataverse() {
        assert_eq!(correlation_method_value(CorrelationMethod::None), 0);
        assert_eq!(
            correlation_method_value(CorrelationMethod::TrackingToken),
            4
        );
        assert_eq!(
            correlation_method_value(CorrelationMethod::SmartMatching),
            6
        );
        assert_eq!(correlation_method_value(CorrelationMethod::Folder), 7);
    }
}
