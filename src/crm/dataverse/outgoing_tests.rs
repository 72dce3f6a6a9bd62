//! Outgoing email against the Dataverse stand-in: the Pending Send poll
//! ([`super::pending`]) and the send status written back
//! ([`super::send_status`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::pending::{poll_pending_send, PollReport};
use super::standin::{guid, StandIn, StoredParty};
use super::DataverseAdapter;
use crate::alerts::Alerts;
use crate::config::{Config, DataverseSettings, Secret};
use crate::crm::CrmAdapter;
use crate::model::{AlertLevel, EventKind, OutboxEvent, SendStatus};
use crate::outgoing::OutgoingRequest;
use crate::store::{SledStore, Store};

const CLIENT: &str = "11111111-aaaa-bbbb-cccc-000000000001";
const SECRET: &str = "standin-secret~value";
const NOW: i64 = 1_790_000_000;

const CONFIG: &str = r#"
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
    email = "Support@Example.test"
    outgoing = "server_side_sync"
    approval = "approved"
    user_number = 7
    [[mailboxes]]
    name = "receiving"
    profile = "mail"
    email = "in@example.test"
    approval = "approved"
"#;

struct World {
    si: StandIn,
    dv: DataverseAdapter,
    store: Arc<dyn Store>,
    cfg: Arc<Config>,
    incident: String,
    contact: String,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let si = StandIn::start().await;
    si.add_client(CLIENT, SECRET);
    let dv = DataverseAdapter::new(&DataverseSettings {
        url: si.url.clone(),
        token_url: si.token_url.clone(),
        client_id: CLIENT.into(),
        client_secret: Secret::new(SECRET),
        scope: format!("{}/.default", si.url),
        allow_insecure: false,
        ca_file: None,
        timeout: Duration::from_secs(10),
        page_size: 2,
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{CONFIG}\n[daemon]\nstate_dir = {:?}\n",
        dir.path().display().to_string()
    );
    let cfg = crate::config::from_toml_str(&text, Vec::new(), Path::new(".")).unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
    let incident = guid(0x1c, 1);
    let contact = guid(0xc0, 1);
    si.seed(
        "incidents",
        vec![json!({"incidentid": incident, "title": "Pump"})],
    );
    si.seed(
        "contacts",
        vec![json!({"contactid": contact, "fullname": "Carol", "emailaddress1": "carol@customer.example"})],
    );
    World {
        si,
        dv,
        store,
        cfg: Arc::new(cfg),
        incident,
        contact,
        _dir: dir,
    }
}

fn party(mask: i64, address: Option<&str>, record: Option<(&str, &str)>) -> StoredParty {
    StoredParty {
        mask,
        party: record.map(|(s, id)| (s.to_string(), id.to_string())),
        addressused: address.map(String::from),
    }
}

impl World {
    /// An email a user left in Pending Send, from `from`.
    fn pending(&self, subject: &str, from: &str, regarding: bool) -> String {
        self.si.seed_email(
            json!({
                "subject": subject,
                "description": format!("<p>{subject}, written in Dynamics</p>"),
                "directioncode": true,
                "statecode": 1,
                "statuscode": 6,
            }),
            regarding.then_some(("incidents", self.incident.as_str())),
            vec![
                party(1, Some(from), None),
                party(
                    2,
                    Some("carol@customer.example"),
                    Some(("contacts", &self.contact)),
                ),
                party(3, Some("boss@customer.example"), None),
            ],
        )
    }

    async fn poll(&self, alerts: Option<&Alerts>) -> PollReport {
        poll_pending_send(&self.dv, &self.store, &self.cfg, alerts, NOW)
            .await
            .unwrap()
    }

    fn email(&self, id: &str) -> serde_json::Map<String, serde_json::Value> {
        self.si
            .emails()
            .into_iter()
            .find(|e| e.id == id)
            .unwrap()
            .fields
    }

