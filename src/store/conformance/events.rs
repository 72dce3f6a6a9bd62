//! The event log and the outbox: one event per created or changed
//! activity in the same batch, seqs 1..N in commit order, a pending
//! delivery per consumer, delivery outcomes, `update_activity`, watchers.

use std::collections::HashSet;
use std::sync::Arc;

use super::{activity, batch, inserted, store, Fixture};
use crate::model::{
    CorrelationMethod, DeadLetter, DeliveryState, EventKind, OutboxEvent, Party, PartyRole,
};
use crate::store::{CommitBatch, CommitOutcome, DeliveryOutcome, OutboxStats, Store};

fn kinds(events: &[OutboxEvent]) -> Vec<(u64, EventKind, u64, Vec<String>)> {
    events
        .iter()
        .map(|e| (e.seq, e.kind, e.activity_id, e.changes.clone()))
        .collect()
}

fn assert_gapless(events: &[OutboxEvent]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seqs 1..N without gaps");
        assert_eq!(e.id, OutboxEvent::id_for(e.seq));
    }
}

/// Each new activity gets one `activity.created`, numbered in commit
/// order from 1 and carrying the activity as committed; a replay
/// (AlreadySeen) and a commit without activities append nothing.
pub fn one_created_event_per_new_activity_in_commit_order<F: Fixture>(f: &F) {
    let s = store(f);
    assert_eq!(s.last_event_seq().unwrap(), 0);
    assert!(s.events_after(0, 0).unwrap().is_empty());
    let first = s
        .commit(batch(vec![
            activity("m", "1", Some("a@x"), "h1"),
            activity("m", "2", Some("b@x"), "h2"),
        ]))
        .unwrap();
    let third = s
        .commit(batch(vec![activity("m", "3", Some("c@x"), "h3")]))
        .unwrap();
    let ids: Vec<u64> = first.iter().chain(&third).map(|o| inserted(*o)).collect();
    let events = s.events_after(0, 0).unwrap();
    assert_gapless(&events);
    assert_eq!(
        kinds(&events),
        ids.iter()
            .enumerate()
            .map(|(i, id)| (i as u64 + 1, EventKind::ActivityCreated, *id, vec![]))
            .collect::<Vec<_>>()
    );
    assert_eq!(events[2].activity, s.activity(ids[2]).unwrap().unwrap());
    assert_eq!(s.last_event_seq().unwrap(), 3);
    // Replays and commits without activities: nothing.
    let replay = s
        .commit(batch(vec![activity("m", "1", Some("a@x"), "h1")]))
        .unwrap();
    assert_eq!(replay, vec![CommitOutcome::AlreadySeen(ids[0])]);
    s.commit(CommitBatch::default()).unwrap();
    assert_eq!(s.last_event_seq().unwrap(), 3);
    // Reading from a cursor, with a limit, or one event.
    assert_eq!(
        s.events_after(1, 1)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert!(s.events_after(3, 0).unwrap().is_empty());
    assert_eq!(s.event(2).unwrap().unwrap().activity_id, ids[1]);
    assert!(s.event(4).unwrap().is_none());
    assert!(s.event(0).unwrap().is_none());
}

/// A duplicate appends `activity.updated` with `changes` `also_seen_as`;
/// a re-point by a folder move adds `regarding`; an activity inserted and
/// duplicated within one batch is one `activity.created` (with the copy in
/// `also_seen_as`).
pub fn duplicates_and_re_points_append_updated_events_with_changes<F: Fixture>(f: &F) {
    let s = store(f);
    let id = inserted(
        s.commit(batch(vec![activity("m", "1", Some("p@x"), "h1")]))
            .unwrap()[0],
    );
    s.commit(batch(vec![activity("other", "1", Some("p@x"), "h1")]))
        .unwrap();
    let mut moved = activity("m", "7", Some("p@x"), "h1");
    moved.source.folder = "INBOX/Contoso".into();
    moved.method = CorrelationMethod::Folder;
    moved.regarding = Some("account:contoso".parse().unwrap());
    s.commit(batch(vec![moved])).unwrap();
    // Both copies in one batch, twice: one event with both changes.
    let mut back = activity("m", "8", Some("p@x"), "h1");
    back.source.folder = "INBOX/Fabrikam".into();
    back.method = CorrelationMethod::Folder;
    back.regarding = Some("account:fabrikam".parse().unwrap());
    s.commit(batch(vec![activity("m", "9", Some("p@x"), "h1"), back]))
        .unwrap();
    let fresh = s
        .commit(batch(vec![
            activity("n", "1", Some("q@x"), "h2"),
            activity("n2", "1", Some("q@x"), "h2"),
        ]))
        .unwrap();
    let fresh_id = inserted(fresh[0]);
    assert_eq!(fresh[1], CommitOutcome::Duplicate(fresh_id));
    let events = s.events_after(0, 0).unwrap();
    assert_gapless(&events);
    let also = || "also_seen_as".to_string();
    let re = || "regarding".to_string();
    assert_eq!(
        kinds(&events),
        vec![
            (1, EventKind::ActivityCreated, id, vec![]),
            (2, EventKind::ActivityUpdated, id, vec![also()]),
            (3, EventKind::ActivityUpdated, id, vec![also(), re()]),
            (4, EventKind::ActivityUpdated, id, vec![also(), re()]),
            (5, EventKind::ActivityCreated, fresh_id, vec![]),
        ]
    );
    assert_eq!(
        events[2].activity.regarding.as_ref().unwrap().to_string(),
        "account:contoso"
    );
    assert_eq!(
        events[3].activity.regarding.as_ref().unwrap().to_string(),
        "account:fabrikam"
    );
    assert_eq!(events[3].activity.also_seen_as.len(), 4);
    assert_eq!(events[4].activity.also_seen_as.len(), 1);
}

/// Seqs stay 1..N without gaps or repeats when many threads commit and
/// update at once, and go on from N after a reopen; every activity has
/// exactly one `activity.created`.
pub fn seqs_stay_gapless_across_writers_and_a_reopen<F: Fixture>(f: &F) {
    let s = Arc::new(store(f));
    s.set_outbox_consumers(vec!["crm".into()]);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let s = s.clone();
            scope.spawn(move || {
                for n in 0..10 {
                    let mb = format!("m{t}");
                    let a = activity(&mb, &n.to_string(), Some(&format!("{t}.{n}@x")), "h");
                    let id = inserted(s.commit(batch(vec![a])).unwrap()[0]);
                    if n % 3 == 0 {
                        let mut a = s.activity(id).unwrap().unwrap();
                        a.subject = format!("corrected {t}.{n}");
                        s.update_activity(a, vec!["subject".into()], 5).unwrap();
                    }
                }
            });
        }
    });
    let events = s.events_after(0, 0).unwrap();
    assert_eq!(events.len(), 40 + 16);
    assert_gapless(&events);
    let created: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == EventKind::ActivityCreated)
        .map(|e| e.activity_id)
        .collect();
    assert_eq!(created.iter().collect::<HashSet<_>>().len(), 40);
    // Commit order: an activity's update comes after its creation.
    for e in events
        .iter()
        .filter(|e| e.kind == EventKind::ActivityUpdated)
    {
        let c = events
            .iter()
            .find(|c| c.kind == EventKind::ActivityCreated && c.activity_id == e.activity_id)
            .unwrap();
        assert!(c.seq < e.seq);
    }
    let pending = s.pending_deliveries("crm", 0).unwrap();
    assert_eq!(
        pending.iter().map(|p| p.seq).collect::<Vec<_>>(),
        (1..=56).collect::<Vec<_>>()
    );
    drop(pending);
    let s = match Arc::try_unwrap(s) {
        Ok(s) => s,
        Err(_) => panic!("store still shared"),
    };
    drop(s);
    let s = store(f);
    assert_eq!(s.last_event_seq().unwrap(), 56);
    assert_eq!(*s.watch_events().borrow(), 56);
    s.commit(batch(vec![activity("m0", "new", Some("new@x"), "h")]))
        .unwrap();
    let events = s.events_after(0, 0).unwrap();
    assert_eq!(events.len(), 57);
    assert_gapless(&events);
}

