//! What the event log and the outbox cost on the commit path.
//!
//! Each iteration commits one batch as the pipeline makes it: 50 new
//! tracked activities (three parties each, a regarding record, reasons),
//! with their correlation index entries (Message-ID, tracking token,
//! Thread-Index root, smart-matching buckets and body fingerprint
//! shingles), a folder position and the mailbox state, into a sled store
//! in a temp dir (apply + flush, as the daemon does). `with_outbox` writes
//! the event log and one consumer's pending deliveries in the same batch,
//! as the daemon does; `without_outbox` is the same commit with them
//! switched off (a bench-only switch). Their ratio is the outbox's
//! overhead. Batches are built outside the timed part.
//!
//! Run: `cargo bench --bench store -- --warm-up-time 1 --measurement-time 5`.

use std::cell::Cell;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use crm_mailsync::correlate::{index_entry, CorrelationSettings, MessageFeatures};
use crm_mailsync::model::{
    CorrelationMethod, Direction, EmailActivity, FolderPosition, MailboxState, Party, PartyRole,
    SourceKey,
};
use crm_mailsync::store::{CommitBatch, PendingItem, SledStore, Store};

const BATCH: usize = 50;
const BASE_TIME: i64 = 1_767_000_000;

const WORDS: &[&str] = &[
    "pallets",
    "warehouse",
    "customs",
    "invoice",
    "delivery",
    "contract",
    "quote",
    "shipment",
    "schedule",
    "meeting",
    "Rotterdam",
    "Friday",
    "papers",
    "signature",
    "order",
    "payment",
    "review",
    "update",
    "renewal",
    "support",
    "ticket",
    "account",
    "pricing",
    "discount",
];

fn text(n: u64, words: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(n);
    (0..words)
        .map(|_| WORDS[rng.usize(..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Batch `n` of 50 new activities with their index entries.
fn make_batch(store: &SledStore, n: u64, settings: &CorrelationSettings) -> CommitBatch {
    let mut b = CommitBatch::default();
    for i in 0..BATCH as u64 {
        let k = n * BATCH as u64 + i;
        let id = store.allocate_id().unwrap();
        let subject = format!("RE: {} CRM:{:07}", text(k, 6), k % 9_000_000);
        let mut f = MessageFeatures {
            subject: subject.clone(),
            from: vec![format!("customer{}@customer.example", k % 500)],
            to: vec!["sales@example.com".into()],
            sent_at: Some(BASE_TIME + k as i64),
            thread_index: Some(crm_mailsync::correlate::thread_index::encode_root(
                1 << 40 | k,
                [(k % 251) as u8; 16],
            )),
            ..Default::default()
        };
        f.add_body_features(&text(k + 1_000_000, 120));
        b.index.push(index_entry(&f, id, settings));
        let party = |role, address: String| Party {
            role,
            address,
            record: Some(format!("contact:{}", k % 500).parse().unwrap()),
            note: None,
        };
        b.items.push(PendingItem::Activity(Box::new(EmailActivity {
            id,
            mailbox: "sales".into(),
            source: SourceKey {
                mailbox: "sales".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: k.to_string(),
            },
            message_ids: vec![format!("{k}.bench@customer.example")],
            in_reply_to: vec![format!("{}.parent@example.com", k / 2)],
            references: vec![format!("{}.parent@example.com", k / 2)],
            direction: Direction::Incoming,
            subject,
            from: f.from.clone(),
            to: f.to.clone(),
            cc: vec![],
            sent_at: f.sent_at,
            received_at: BASE_TIME + k as i64 + 5,
            regarding: Some(format!("case:{}", k % 1_000).parse().unwrap()),
            method: CorrelationMethod::InReplyTo,
            score: 1.0,
            reasons: vec![
                format!("In-Reply-To <{}.parent@example.com> is tracked", k / 2),
                "regarding inherited from the parent".into(),
            ],
            correlated_with: Some(k / 2 + 1),
            content_hash: format!("{k:064x}"),
            size: 3_000,
            also_seen_as: vec![],
            forwarded_by: None,
            automatic: None,
            no_reply: false,
            send: None,
            parties: vec![
                party(PartyRole::From, f.from[0].clone()),
                party(PartyRole::To, "sales@example.com".into()),
                party(
                    PartyRole::Cc,
                    format!("colleague{}@customer.example", k % 50),
                ),
            ],
        })));
    }
    b.positions.push((
        "sales".into(),
        "INBOX".into(),
        FolderPosition {
            uidvalidity: 1,
            next_uid: (n + 1) * BATCH as u64,
            highest_modseq: None,
            seen_count: (n + 1) * BATCH as u64,
            retry: Vec::new(),
            delta_link: None,
        },
    ));
    b.mailbox_state = Some(MailboxState {
        name: "sales".into(),
        ..Default::default()
    });
    b
}

fn bench(c: &mut Criterion) {
    let settings = CorrelationSettings {
        smart_matching: true,
        ..Default::default()
    };
    let mut g = c.benchmark_group("commit_50_new_activities");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, outbox) in [("with_outbox", true), ("without_outbox", false)] {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        store.set_event_log_for_bench(outbox);
        if outbox {
            store.set_outbox_consumers(vec!["crm".into()]);
        }
        let next = Cell::new(0u64);
        g.bench_function(name, |bench| {
            bench.iter_batched(
                || {
                    let n = next.get();
                    next.set(n + 1);
                    make_batch(&store, n, &settings)
                },
                |b| store.commit(b).unwrap(),
                BatchSize::PerIteration,
            )
        });
        let events = store.last_event_seq().unwrap();
        assert_eq!(events > 0, outbox, "{name}: {events} events");
        if outbox {
            let pending = store.outbox_stats("crm").unwrap().depth;
            assert_eq!(pending, events);
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
