//! Send status out: the email's `statecode`/`statuscode` follow the
//! activity's [`SendState`], and an email the CRM left in Pending Send is
//! the one updated (adopted), never duplicated.
//!
//! Status reasons and their states, from the email table reference
//! (`StatusCode` choices): 1 Draft and 8 Failed are state 0 Open; 2
//! Completed, 3 Sent, 4 Received, 6 Pending Send and 7 Sending are state 1
//! Completed; 5 Canceled is state 2 Canceled. Moving a Pending Send email
//! (state 1) to Failed (state 0) or Canceled (state 2) is a state change the
//! reference lists as a `PATCH` of both columns (SetState); that Dataverse
//! accepts every such transition on an email is **[check]** against a real
//! environment (the stand-in accepts any valid pair). Every write is a `PATCH` with
//! `If-Match: *` (update only), so a repeated delivery writes the same values
//! again and changes nothing.

use reqwest::StatusCode;
use serde_json::{Map, Value};

use super::{is_guid, DataverseAdapter};
use crate::crm::CrmError;
use crate::model::{EmailActivity, SendState};

/// The change name of a send status event (`activity.updated`).
pub(super) const CHANGE: &str = "send_status";

/// `trackingtoken` holds at most this many characters.
const TRACKING_TOKEN_MAX: usize = 50;

/// The `statecode` a `statuscode` of the email table belongs to.
pub fn email_statecode(statuscode: u8) -> Option<u8> {
    match statuscode {
        1 | 8 => Some(0),
        2 | 3 | 4 | 6 | 7 => Some(1),
        5 => Some(2),
        _ => None,
    }
}

/// The columns that carry a send state: `statecode`, `statuscode` and
/// `directioncode` (outgoing).
pub(super) fn status_body(send: &SendState) -> Result<Value, CrmError> {
    let statuscode = send.dynamics_statuscode;
    let statecode = email_statecode(statuscode).ok_or_else(|| {
        CrmError::permanent(format!(
            "send status {} has Dynamics status code {statuscode}, which the email table does not have",
            send.status.as_str()
        ))
    })?;
    let mut o = Map::new();
    o.insert("statecode".into(), Value::from(statecode));
    o.insert("statuscode".into(), Value::from(statuscode));
    o.insert("directioncode".into(), Value::Bool(true));
    Ok(Value::Object(o))
}

/// The token to write into `trackingtoken`, when it fits.
pub(super) fn tracking_token(send: &SendState) -> Option<String> {
    send.token
        .as_ref()
        .filter(|t| !t.is_empty() && t.chars().count() <= TRACKING_TOKEN_MAX)
        .cloned()
}

/// The CRM's own email of a send, when it has one that is a GUID.
pub(super) fn crm_email_id(a: &EmailActivity) -> Option<String> {
    a.send
        .as_ref()
        .and_then(|s| s.crm_email_id.as_deref())
        .map(str::trim)
        .filter(|id| is_guid(id))
        .map(str::to_ascii_lowercase)
}

/// The body that makes the CRM's Pending Send email ours: the subject as
/// sent (token appended), `messageid` (so replies and the lookup find it),
/// `trackingtoken`, and the status. Its description (the body the user
/// wrote), regarding and parties are the CRM's and stay as they are.
pub(super) fn adopt_body(a: &EmailActivity, message_id: &str) -> Result<Value, CrmError> {
    let Some(send) = &a.send else {
        return Err(CrmError::permanent(format!(
            "activity {} has no send state to write",
            a.id
        )));
    };
    let mut body = status_body(send)?;
    if let Some(o) = body.as_object_mut() {
        let subject: String = a.subject.chars().take(800).collect();
        o.insert("subject".into(), Value::String(subject));
        o.insert("messageid".into(), Value::String(message_id.to_string()));
        if let Some(t) = tracking_token(send) {
            o.insert("trackingtoken".into(), Value::String(t));
        }
    }
    Ok(body)
}

/// Updates the CRM's email `id` for activity `a` (see [`adopt_body`]);
/// `false` when Dataverse has no such email any more (deleted there), so
/// the caller creates one instead.
pub(super) async fn adopt(
    dv: &DataverseAdapter,
    id: &str,
    a: &EmailActivity,
    message_id: &str,
) -> Result<bool, CrmError> {
    let body = adopt_body(a, message_id)?;
    let purpose = format!(
        "updating the CRM's pending email {id} for activity {}",
        a.id
    );
    patch_email(dv, id, &body, &purpose).await
}

/// `PATCH emails(id)` as an update only (`If-Match: *`, never an upsert);
/// `Ok(false)` when Dataverse has no such email any more (deleted there).
pub(super) async fn patch_email(
    dv: &DataverseAdapter,
    id: &str,
    body: &Value,
    purpose: &str,
) -> Result<bool, CrmError> {
    let answer = dv
        .request_accepting(
            reqwest::Method::PATCH,
            &format!("emails({id})"),
            &[("If-Match", "*".to_string())],
            Some(body),
            purpose,
            &[StatusCode::NOT_FOUND],
        )
        .await?;
    if answer.status == StatusCode::NOT_FOUND {
        return super::emails::gone_or_error(dv, id, &answer, purpose).await;
    }
    Ok(true)
}

/// Marks the CRM's Pending Send email `id` Failed because the daemon will
/// not send it (Dynamics does the same and says why in a mailbox alert):
/// left Pending Send it would be polled, and alerted, forever.
pub(super) async fn refuse(dv: &DataverseAdapter, id: &str, reason: &str) -> Result<(), CrmError> {
    let failed = SendState::new(crate::model::SendStatus::Failed, crate::model::now());
    let body = status_body(&failed)?;
    let purpose = format!("marking the CRM's pending email {id} failed ({reason})");
    // Deleted there meanwhile: nothing left to mark.
    patch_email(dv, id, &body, &purpose).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SendStatus;

    #[test]
    fn states_follow_the_email_table() {
        for (status, state, code) in [
            (SendStatus::PendingSend, 1, 6),
            (SendStatus::Sending, 1, 7),
            (SendStatus::Sent, 1, 3),
            (SendStatus::Failed, 0, 8),
            (SendStatus::Canceled, 2, 5),
        ] {
            let b = status_body(&SendState::new(status, 1)).unwrap();
            assert_eq!(b["statecode"], state, "{status:?}");
            assert_eq!(b["statuscode"], code, "{status:?}");
            assert_eq!(b["directioncode"], true);
            assert_eq!(b.as_object().unwrap().len(), 3);
        }
        assert_eq!(email_statecode(1), Some(0));
        assert_eq!(email_statecode(4), Some(1));
        assert_eq!(email_statecode(9), None);
    }

    #[test]
    fn long_tokens_are_not_written() {
        let mut s = SendState::new(SendStatus::PendingSend, 1);
        s.token = Some("CRM:0001001".into());
        assert_eq!(tracking_token(&s).as_deref(), Some("CRM:0001001"));
        s.token = Some("x".repeat(51));
        assert_eq!(tracking_token(&s), None);
    }
}