/// Each event gets a pending delivery per configured consumer, in seq
/// order, queued when it was committed; with no consumer there is none
/// (the event log is written all the same).
pub fn a_pending_delivery_per_consumer_and_none_without<F: Fixture>(f: &F) {
    let s = store(f);
    s.commit(batch(vec![activity("m", "0", Some("z@x"), "h0")]))
        .unwrap();
    assert_eq!(s.last_event_seq().unwrap(), 1);
    assert!(s.pending_deliveries("crm", 0).unwrap().is_empty());
    assert_eq!(s.outbox_stats("crm").unwrap(), OutboxStats::default());
    s.set_outbox_consumers(vec!["crm".into(), "hook".into()]);
    let out = s
        .commit(batch(vec![
            activity("m", "1", Some("a@x"), "h1"),
            activity("m", "2", Some("b@x"), "h2"),
        ]))
        .unwrap();
    let before = chrono::Utc::now().timestamp() - 5;
    for consumer in ["crm", "hook"] {
        let pending = s.pending_deliveries(consumer, 0).unwrap();
        assert_eq!(
            pending
                .iter()
                .map(|p| (p.seq, p.activity_id, p.attempts))
                .collect::<Vec<_>>(),
            vec![(2, inserted(out[0]), 0), (3, inserted(out[1]), 0)],
            "{consumer}"
        );
        assert!(pending
            .iter()
            .all(|p| p.queued_at >= before && p.last_error.is_none()));
        assert_eq!(s.pending_deliveries(consumer, 1).unwrap().len(), 1);
        let stats = s.outbox_stats(consumer).unwrap();
        assert_eq!(stats.depth, 2);
        assert_eq!(stats.oldest_queued_at, Some(pending[0].queued_at));
    }
    assert!(s.pending_deliveries("nobody", 0).unwrap().is_empty());
    // A consumer whose name extends another's is another consumer.
    assert!(s.pending_deliveries("cr", 0).unwrap().is_empty());
    s.set_outbox_consumers(Vec::new());
    s.commit(batch(vec![activity("m", "3", Some("c@x"), "h3")]))
        .unwrap();
    assert_eq!(s.pending_deliveries("crm", 0).unwrap().len(), 2);
    assert_eq!(s.last_event_seq().unwrap(), 4);
}

