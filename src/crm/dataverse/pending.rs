//! Pending send in: emails a user (or a workflow) left in Dynamics in
//! Pending Send (`statecode` 1, `statuscode` 6, outgoing) are queued to send
//! from the configured mailbox whose address is the email's sender.
//!
//! One poll reads
//! `emails?$select=activityid,subject,description,messageid,_regardingobjectid_value
//! &$filter=statuscode eq 6 and directioncode eq true
//! &$expand=email_activity_parties($select=participationtypemask,addressused,_partyid_value)`
//! with `Prefer: odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"`
//! (the table of the regarding record and of each party) and
//! `odata.maxpagesize`, following `@odata.nextLink`.
//!
//! Each email becomes an [`OutgoingRequest`] with `crm_email_id` = its
//! `activityid` and the idempotency key `dataverse:<activityid>`, so a
//! re-poll (the email is still Pending Send until its first status event is
//! delivered) finds the queued email and never queues a second. The sent
//! email's status events then update that same Dataverse email
//! ([`super::send_status`]). Emails whose `messageid` is one of ours (the
//! adapter wrote it) are never queued: they are mail the daemon itself
//! queued and recorded.
//!
//! A refused email (no regarding, mailbox not allowed to send, bad
//! addresses) is marked Failed in the CRM (else it would be polled and
//! alerted forever), logged and raised as a Warning alert on its mailbox; it
//! never stops the poll. Emails from addresses that are not a configured
//! sending mailbox belong to someone else's sync and are skipped quietly.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{kind_of, query_encode, DataverseAdapter};
use crate::alerts::Alerts;
use crate::config::Config;
use crate::crm::CrmError;
use crate::model::{AlertLevel, Delivery, UnixTime};
use crate::outgoing::queue::{queue, QueueError};
use crate::outgoing::{OutgoingRequest, SendWakeup};
use crate::store::Store;

/// How often the loop asks Dataverse for Pending Send emails (one request
/// per page, far below the service protection limits).
pub const PENDING_SEND_INTERVAL: Duration = Duration::from_secs(15);

/// The annotation with a lookup's table (logical name).
const LOOKUP_LOGICAL_NAME: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";

/// One email in Pending Send, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingEmail {
    pub activity_id: String,
    pub subject: String,
    /// `description`: the HTML body.
    pub html: Option<String>,
    pub message_id: Option<String>,
    /// `(logical name, id)` of the regarding record.
    pub regarding: Option<(String, String)>,
    pub parties: Vec<PendingParty>,
}

/// One activity party of a pending email.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingParty {
    /// 1 From, 2 To, 3 Cc, 4 Bcc (others are ignored).
    pub mask: i64,
    pub address: Option<String>,
    /// `(logical name, id)` of the party's record.
    pub record: Option<(String, String)>,
}

/// What one poll did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Newly queued.
    pub queued: usize,
    /// Queued by an earlier poll (idempotency key matched).
    pub existing: usize,
    /// Not ours to send (unknown or non-sending mailbox, our own email).
    pub skipped: usize,
    /// Refused (logged and alerted).
    pub refused: usize,
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

fn lookup(v: &Value, key: &str) -> Option<(String, String)> {
    let id = text(v, key)?;
    let logical = text(v, &format!("{key}{LOOKUP_LOGICAL_NAME}"))?;
    Some((logical, id.to_ascii_lowercase()))
}

/// Reads one row of the Pending Send query.
fn parse_row(row: &Value) -> Option<PendingEmail> {
    let activity_id = text(row, "activityid")?.to_ascii_lowercase();
    let parties = row
        .get("email_activity_parties")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|p| PendingParty {
                    mask: p
                        .get("participationtypemask")
                        .and_then(Value::as_i64)
                        .unwrap_or(0),
                    address: text(p, "addressused"),
                    record: lookup(p, "_partyid_value"),
                })
                .collect()
        })
        .unwrap_or_default();
    Some(PendingEmail {
        activity_id,
        subject: text(row, "subject").unwrap_or_default(),
        html: text(row, "description"),
        message_id: text(row, "messageid"),
        regarding: lookup(row, "_regardingobjectid_value"),
        parties,
    })
}

