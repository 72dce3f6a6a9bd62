//! The Dataverse adapter against the local Dataverse stand-in
//! (`tests/support/dataverse_standin.rs`, the documented Web API wire format):
//! record pulls over pages and deltas, the token life cycle, error
//! classification, and the done-when: 2,000 activities delivered through the
//! store's outbox arrive as exactly 2,000 `emails` with the right regarding
//! and parties, through throttling, an outage, lost responses, repeated
//! deliveries and a token expiry mid-run.

#[path = "support/dataverse_standin.rs"]
mod dataverse_standin;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crm_mailsync::config::{DataverseSettings, Secret};
use crm_mailsync::crm::dataverse::{synthetic_message_id, DataverseAdapter};
use crm_mailsync::crm::{CrmAdapter, CrmError};
use crm_mailsync::model::{
    CorrelationMethod, DeliveryState, Direction, EmailActivity, EventKind, Party, PartyRole,
    Record, RecordRef, SourceKey,
};
use crm_mailsync::store::{CommitBatch, DeliveryOutcome, PendingItem, SledStore, Store};
use dataverse_standin::{guid, StandIn};
use serde_json::json;

const CLIENT: &str = "11111111-aaaa-bbbb-cccc-000000000001";
const SECRET: &str = "standin-secret~value";

fn settings(si: &StandIn, secret: &str) -> DataverseSettings {
    DataverseSettings {
        url: si.url.clone(),
        token_url: si.token_url.clone(),
        client_id: CLIENT.into(),
        client_secret: Secret::new(secret),
        scope: format!("{}/.default", si.url),
        allow_insecure: false,
        ca_file: None,
        timeout: Duration::from_secs(10),
        page_size: 500,
    }
}

async fn standin() -> StandIn {
    let si = StandIn::start().await;
    si.add_client(CLIENT, SECRET);
    si
}