/// Delivered removes the pending entry and keeps the CRM id; Retry
/// replaces it (but never brings back one delivered meanwhile); DeadLetter
/// moves it to the dead letters (only while it is pending); the stats
/// follow; other consumers are untouched.
pub fn delivery_outcomes_apply_in_one_batch<F: Fixture>(f: &F) {
    let s = store(f);
    s.set_outbox_consumers(vec!["crm".into(), "hook".into()]);
    let ids: Vec<u64> = s
        .commit(batch(vec![
            activity("m", "1", Some("a@x"), "h1"),
            activity("m", "2", Some("b@x"), "h2"),
            activity("m", "3", Some("c@x"), "h3"),
        ]))
        .unwrap()
        .into_iter()
        .map(inserted)
        .collect();
    let pending = s.pending_deliveries("crm", 0).unwrap();
    s.finish_delivery(
        "crm",
        DeliveryOutcome::Delivered {
            seq: 1,
            activity_id: ids[0],
            crm_id: Some("email-guid-1".into()),
        },
    )
    .unwrap();
    assert_eq!(
        s.crm_id("crm", ids[0]).unwrap().as_deref(),
        Some("email-guid-1")
    );
    assert_eq!(s.crm_id("hook", ids[0]).unwrap(), None);
    assert_eq!(s.crm_id("crm", ids[1]).unwrap(), None);
    let retry = DeliveryState {
        attempts: 1,
        next_attempt_at: pending[1].queued_at + 5,
        last_error: Some("HTTP 503".into()),
        ..pending[1].clone()
    };
    s.finish_delivery("crm", DeliveryOutcome::Retry(retry.clone()))
        .unwrap();
    // A late retry of the delivered one does not bring it back.
    s.finish_delivery(
        "crm",
        DeliveryOutcome::Retry(DeliveryState {
            attempts: 3,
            ..pending[0].clone()
        }),
    )
    .unwrap();
    assert_eq!(
        s.pending_deliveries("crm", 0).unwrap(),
        vec![retry.clone(), pending[2].clone()]
    );
    let dead = DeadLetter {
        consumer: "crm".into(),
        state: retry.clone(),
        dead_at: retry.queued_at + 100,
        reason: "HTTP 410 gone".into(),
    };
    s.finish_delivery("crm", DeliveryOutcome::DeadLetter(dead.clone()))
        .unwrap();
    // Giving up on one delivered meanwhile: nothing to give up.
    s.finish_delivery(
        "crm",
        DeliveryOutcome::DeadLetter(DeadLetter {
            state: pending[0].clone(),
            ..dead.clone()
        }),
    )
    .unwrap();
    assert_eq!(
        s.pending_deliveries("crm", 0).unwrap(),
        vec![pending[2].clone()]
    );
    assert_eq!(s.dead_letters("crm", 0).unwrap(), vec![dead]);
    assert_eq!(s.dead_letters("crm", 1).unwrap().len(), 1);
    assert!(s.dead_letters("hook", 0).unwrap().is_empty());
    assert_eq!(
        s.outbox_stats("crm").unwrap(),
        OutboxStats {
            depth: 1,
            oldest_queued_at: Some(pending[2].queued_at),
            dead_letters: 1,
        }
    );
    assert_eq!(s.outbox_stats("hook").unwrap().depth, 3);
    // Delivered without an id, then again (a retry after a lost answer).
    for _ in 0..2 {
        s.finish_delivery(
            "crm",
            DeliveryOutcome::Delivered {
                seq: 3,
                activity_id: ids[2],
                crm_id: None,
            },
        )
        .unwrap();
    }
    assert!(s.pending_deliveries("crm", 0).unwrap().is_empty());
    assert_eq!(s.crm_id("crm", ids[2]).unwrap(), None);
    drop(s);
    let s = store(f);
    assert_eq!(s.outbox_stats("crm").unwrap().dead_letters, 1);
    assert_eq!(
        s.crm_id("crm", ids[0]).unwrap().as_deref(),
        Some("email-guid-1")
    );
    assert_eq!(s.pending_deliveries("hook", 0).unwrap().len(), 3);
}