impl DataverseAdapter {
    /// The attachments of email `id` (`activitymimeattachments` whose
    /// `objectid` is the email; `body` is base64 already).
    pub async fn attachments_of(
        &self,
        id: &str,
    ) -> Result<Vec<crate::outgoing::AttachmentRequest>, CrmError> {
        let mut next = format!(
            "activitymimeattachments?$select=filename,mimetype,body&$filter={}",
            query_encode(&format!("_objectid_value eq {id}"))
        );
        let prefer = [("Prefer", format!("odata.maxpagesize={}", self.page_size))];
        let purpose = format!("reading the attachments of email {id}");
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let page = self.get_json(&next, &prefer, &purpose).await?;
            for row in page
                .get("value")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out.push(crate::outgoing::AttachmentRequest {
                    filename: text(row, "filename").unwrap_or_else(|| "attachment".into()),
                    content_type: text(row, "mimetype"),
                    content_base64: text(row, "body").unwrap_or_default(),
                });
            }
            match page.get("@odata.nextLink").and_then(Value::as_str) {
                Some(link) => next = link.to_string(),
                None => return Ok(out),
            }
        }
        Err(CrmError::permanent(format!(
            "{purpose}: more than 10,000 pages; the paging does not end"
        )))
    }

    /// Every email in Pending Send (all pages; see the module docs).
    pub async fn pending_send(&self) -> Result<Vec<PendingEmail>, CrmError> {
        let filter = "statuscode eq 6 and directioncode eq true";
        let expand =
            "email_activity_parties($select=participationtypemask,addressused,_partyid_value)";
        let mut next = format!(
            "emails?$select=activityid,subject,description,messageid,_regardingobjectid_value&$filter={}&$expand={}",
            query_encode(filter),
            query_encode(expand)
        );
        let prefer = [(
            "Prefer",
            format!(
                "odata.maxpagesize={},odata.include-annotations=\"Microsoft.Dynamics.CRM.lookuplogicalname\"",
                self.page_size
            ),
        )];
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let page = self
                .get_json(&next, &prefer, "reading the emails in Pending Send")
                .await?;
            let rows = page.get("value").and_then(Value::as_array).ok_or_else(|| {
                CrmError::permanent(
                    "reading the emails in Pending Send: Dataverse answered without a \"value\" array",
                )
            })?;
            out.extend(rows.iter().filter_map(parse_row));
            match page.get("@odata.nextLink").and_then(Value::as_str) {
                Some(link) => next = link.to_string(),
                None => return Ok(out),
            }
        }
        Err(CrmError::permanent(
            "reading the emails in Pending Send: more than 10,000 pages; the paging does not end",
        ))
    }
}

/// The address of a party: the one Dynamics used, else the first address
/// of its record in the directory.
fn address_of(store: &dyn Store, p: &PendingParty) -> Option<String> {
    if let Some(a) = &p.address {
        return Some(a.clone());
    }
    let (logical, id) = p.record.as_ref()?;
    let record = store.record(&kind_of(logical), id).ok().flatten()?;
    record.emails.first().cloned()
}

/// Why a pending email is not queued.
#[derive(Debug)]
pub enum Decision {
    /// Queue this request.
    Queue(Box<OutgoingRequest>),
    /// Not ours (debug log).
    Skip(String),
    /// Ours, but it cannot be queued (warning + alert on the mailbox, if known).
    Refuse {
        mailbox: Option<String>,
        why: String,
    },
}

/// Maps a pending email to a request for the sending mailbox (see the
/// module docs).
pub fn decide(store: &dyn Store, cfg: &Config, e: &PendingEmail) -> Decision {
    if let Some(m) = &e.message_id {
        let id = crate::correlate::normalize_message_id(m);
        match store.tracked_by_message_ids(std::slice::from_ref(&id)) {
            Ok(found) if !found.is_empty() => {
                return Decision::Skip(format!(
                    "email {} is one the daemon recorded itself (messageid {m})",
                    e.activity_id
                ))
            }
            Ok(_) => {}
            Err(err) => {
                return Decision::Refuse {
                    mailbox: None,
                    why: format!(
                        "pending email {}: cannot check its messageid against the store: {err}",
                        e.activity_id
                    ),
                }
            }
        }
    }
    let addresses = |mask: i64| -> Vec<String> {
        e.parties
            .iter()
            .filter(|p| p.mask == mask)
            .filter_map(|p| address_of(store, p))
            .collect()
    };
    let Some(from) = addresses(1).into_iter().next() else {
        return Decision::Refuse {
            mailbox: None,
            why: format!(
                "pending email {} has no sender address (From party without addressused or a record with an address)",
                e.activity_id
            ),
        };
    };
    let Some(mailbox) = cfg
        .mailboxes
        .iter()
        .find(|m| m.email.trim().eq_ignore_ascii_case(from.trim()))
    else {
        return Decision::Skip(format!(
            "pending email {} is from {from}, which is not a configured mailbox",
            e.activity_id
        ));
    };
    if mailbox.outgoing != Delivery::ServerSideSync {
        return Decision::Skip(format!(
            "pending email {} is from mailbox {:?}, whose outgoing delivery is not server-side sync",
            e.activity_id, mailbox.name
        ));
    }
    let regarding = e
        .regarding
        .as_ref()
        .map(|(logical, id)| format!("{}:{id}", kind_of(logical)));
    Decision::Queue(Box::new(OutgoingRequest {
        mailbox: mailbox.name.clone(),
        regarding,
        to: addresses(2),
        cc: addresses(3),
        bcc: addresses(4),
        subject: e.subject.clone(),
        html: e.html.clone(),
        idempotency_key: Some(format!("dataverse:{}", e.activity_id)),
        crm_email_id: Some(e.activity_id.clone()),
        ..OutgoingRequest::default()
    }))
}