/// A past `modifiedon`, distinct per `n`.
fn past(n: u64) -> String {
    let t = chrono::DateTime::from_timestamp(1_750_000_000 + n as i64 * 7, 0).unwrap();
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Pulls until the adapter says no more pages; returns the records and the
/// final cursor.
async fn pull_all(dv: &DataverseAdapter, cursor: Option<String>) -> (Vec<Record>, String, u32) {
    let mut cursor = cursor;
    let mut out = Vec::new();
    let mut pages = 0;
    loop {
        let page = dv.pull_records(cursor.as_deref()).await.unwrap();
        pages += 1;
        assert!(page.deleted.is_empty());
        out.extend(page.records);
        cursor = page.cursor;
        if !page.more {
            break;
        }
        assert!(pages < 1000, "paging does not end");
    }
    (out, cursor.unwrap(), pages)
}

fn seed_directory(si: &StandIn, contacts: u64) {
    si.seed(
        "contacts",
        (0..contacts)
            .map(|i| {
                json!({
                    "contactid": guid(0xc0, i),
                    "fullname": format!("Contact {i}"),
                    "emailaddress1": format!("contact{i}@customers.test"),
                    "emailaddress2": if i % 10 == 0 { json!(format!("c{i}.alt@customers.test")) } else { json!(null) },
                    "_ownerid_value": guid(0x05e7, i % 10),
                    "donotemail": i % 97 == 0,
                    "modifiedon": past(i),
                })
            })
            .collect(),
    );
    si.seed(
        "accounts",
        (0..40)
            .map(|i| json!({"accountid": guid(0xac, i), "name": format!("Account {i}"), "emailaddress1": format!("info@account{i}.test"), "_ownerid_value": guid(0x05e7, 1), "donotemail": false, "modifiedon": past(i)}))
            .collect(),
    );
    si.seed(
        "leads",
        (0..30)
            .map(|i| json!({"leadid": guid(0x1e, i), "fullname": format!("Lead {i}"), "emailaddress1": format!("lead{i}@prospects.test"), "_ownerid_value": guid(0x05e7, 2), "donotemail": false, "modifiedon": past(i)}))
            .collect(),
    );
    si.seed(
        "systemusers",
        (0..10)
            .map(|i| json!({"systemuserid": guid(0x05e7, i), "fullname": format!("User {i}"), "internalemailaddress": format!("user{i}@ourco.test"), "isdisabled": i == 9, "modifiedon": past(i)}))
            .collect(),
    );
    si.seed(
        "queues",
        (0..3)
            .map(|i| json!({"queueid": guid(0x90, i), "name": format!("Queue {i}"), "emailaddress": format!("queue{i}@ourco.test"), "_ownerid_value": guid(0x05e7, 0), "modifiedon": past(i)}))
            .collect(),
    );
}

#[tokio::test]
async fn records_are_pulled_over_pages_and_deltas_bring_only_changes() {
    let si = standin().await;
    seed_directory(&si, 5_200);
    let dv = DataverseAdapter::new(&settings(&si, SECRET)).unwrap();

    let (records, cursor, pages) = pull_all(&dv, None).await;
    let count = |k: &str| records.iter().filter(|r| r.kind == k).count();
    assert_eq!(count("contact"), 5_200);
    assert_eq!(count("account"), 40);
    assert_eq!(count("lead"), 30);
    assert_eq!(
        count("user"),
        11,
        "ten seeded users and the application user"
    );
    assert_eq!(count("queue"), 3);
    // 5,200 contacts at 500 a page are 11 pages, plus one page per other table.
    assert_eq!(pages, 11 + 4);
    let contact_gets = si.stats().by_route[&("GET".to_string(), "contacts".to_string())];
    assert_eq!(contact_gets, 11, "followed @odata.nextLink page by page");
    assert_eq!(si.stats().missing_odata_headers, 0);

    let c10 = records.iter().find(|r| r.id == guid(0xc0, 10)).unwrap();
    assert_eq!(c10.name, "Contact 10");
    assert_eq!(
        c10.emails,
        ["contact10@customers.test", "c10.alt@customers.test"]
    );
    assert_eq!(c10.owner.as_deref(), Some(guid(0x05e7, 0).as_str()));
    assert!(c10.email_enabled);
    let c97 = records.iter().find(|r| r.id == guid(0xc0, 97)).unwrap();
    assert!(!c97.email_enabled, "donotemail = true");
    let u9 = records.iter().find(|r| r.id == guid(0x05e7, 9)).unwrap();
    assert!(!u9.email_enabled, "a disabled user is not email-enabled");
    assert_eq!(u9.emails, ["user9@ourco.test"]);
    assert_eq!(u9.user_number, None, "Dataverse has no user-number column");
    let q = records.iter().find(|r| r.kind == "queue").unwrap();
    assert_eq!(q.emails.len(), 1);
    let ids: HashSet<(&str, &str)> = records
        .iter()
        .map(|r| (r.kind.as_str(), r.id.as_str()))
        .collect();
    assert_eq!(ids.len(), records.len(), "no record twice in one full pull");

    // Changes in Dynamics: three contacts, one account edited; two leads new.
    si.modify(
        "contacts",
        &guid(0xc0, 5),
        json!({"emailaddress1": "new5@customers.test"}),
    );
    si.modify(
        "contacts",
        &guid(0xc0, 4000),
        json!({"fullname": "Renamed"}),
    );
    si.modify("contacts", &guid(0xc0, 5100), json!({"donotemail": true}));
    si.modify("accounts", &guid(0xac, 3), json!({"name": "Account Three"}));
    si.seed(
        "leads",
        vec![
            json!({"leadid": guid(0x1e, 100), "fullname": "New Lead", "emailaddress1": "newlead@prospects.test"}),
            json!({"leadid": guid(0x1e, 101), "fullname": "Newer Lead", "emailaddress1": "newerlead@prospects.test"}),
        ],
    );
    let (delta, cursor2, _) = pull_all(&dv, Some(cursor)).await;
    let changed: HashSet<String> = [
        guid(0xc0, 5),
        guid(0xc0, 4000),
        guid(0xc0, 5100),
        guid(0xac, 3),
        guid(0x1e, 100),
        guid(0x1e, 101),
    ]
    .into_iter()
    .collect();
    let got: HashSet<String> = delta.iter().map(|r| r.id.clone()).collect();
    assert!(changed.is_subset(&got), "every change is in the delta");
    // Besides the changes only the rows of each table's high-water second
    // come again (`ge`, see records.rs): at most one per table here.
    let extra: Vec<&Record> = delta.iter().filter(|r| !changed.contains(&r.id)).collect();
    assert!(
        extra.len() <= 5,
        "delta re-read {} unchanged rows: {extra:?}",
        extra.len()
    );
    assert!(delta.len() < 20);
    let c5 = delta.iter().find(|r| r.id == guid(0xc0, 5)).unwrap();
    assert_eq!(c5.emails[0], "new5@customers.test");

    // Nothing changed: the next delta is only the high-water rows again.
    let (again, _, _) = pull_all(&dv, Some(cursor2)).await;
    assert!(again.iter().all(|r| !changed.contains(&r.id)
        || r.kind == "lead"
        || r.kind == "contact"
        || r.kind == "account"));
    assert!(again.len() <= 5 + changed.len(), "{}", again.len());
}

#[tokio::test]
async fn token_is_renewed_before_it_expires() {
    let si = standin().await;
    si.set_token_lifetime(Duration::from_secs(3));
    let dv = DataverseAdapter::new(&settings(&si, SECRET)).unwrap();
    assert_eq!(dv.token_expires_at(), None);
    let line = dv.test().await.unwrap();
    assert!(line.contains("as user # crm-mailsync"), "{line}");
    assert!(line.contains(&si.app_user_id()), "{line}");
    let exp = dv.token_expires_at().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now + 2..=now + 4).contains(&exp),
        "expiry {exp} vs now {now}"
    );
    // Past lifetime minus the margin (1 s of a 3 s token) but before expiry:
    // the adapter renews without ever sending the old token.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    dv.test().await.unwrap();
    let st = si.stats();
    assert_eq!(st.tokens_issued, 2);
    assert_eq!(st.unauthorized, 0, "no request went out with a stale token");
}