/// `update_activity` replaces the activity and appends its
/// `activity.updated` (time `at`, the given changes) with a pending
/// delivery, in one batch; the per-mailbox listing, the regarding record
/// lookups see and the unresolved-party index follow it; an unknown
/// activity changes nothing.
pub fn update_activity_writes_the_activity_and_its_event<F: Fixture>(f: &F) {
    let s = store(f);
    s.set_outbox_consumers(vec!["crm".into()]);
    let mut a = activity("alice", "1", Some("p@x"), "h1");
    a.parties = vec![Party {
        role: PartyRole::From,
        address: "ann@customer.example".into(),
        record: None,
        note: Some("no record".into()),
    }];
    let id = inserted(s.commit(batch(vec![a])).unwrap()[0]);
    s.commit(batch(vec![activity("queue", "1", Some("p@x"), "h1")]))
        .unwrap();
    // Warm the regarding cache.
    let tracked = s.tracked_by_message_ids(&["p@x".into()]).unwrap();
    assert_eq!(
        tracked["p@x"].regarding.as_ref().unwrap().to_string(),
        "case:1"
    );
    assert_eq!(
        s.activities_with_unresolved("ann@customer.example")
            .unwrap(),
        vec![id]
    );

    let mut changed = s.activity(id).unwrap().unwrap();
    changed.parties[0].record = Some("contact:ann".parse().unwrap());
    changed.parties[0].note = None;
    changed.regarding = Some("account:contoso".parse().unwrap());
    // The copy in "queue" turned out to be someone else's: dropped.
    changed.also_seen_as.clear();
    let seq = s
        .update_activity(
            changed.clone(),
            vec!["parties".into(), "regarding".into()],
            1_234,
        )
        .unwrap();
    assert_eq!(seq, Some(3));
    assert_eq!(s.activity(id).unwrap().unwrap(), changed);
    let e = s.event(3).unwrap().unwrap();
    assert_eq!(
        (e.kind, e.activity_id, e.changes.clone(), e.at),
        (
            EventKind::ActivityUpdated,
            id,
            vec!["parties".to_string(), "regarding".to_string()],
            1_234
        )
    );
    assert_eq!(e.activity, changed);
    let pending = s.pending_deliveries("crm", 0).unwrap();
    assert_eq!(
        pending.last().map(|p| (p.seq, p.queued_at)),
        Some((3, 1_234))
    );
    let tracked = s.tracked_by_message_ids(&["p@x".into()]).unwrap();
    assert_eq!(
        tracked["p@x"].regarding.as_ref().unwrap().to_string(),
        "account:contoso",
        "the regarding cache follows"
    );
    assert!(s
        .activities_with_unresolved("ann@customer.example")
        .unwrap()
        .is_empty());
    let listed = |s: &dyn Store, m: &str| {
        s.activities(&crate::store::ActivityQuery {
            mailbox: Some(m.into()),
            before: None,
            limit: 0,
        })
        .unwrap()
        .len()
    };
    assert_eq!(listed(&s, "alice"), 1);
    assert_eq!(listed(&s, "queue"), 0, "no longer listed where it is not");
    assert_eq!(s.count_activities(Some("queue")).unwrap(), 0);
    // Unknown: nothing written.
    let mut ghost = changed.clone();
    ghost.id = 999_999;
    assert_eq!(
        s.update_activity(ghost, vec!["parties".into()], 9).unwrap(),
        None
    );
    assert_eq!(s.last_event_seq().unwrap(), 3);
    drop(s);
    let s = store(f);
    let tracked = s.tracked_by_message_ids(&["p@x".into()]).unwrap();
    assert_eq!(
        tracked["p@x"].regarding.as_ref().unwrap().to_string(),
        "account:contoso"
    );
    assert_eq!(listed(&s, "queue"), 0);
}

/// A watcher sees the newest seq after every commit or update that
/// appended events, and no change after one that appended none.
pub fn watchers_see_every_new_seq<F: Fixture>(f: &F) {
    let s = store(f);
    let mut rx = s.watch_events();
    assert_eq!(*rx.borrow_and_update(), 0);
    let id = inserted(
        s.commit(batch(vec![
            activity("m", "1", Some("a@x"), "h1"),
            activity("m", "2", Some("b@x"), "h2"),
        ]))
        .unwrap()[0],
    );
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 2);
    s.commit(batch(vec![activity("m", "1", Some("a@x"), "h1")]))
        .unwrap();
    s.commit(CommitBatch::default()).unwrap();
    assert!(!rx.has_changed().unwrap(), "a replay appends nothing");
    let a = s.activity(id).unwrap().unwrap();
    s.update_activity(a, vec!["parties".into()], 1).unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 3);
    // What a watcher is told is there to read.
    assert_eq!(s.events_after(2, 0).unwrap().len(), 1);
    let late = s.watch_events();
    assert_eq!(*late.borrow(), 3);
}