/// One poll: reads the Pending Send emails and queues each that is ours.
/// Only reading Dataverse fails the poll; a refused email is logged and
/// alerted, and the poll goes on.
pub async fn poll_pending_send(
    dv: &DataverseAdapter,
    store: &Arc<dyn Store>,
    cfg: &Arc<Config>,
    alerts: Option<&Alerts>,
    now: UnixTime,
) -> Result<PollReport, CrmError> {
    let emails = dv.pending_send().await?;
    let mut report = PollReport::default();
    for e in emails {
        let (mailbox, why) = match decide(store.as_ref(), cfg, &e) {
            Decision::Skip(why) => {
                tracing::debug!(adapter = "dataverse", crm_email = %e.activity_id, "{why}");
                report.skipped += 1;
                continue;
            }
            Decision::Refuse { mailbox, why } => (mailbox, why),
            Decision::Queue(mut req) => {
                // The files the user attached in the CRM go out with it.
                req.attachments = dv.attachments_of(&e.activity_id).await?;
                let (s, c) = (store.clone(), cfg.clone());
                let name = req.mailbox.clone();
                let queued = tokio::task::spawn_blocking(move || queue(s.as_ref(), &c, &req, now))
                    .await
                    .map_err(|j| CrmError::transient(format!("queueing task failed: {j}")))?;
                match queued {
                    Ok(q) if q.existing => {
                        report.existing += 1;
                        continue;
                    }
                    Ok(q) => {
                        tracing::info!(
                            adapter = "dataverse",
                            mailbox = %name,
                            crm_email = %e.activity_id,
                            activity = q.id,
                            "queued the CRM's Pending Send email"
                        );
                        report.queued += 1;
                        continue;
                    }
                    // A store failure is the daemon's, not the email's: the
                    // next poll tries again.
                    Err(QueueError::Store(err)) => {
                        return Err(CrmError::transient(format!(
                            "queueing the CRM's pending email {}: {err}",
                            e.activity_id
                        )))
                    }
                    Err(err) => (
                        Some(name),
                        format!(
                            "the CRM's pending email {} ({:?}) cannot be sent: {err}",
                            e.activity_id, e.subject
                        ),
                    ),
                }
            }
        };
        report.refused += 1;
        let why = match super::send_status::refuse(dv, &e.activity_id, &why).await {
            Ok(()) => format!("{why}; marked Failed in the CRM"),
            // Still Pending Send there: the next poll tries again.
            Err(err) => format!("{why}; could not mark it Failed in the CRM: {err}"),
        };
        tracing::warn!(adapter = "dataverse", crm_email = %e.activity_id, "{why}");
        if let Some(alerts) = alerts {
            alerts.raise(
                "crm:pending_send_refused",
                AlertLevel::Warning,
                mailbox.as_deref(),
                None,
                &why,
                now,
            );
        }
    }
    Ok(report)
}

/// The Pending Send loop: a poll at once and every [`PENDING_SEND_INTERVAL`]
/// until cancelled; senders are woken when something was queued.
pub async fn run_pending_send(
    dv: Arc<DataverseAdapter>,
    store: Arc<dyn Store>,
    cfg: Arc<Config>,
    alerts: Arc<Alerts>,
    wakeup: SendWakeup,
    cancel: CancellationToken,
) {
    loop {
        match poll_pending_send(&dv, &store, &cfg, Some(&alerts), crate::model::now()).await {
            Ok(r) => {
                if r.queued > 0 {
                    wakeup.notify_waiters();
                    wakeup.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(adapter = "dataverse", error = %e, "reading the emails in Pending Send failed; trying again at the next poll");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(PENDING_SEND_INTERVAL) => {}
        }
    }
}