#[tokio::test]
async fn an_expired_token_is_renewed_once_and_the_request_repeated() {
    let si = standin().await;
    let dv = DataverseAdapter::new(&settings(&si, SECRET)).unwrap();
    dv.test().await.unwrap();
    si.expire_tokens();
    dv.test().await.unwrap();
    let st = si.stats();
    assert_eq!(st.unauthorized, 1);
    assert_eq!(st.tokens_issued, 2);
}

#[tokio::test]
async fn a_rejected_secret_pauses_delivery_and_names_the_aadsts_error() {
    let si = standin().await;
    let dv = DataverseAdapter::new(&settings(&si, "not-the-secret")).unwrap();
    let err = dv.test().await.unwrap_err();
    // Every request would fail alike: an endpoint failure (the worker pauses
    // and alerts), not a refused event (dead-lettered).
    assert!(matches!(err, CrmError::Endpoint { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("client secret was rejected"), "{msg}");
    assert!(msg.contains("AADSTS7000215"), "{msg}");
    assert!(
        !msg.contains("not-the-secret"),
        "the secret never appears: {msg}"
    );
    assert!(!format!("{dv:?}").contains(SECRET) && !format!("{dv:?}").contains("not-the-secret"));
    let err = dv.pull_records(None).await.unwrap_err();
    assert!(matches!(err, CrmError::Endpoint { .. }));
}

/// An activity as the pipeline would have stored it.
fn activity(i: u64, regarding: Option<RecordRef>, parties: Vec<Party>) -> EmailActivity {
    EmailActivity {
        id: 0,
        mailbox: "support".into(),
        source: SourceKey {
            mailbox: "support".into(),
            folder: "INBOX".into(),
            uidvalidity: 7,
            uid: (i + 1).to_string(),
        },
        // Every 50th message came without a Message-ID.
        message_ids: if i % 50 == 49 {
            vec![]
        } else {
            vec![format!("msg{i}.o'neil@mail.customers.test")]
        },
        in_reply_to: vec![],
        references: vec![],
        direction: Direction::Incoming,
        subject: format!("Question {i} about the pump"),
        from: parties
            .iter()
            .filter(|p| p.role == PartyRole::From)
            .map(|p| p.address.clone())
            .collect(),
        to: parties
            .iter()
            .filter(|p| p.role == PartyRole::To)
            .map(|p| p.address.clone())
            .collect(),
        cc: parties
            .iter()
            .filter(|p| p.role == PartyRole::Cc)
            .map(|p| p.address.clone())
            .collect(),
        sent_at: Some(1_760_000_000 + i as i64 * 60),
        received_at: 1_760_000_030 + i as i64 * 60,
        method: if regarding.is_some() {
            CorrelationMethod::TrackingToken
        } else {
            CorrelationMethod::None
        },
        regarding,
        score: 1.0,
        reasons: vec![format!("token CRM:000{i}")],
        correlated_with: None,
        content_hash: format!("{:064x}", i * 7919 + 13),
        size: 1000,
        also_seen_as: vec![],
        forwarded_by: None,
        automatic: None,
        no_reply: false,
        parties,
        send: None,
    }
}

fn party(role: PartyRole, address: String, record: Option<String>) -> Party {
    Party {
        role,
        address,
        record: record.map(|r| r.parse().unwrap()),
        note: None,
    }
}

/// The parties of message `i`: a sender that resolves to a contact,
/// account, lead or user in turn (every 7th unresolved), a user or queue as
/// recipient, an unknown cc and sometimes a bcc.
fn parties_for(i: u64) -> Vec<Party> {
    let from = match i % 7 {
        0 => party(PartyRole::From, format!("stranger{i}@nowhere.test"), None),
        1..=3 => party(
            PartyRole::From,
            format!("contact{}@customers.test", i % 200),
            Some(format!("contact:{}", guid(0xc0, i % 200))),
        ),
        4 => party(
            PartyRole::From,
            format!("info@account{}.test", i % 40),
            Some(format!("account:{}", guid(0xac, i % 40))),
        ),
        5 => party(
            PartyRole::From,
            format!("lead{}@prospects.test", i % 30),
            Some(format!("lead:{}", guid(0x1e, i % 30))),
        ),
        _ => party(
            PartyRole::From,
            format!("user{}@ourco.test", i % 9),
            Some(format!("user:{}", guid(0x05e7, i % 9))),
        ),
    };
    let to = if i.is_multiple_of(2) {
        party(
            PartyRole::To,
            format!("queue{}@ourco.test", i % 3),
            Some(format!("queue:{}", guid(0x90, i % 3))),
        )
    } else {
        party(
            PartyRole::To,
            format!("user{}@ourco.test", i % 9),
            Some(format!("user:{}", guid(0x05e7, i % 9))),
        )
    };
    let mut out = vec![
        from,
        to,
        party(PartyRole::Cc, format!("cc{i}@elsewhere.test"), None),
    ];
    if i.is_multiple_of(5) {
        out.push(party(
            PartyRole::Bcc,
            format!("contact{}@customers.test", (i + 1) % 200),
            Some(format!("contact:{}", guid(0xc0, (i + 1) % 200))),
        ));
    }
    out
}

fn regarding_for(i: u64) -> Option<RecordRef> {
    match i % 3 {
        0 => Some(format!("case:{}", guid(0x1c, i % 100)).parse().unwrap()),
        1 => Some(
            format!("opportunity:{}", guid(0x0b, i % 50))
                .parse()
                .unwrap(),
        ),
        _ => None,
    }
}

fn expected_party(p: &Party) -> (i64, Option<(String, String)>, Option<String>) {
    let bound = p.record.as_ref().map(|r| {
        let set = match r.kind() {
            "user" => "systemusers",
            "contact" => "contacts",
            "account" => "accounts",
            "lead" => "leads",
            "queue" => "queues",
            k => panic!("unexpected party kind {k}"),
        };
        (set.to_string(), r.id().to_string())
    });
    (
        p.role.participation_type_mask() as i64,
        bound,
        Some(p.address.clone()),
    )
}

/// The done-when of issue #18 for Dataverse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_activities_become_exactly_two_thousand_emails() {
    const N: u64 = 2_000;
    let si = standin().await;
    seed_directory(&si, 200);
    si.seed(
        "incidents",
        (0..100)
            .map(|i| json!({"incidentid": guid(0x1c, i), "title": format!("Case {i}")}))
            .collect(),
    );
    si.seed(
        "opportunities",
        (0..50)
            .map(|i| json!({"opportunityid": guid(0x0b, i), "name": format!("Deal {i}")}))
            .collect(),
    );
    // Tokens live 6 s: the run (about 20 s) outlasts several, so they are
    // renewed before expiry as well as after the two forced expiries below.
    si.set_token_lifetime(Duration::from_secs(6));

    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store")).unwrap();
    store.set_outbox_consumers(vec!["dataverse".into()]);
    for chunk in (0..N).collect::<Vec<_>>().chunks(200) {
        let batch = CommitBatch {
            items: chunk
                .iter()
                .map(|&i| {
                    PendingItem::Activity(Box::new(activity(i, regarding_for(i), parties_for(i))))
                })
                .collect(),
            ..Default::default()
        };
        store.commit(batch).unwrap();
    }
    assert_eq!(store.count_activities(None).unwrap(), N);
    // Later changes, as the daemon makes them: 150 re-pointed to another
    // case, 100 with a party resolved after a new record arrived.
    let all: Vec<EmailActivity> = {
        let mut v = Vec::new();
        let mut before = None;
        loop {
            let page = store
                .activities(&crm_mailsync::store::ActivityQuery {
                    mailbox: None,
                    before,
                    limit: 500,
                })
                .unwrap();
            if page.is_empty() {
                break;
            }
            before = page.last().map(|a| a.id);
            v.extend(page);
        }
        v
    };
    assert_eq!(all.len() as u64, N);
    for a in all.iter().filter(|a| a.id % 13 == 0).take(150) {
        let mut b = a.clone();
        b.regarding = Some(
            format!("case:{}", guid(0x1c, 99 - a.id % 100))
                .parse()
                .unwrap(),
        );
        store
            .update_activity(b, vec!["regarding".into()], 0)
            .unwrap();
    }
    let mut resolved_later = 0;
    for a in all.iter().filter(|a| a.id % 17 == 0) {
        let Some(a) = store.activity(a.id).unwrap() else {
            continue;
        };
        let mut b = a.clone();
        let Some(cc) = b.parties.iter_mut().find(|p| p.role == PartyRole::Cc) else {
            continue;
        };
        cc.record = Some(format!("contact:{}", guid(0xc0, 199)).parse().unwrap());
        store.update_activity(b, vec!["parties".into()], 0).unwrap();
        resolved_later += 1;
        if resolved_later == 100 {
            break;
        }
    }
    let events = store.last_event_seq().unwrap();
    assert_eq!(events, N + 150 + 100);

    let dv = DataverseAdapter::new(&settings(&si, SECRET)).unwrap();
    // Throttling: every 600th request, 1 s; plus bursts injected below.
    si.throttle_every(Some(600), 1);

    let started = Instant::now();
    let mut delivered = 0u64;
    let mut transient = 0u64;
    let mut repeated = 0u64;
    let mut waited = Duration::ZERO;
    let mut fired = HashSet::new();
    'outer: loop {
        let pending = store.pending_deliveries("dataverse", 200).unwrap();
        if pending.is_empty() {
            break;
        }
        for st in pending {
            // Faults at fixed points of the run, each once.
            if !fired.insert(delivered) {
                // already armed at this count
            } else {
                match delivered {
                    300 => si.throttle_next(3, 1),
                    700 => si.expire_tokens(),
                    1_000 => si.unavailable_next(2),
                    1_300 => si.lose_next_creates(3),
                    1_600 => si.expire_tokens(),
                    _ => {}
                }
            }
            let ev = store.event(st.seq).unwrap().unwrap();
            let crm_id = store.crm_id("dataverse", ev.activity_id).unwrap();
            match dv.deliver(&ev, crm_id.as_deref()).await {
                Ok(receipt) => {
                    // A lost "delivered" (crash before finish_delivery):
                    // every 97th event is delivered again, as the worker
                    // would after a restart.
                    if st.seq % 97 == 0 {
                        let again = dv.deliver(&ev, crm_id.as_deref()).await.unwrap();
                        assert_eq!(
                            again.crm_id, receipt.crm_id,
                            "a repeated delivery finds the same email"
                        );
                        repeated += 1;
                    }
                    assert!(receipt.crm_id.is_some());
                    store
                        .finish_delivery(
                            "dataverse",
                            DeliveryOutcome::Delivered {
                                seq: st.seq,
                                activity_id: st.activity_id,
                                crm_id: receipt.crm_id,
                            },
                        )
                        .unwrap();
                    delivered += 1;
                }
                Err(e @ CrmError::Transient { .. }) => {
                    transient += 1;
                    assert!(transient < 200, "too many transient failures: {e}");
                    let wait = e.retry_after().unwrap_or(Duration::from_millis(50));
                    store
                        .finish_delivery(
                            "dataverse",
                            DeliveryOutcome::Retry(DeliveryState {
                                attempts: st.attempts + 1,
                                last_error: Some(e.to_string()),
                                ..st.clone()
                            }),
                        )
                        .unwrap();
                    tokio::time::sleep(wait).await;
                    waited += wait;
                    // Start again from the oldest pending event: order per
                    // activity is kept.
                    continue 'outer;
                }
                Err(e) => panic!("permanent failure for event {}: {e}", st.seq),
            }
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "delivered {delivered} events in {elapsed:?} ({transient} transient failures, {waited:?} of Retry-After waits, {repeated} repeated deliveries)"
    );
    assert_eq!(delivered, events);
    assert_eq!(store.outbox_stats("dataverse").unwrap().depth, 0);

    // The stand-in holds exactly one email per activity.
    let emails = si.emails();
    assert_eq!(emails.len() as u64, N, "exactly 2,000 emails");
    let by_mid: HashMap<String, &dataverse_standin::StoredEmail> = emails
        .iter()
        .map(|e| (e.fields["messageid"].as_str().unwrap().to_string(), e))
        .collect();
    assert_eq!(by_mid.len(), emails.len(), "no messageid twice");

    for a in (1..=N).filter_map(|id| store.activity(id).unwrap()) {
        let mid = match a.message_ids.first() {
            Some(m) => format!("<{m}>"),
            None => synthetic_message_id(&a),
        };
        let e = by_mid
            .get(&mid)
            .unwrap_or_else(|| panic!("activity {} ({mid}) is missing", a.id));
        assert_eq!(
            store.crm_id("dataverse", a.id).unwrap().as_deref(),
            Some(e.id.as_str())
        );
        assert_eq!(e.fields["subject"], a.subject.as_str());
        assert_eq!(e.fields["directioncode"], false);
        assert_eq!(e.fields["statuscode"], 4);
        let want_regarding = a.regarding.as_ref().map(|r| {
            let set = if r.kind() == "case" {
                "incidents"
            } else {
                "opportunities"
            };
            (set.to_string(), r.id().to_string())
        });
        assert_eq!(
            e.regarding, want_regarding,
            "regarding of activity {}",
            a.id
        );
        let got: Vec<_> = e
            .parties
            .iter()
            .map(|p| (p.mask, p.party.clone(), p.addressused.clone()))
            .collect();
        let want: Vec<_> = a.parties.iter().map(expected_party).collect();
        assert_eq!(got, want, "parties of activity {}", a.id);
    }

    let st = si.stats();
    eprintln!("stand-in: {st:?}");
    assert!(st.throttled >= 4, "429s were injected: {}", st.throttled);
    assert_eq!(st.early_retries, 0, "Retry-After was honoured every time");
    assert!(
        st.unauthorized >= 2,
        "the forced expiries were hit: {}",
        st.unauthorized
    );
    assert!(
        st.tokens_issued >= 3,
        "tokens were renewed: {}",
        st.tokens_issued
    );
    assert_eq!(st.unavailable, 2);
    assert_eq!(st.lost_responses, 3);
    assert_eq!(
        st.creates, N,
        "no create was repeated, not even after a lost response"
    );
    assert_eq!(st.missing_odata_headers, 0);
    assert_eq!(
        st.ignored_read_only, 0,
        "the adapter sends no read-only column"
    );
}

#[tokio::test]
async fn failures_are_classified_and_end_in_the_crm_text() {
    let si = standin().await;
    seed_directory(&si, 10);
    let mut s = settings(&si, SECRET);
    s.timeout = Duration::from_secs(1);
    let dv = DataverseAdapter::new(&s).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store")).unwrap();
    store.set_outbox_consumers(vec!["dataverse".into()]);
    // Regarding a case Dataverse does not have.
    let a = activity(
        1,
        Some(format!("case:{}", guid(0x1c, 5)).parse().unwrap()),
        parties_for(1),
    );
    store
        .commit(CommitBatch {
            items: vec![PendingItem::Activity(Box::new(a))],
            ..Default::default()
        })
        .unwrap();
    let ev = store.event(1).unwrap().unwrap();
    assert_eq!(ev.kind, EventKind::ActivityCreated);

    let err = dv.deliver(&ev, None).await.unwrap_err();
    assert!(matches!(err, CrmError::Permanent { .. }), "{err:?}");
    assert!(
        err.to_string().ends_with(&format!(
            "0x80040217: incident With Id = {} Does Not Exist",
            guid(0x1c, 5)
        )),
        "{err}"
    );

    si.seed(
        "incidents",
        vec![json!({"incidentid": guid(0x1c, 5), "title": "Now it exists"})],
    );
    si.throttle_next(1, 4);
    let err = dv.deliver(&ev, None).await.unwrap_err();
    assert!(matches!(err, CrmError::Transient { .. }));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(4)));
    assert!(err.to_string().contains("0x80072322"), "{err}");

    // Wait out the Retry-After, then a 503 and a slow answer: transient.
    tokio::time::sleep(Duration::from_secs(4)).await;
    si.unavailable_next(1);
    let err = dv.deliver(&ev, None).await.unwrap_err();
    assert!(matches!(err, CrmError::Transient { .. }), "{err:?}");
    si.set_delay(Duration::from_millis(1_500));
    let err = dv.deliver(&ev, None).await.unwrap_err();
    assert!(matches!(err, CrmError::Transient { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
    si.set_delay(Duration::ZERO);

    let ok = dv.deliver(&ev, None).await.unwrap();
    assert!(ok.crm_id.is_some());
    assert_eq!(si.emails().len(), 1);
    // Re-pointing updates the same email.
    let mut b = store.activity(ev.activity_id).unwrap().unwrap();
    b.regarding = Some(format!("opportunity:{}", guid(0x0b, 1)).parse().unwrap());
    si.seed(
        "opportunities",
        vec![json!({"opportunityid": guid(0x0b, 1), "name": "Deal"})],
    );
    let seq = store
        .update_activity(b, vec!["regarding".into()], 0)
        .unwrap()
        .unwrap();
    let up = store.event(seq).unwrap().unwrap();
    let r = dv.deliver(&up, ok.crm_id.as_deref()).await.unwrap();
    assert_eq!(r.crm_id, ok.crm_id);
    let e = &si.emails()[0];
    assert_eq!(e.regarding, Some(("opportunities".into(), guid(0x0b, 1))));
}