    /// The event the store would hand the outbox worker for activity `id`
    /// as it is now.
    fn event(&self, id: u64, kind: EventKind, changes: &[&str]) -> OutboxEvent {
        OutboxEvent {
            seq: 1,
            id: OutboxEvent::id_for(1),
            kind,
            activity_id: id,
            changes: changes.iter().map(|c| c.to_string()).collect(),
            at: NOW,
            activity: self.store.activity(id).unwrap().unwrap(),
        }
    }

    fn queued_id(&self, crm_email: &str) -> u64 {
        self.store
            .outgoing_by_key(&format!("dataverse:{crm_email}"))
            .unwrap()
            .expect("queued under its idempotency key")
    }
}

#[tokio::test]
async fn pending_send_rows_are_queued_once_across_two_polls() {
    let w = world().await;
    let ids: Vec<String> = (0..3)
        .map(|i| w.pending(&format!("Quote {i}"), "support@example.test", true))
        .collect();
    // Not Pending Send, or incoming: never read by the poll.
    w.si.seed_email(
        json!({"subject": "done", "directioncode": true, "statecode": 1, "statuscode": 3}),
        None,
        vec![party(1, Some("support@example.test"), None)],
    );
    w.si.seed_email(
        json!({"subject": "in", "directioncode": false, "statecode": 1, "statuscode": 4}),
        None,
        vec![party(1, Some("support@example.test"), None)],
    );

    let first = w.poll(None).await;
    assert_eq!(
        first,
        PollReport {
            queued: 3,
            ..PollReport::default()
        }
    );
    // Page size 2: two pages of the query, followed by @odata.nextLink.
    assert_eq!(
        w.si.stats().by_route[&("GET".to_string(), "emails".to_string())],
        2
    );
    assert_eq!(w.si.stats().missing_odata_headers, 0);
    let second = w.poll(None).await;
    assert_eq!(
        second,
        PollReport {
            existing: 3,
            ..PollReport::default()
        }
    );

    let a = w.store.activity(w.queued_id(&ids[0])).unwrap().unwrap();
    let send = a.send.as_ref().unwrap();
    assert_eq!(send.status, SendStatus::PendingSend);
    assert_eq!(send.crm_email_id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(
        a.regarding.as_ref().map(|r| r.to_string()),
        Some(format!("case:{}", w.incident))
    );
    assert!(a.subject.starts_with("Quote 0"), "{}", a.subject);
    assert_eq!(a.to, vec!["carol@customer.example".to_string()]);
    assert_eq!(a.cc, vec!["boss@customer.example".to_string()]);
    let row = w.store.outgoing(a.id).unwrap().unwrap();
    assert!(
        row.mime.contains("written in Dynamics"),
        "the HTML body is sent"
    );
    assert_eq!(row.mailbox, "support");
}

#[tokio::test]
async fn mail_of_unknown_or_non_sending_mailboxes_is_skipped() {
    let w = world().await;
    w.pending("Someone else's", "other@elsewhere.example", true);
    w.pending("Receiving only", "IN@example.test", true);
    let r = w.poll(None).await;
    assert_eq!(
        r,
        PollReport {
            skipped: 2,
            ..PollReport::default()
        }
    );
    assert_eq!(
        w.store.outgoing_list(None, None, None, 10).unwrap().len(),
        0
    );
}

#[tokio::test]
async fn a_refused_email_is_alerted_and_the_poll_goes_on() {
    let w = world().await;
    let bad = w.pending("No regarding", "support@example.test", false);
    let good = w.pending("Fine", "support@example.test", true);
    let alerts = Alerts::new(w.store.clone(), HashMap::new());
    let r = w.poll(Some(&alerts)).await;
    assert_eq!(
        r,
        PollReport {
            queued: 1,
            refused: 1,
            ..PollReport::default()
        }
    );
    w.queued_id(&good);
    assert!(w
        .store
        .outgoing_by_key(&format!("dataverse:{bad}"))
        .unwrap()
        .is_none());
    let alerts = w.store.alerts(10).unwrap();
    assert!(
        alerts.iter().any(|a| a.level == AlertLevel::Warning
            && a.mailbox.as_deref() == Some("support")
            && a.text.contains(&bad)
            && a.text.contains("regarding")
            && a.text.contains("marked Failed")),
        "{alerts:?}"
    );
    // Failed in the CRM (state Open, reason Failed), so the next poll does
    // not see it again and the alert does not repeat.
    let e = w.email(&bad);
    assert_eq!(
        (e["statecode"].clone(), e["statuscode"].clone()),
        (json!(0), json!(8))
    );
    let again = w
        .poll(Some(&Alerts::new(w.store.clone(), HashMap::new())))
        .await;
    assert_eq!(again.refused, 0, "{again:?}");
}

#[tokio::test]
async fn a_sender_bound_to_a_queue_is_found_in_the_directory() {
    let w = world().await;
    let queue = guid(0x90, 1);
    w.si.seed(
        "queues",
        vec![json!({"queueid": queue, "name": "Support", "emailaddress": "support@example.test"})],
    );
    w.store
        .upsert_records(
            vec![crate::model::Record {
                kind: "queue".into(),
                id: queue.clone(),
                name: "Support".into(),
                emails: vec!["support@example.test".into()],
                owner: None,
                email_enabled: true,
                user_number: None,
                updated_at: 0,
            }],
            &[],
            None,
            NOW,
        )
        .unwrap();
    let id = w.si.seed_email(
        json!({"subject": "From the queue", "directioncode": true, "statecode": 1, "statuscode": 6}),
        Some(("incidents", &w.incident)),
        vec![
            party(1, None, Some(("queues", &queue))),
            party(2, Some("carol@customer.example"), None),
        ],
    );
    assert_eq!(w.poll(None).await.queued, 1);
    w.queued_id(&id);
}

#[tokio::test]
async fn the_crms_pending_email_is_patched_never_duplicated() {
    let w = world().await;
    let crm = w.pending("Quote", "support@example.test", true);
    w.poll(None).await;
    let id = w.queued_id(&crm);

    // activity.created, twice (a retry after a lost answer): PATCH, no POST.
    for _ in 0..2 {
        let r =
            w.dv.deliver(&w.event(id, EventKind::ActivityCreated, &[]), None)
                .await
                .unwrap();
        assert_eq!(r.crm_id.as_deref(), Some(crm.as_str()));
    }
    assert_eq!(w.si.stats().creates, 0);
    assert_eq!(w.si.emails().len(), 1);
    let a = w.store.activity(id).unwrap().unwrap();
    let e = w.email(&crm);
    assert_eq!(e["statecode"], 1);
    assert_eq!(e["statuscode"], 6);
    assert_eq!(e["directioncode"], true);
    assert_eq!(e["subject"], json!(a.subject));
    assert_eq!(e["messageid"], json!(format!("<{}>", a.message_ids[0])));
    assert_eq!(
        e["trackingtoken"],
        json!(a.send.as_ref().unwrap().token.clone().unwrap())
    );
    assert_eq!(
        e["description"], "<p>Quote, written in Dynamics</p>",
        "the body the user wrote stays"
    );
    // Now ours by messageid: the next poll does not queue it again either way.
    assert_eq!(w.poll(None).await.queued, 0);

    // Every status: the same email, statecode/statuscode per the table;
    // with and without the stored crm id, twice each (at least once).
    for (status, state, code) in [
        (SendStatus::Sending, 1, 7),
        (SendStatus::Failed, 0, 8),
        (SendStatus::PendingSend, 1, 6),
        (SendStatus::Sent, 1, 3),
        (SendStatus::Canceled, 2, 5),
    ] {
        let mut ev = w.event(id, EventKind::ActivityUpdated, &["send_status"]);
        if let Some(s) = ev.activity.send.as_mut() {
            s.set(status, None, NOW);
        }
        for crm_id in [Some(crm.as_str()), None] {
            let r = w.dv.deliver(&ev, crm_id).await.unwrap();
            assert_eq!(r.crm_id.as_deref(), Some(crm.as_str()));
            let e = w.email(&crm);
            assert_eq!(
                (e["statecode"].clone(), e["statuscode"].clone()),
                (json!(state), json!(code)),
                "{status:?}"
            );
        }
    }
    assert_eq!(w.si.stats().creates, 0);
    assert_eq!(w.si.emails().len(), 1);
}

#[tokio::test]
async fn a_deleted_crm_email_is_created_once_instead() {
    let w = world().await;
    let crm = w.pending("Quote", "support@example.test", true);
    w.poll(None).await;
    let id = w.queued_id(&crm);
    w.si.delete_email(&crm);
    let ev = w.event(id, EventKind::ActivityCreated, &[]);
    let first = w.dv.deliver(&ev, None).await.unwrap();
    let again = w.dv.deliver(&ev, None).await.unwrap();
    assert_eq!(first, again);
    assert_ne!(first.crm_id.as_deref(), Some(crm.as_str()));
    assert_eq!(w.si.stats().creates, 1);
}

#[tokio::test]
async fn an_email_queued_by_the_api_is_created_with_its_status_and_not_polled() {
    let w = world().await;
    let q = crate::outgoing::queue::queue(
        w.store.as_ref(),
        &w.cfg,
        &OutgoingRequest {
            mailbox: "support".into(),
            regarding: Some(format!("case:{}", w.incident)),
            to: vec!["carol@customer.example".into()],
            subject: "From the API".into(),
            text: Some("Hello".into()),
            ..OutgoingRequest::default()
        },
        NOW,
    )
    .unwrap();
    let r =
        w.dv.deliver(&w.event(q.id, EventKind::ActivityCreated, &[]), None)
            .await
            .unwrap();
    let crm = r.crm_id.unwrap();
    assert_eq!(w.si.stats().creates, 1);
    let e = w.email(&crm);
    assert_eq!(
        (e["statecode"].clone(), e["statuscode"].clone()),
        (json!(1), json!(6))
    );
    assert_eq!(e["directioncode"], true);
    assert_eq!(e["trackingtoken"], json!(q.token.clone().unwrap()));

    // The email we created sits in Pending Send with our messageid: it is
    // never queued a second time.
    let r = w.poll(None).await;
    assert_eq!(
        r,
        PollReport {
            skipped: 1,
            ..PollReport::default()
        }
    );

    let mut ev = w.event(q.id, EventKind::ActivityUpdated, &["send_status"]);
    if let Some(s) = ev.activity.send.as_mut() {
        s.set(SendStatus::Sent, None, NOW);
    }
    w.dv.deliver(&ev, Some(&crm)).await.unwrap();
    let e = w.email(&crm);
    assert_eq!(
        (e["statecode"].clone(), e["statuscode"].clone()),
        (json!(1), json!(3))
    );
    assert_eq!(w.si.stats().creates, 1);
}

#[tokio::test]
async fn files_attached_in_the_crm_go_out_with_the_email_and_blocked_ones_refuse_it() {
    let w = world().await;
    let quote = w.pending("Your quote", "support@example.test", true);
    // "%PDF-1.7 quote" in base64, as Dataverse stores the body.
    w.si.seed_attachment(
        &quote,
        "quote.pdf",
        "application/pdf",
        "JVBERi0xLjcgcXVvdGU=",
    );
    let risky = w.pending("Run this", "support@example.test", true);
    w.si.seed_attachment(&risky, "setup.exe", "application/octet-stream", "TVo=");
    let r = w.poll(None).await;
    assert_eq!((r.queued, r.refused), (1, 1), "{r:?}");
    let row = w.store.outgoing(w.queued_id(&quote)).unwrap().unwrap();
    assert!(row.mime.contains("multipart/mixed"), "{}", row.mime);
    assert!(row.mime.contains("quote.pdf"), "{}", row.mime);
    use mail_parser::MimeHeaders;
    let parsed = mail_parser::MessageParser::default()
        .parse(row.mime.as_bytes())
        .unwrap();
    let file = parsed.attachment(0).expect("one attachment");
    assert_eq!(file.attachment_name(), Some("quote.pdf"));
    assert_eq!(
        file.contents(),
        b"%PDF-1.7 quote",
        "the bytes travel as stored"
    );
    // The blocked extension refuses the whole email, marked Failed in the CRM.
    let e = w.email(&risky);
    assert_eq!(e["statuscode"], json!(8));
}
