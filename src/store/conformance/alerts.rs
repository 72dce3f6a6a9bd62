//! Alerts: aggregation by (subject, kind), escalation in place,
//! resolution, profile alerts and queries, and the alert journal (an
//! entry in the same batch as the write that makes an alert an Error).

use super::{store, Fixture};
use crate::model::{AlertLevel, NewAlert};
use crate::store::{AlertEventKind, AlertQuery, AlertState, Store};

fn mailbox_alert<'a>(
    kind: &'a str,
    level: AlertLevel,
    mailbox: &'a str,
    text: &'a str,
) -> NewAlert<'a> {
    NewAlert {
        kind,
        level,
        mailbox: Some(mailbox),
        profile: Some("p"),
        text,
    }
}

pub fn alerts_aggregate<F: Fixture>(fx: &F) {
    let s = store(fx);
    s.raise_alert(
        mailbox_alert("auth", AlertLevel::Error, "m", "auth failed: x"),
        10,
    )
    .unwrap();
    let a = s
        .raise_alert(
            mailbox_alert("auth", AlertLevel::Error, "m", "auth failed: y"),
            20,
        )
        .unwrap();
    assert_eq!((a.count, a.first_seen, a.last_seen), (2, 10, 20));
    assert_eq!(a.text, "auth failed: y", "the latest text");
    s.raise_alert(mailbox_alert("slow", AlertLevel::Warning, "m", "slow"), 30)
        .unwrap();
    s.raise_alert(
        mailbox_alert("auth", AlertLevel::Error, "other", "auth failed: y"),
        31,
    )
    .unwrap();
    let all = s.alerts(10).unwrap();
    assert_eq!(all.len(), 3, "one per (mailbox, kind): {all:?}");
    assert_eq!(all[0].mailbox.as_deref(), Some("other"));
    assert_eq!(all[1].text, "slow");
}

pub fn an_alert_escalates_in_place_and_loses_its_acknowledgement<F: Fixture>(fx: &F) {
    let s = store(fx);
    let w = s
        .raise_alert(
            mailbox_alert("sync_failing", AlertLevel::Warning, "m", "retrying"),
            10,
        )
        .unwrap();
    let acked = s.acknowledge_alert(w.id, 11).unwrap().unwrap();
    assert_eq!(acked.acknowledged_at, Some(11));
    assert_eq!(
        s.acknowledge_alert(w.id, 12)
            .unwrap()
            .unwrap()
            .acknowledged_at,
        Some(11),
        "kept"
    );
    let again = s
        .raise_alert(
            mailbox_alert("sync_failing", AlertLevel::Warning, "m", "retrying"),
            13,
        )
        .unwrap();
    assert_eq!(
        again.acknowledged_at,
        Some(11),
        "same level: still acknowledged"
    );
    let e = s
        .raise_alert(
            mailbox_alert("sync_failing", AlertLevel::Error, "m", "not synced since"),
            20,
        )
        .unwrap();
    assert_eq!((e.id, e.level, e.count), (w.id, AlertLevel::Error, 3));
    assert_eq!(e.acknowledged_at, None, "an escalation needs a new look");
    assert_eq!(s.alert(w.id).unwrap(), Some(e));
    assert_eq!(s.acknowledge_alert(999_999, 1).unwrap(), None);
    assert_eq!(s.alert(999_999).unwrap(), None);
}

pub fn resolved_alert_stays_listed_and_a_repeat_opens_a_new_one<F: Fixture>(fx: &F) {
    let s = store(fx);
    let first = s
        .raise_alert(
            mailbox_alert("quarantine:too_large", AlertLevel::Warning, "m", "x"),
            10,
        )
        .unwrap();
    s.raise_alert(
        mailbox_alert("quarantine:unparseable", AlertLevel::Warning, "m", "y"),
        10,
    )
    .unwrap();
    s.raise_alert(
        mailbox_alert("quarantined", AlertLevel::Warning, "m", "not of the family"),
        10,
    )
    .unwrap();
    s.raise_alert(
        mailbox_alert("quarantine:too_large", AlertLevel::Warning, "other", "x"),
        10,
    )
    .unwrap();
    assert_eq!(
        s.resolve_alerts("m", "quarantine:too_large", 20).unwrap(),
        1
    );
    assert_eq!(
        s.resolve_alerts("m", "quarantine:too_large", 21).unwrap(),
        0
    );
    assert_eq!(
        s.resolve_alerts("m", "quarantine", 22).unwrap(),
        1,
        "the family: unparseable"
    );
    let again = s
        .raise_alert(
            mailbox_alert("quarantine:too_large", AlertLevel::Warning, "m", "x"),
            30,
        )
        .unwrap();
    assert_ne!(again.id, first.id);
    let all = s.alerts(10).unwrap();
    let old = all.iter().find(|a| a.id == first.id).unwrap();
    assert_eq!((old.resolved_at, old.count), (Some(20), 1));
    let open: Vec<_> = all
        .iter()
        .filter(|a| a.is_open())
        .map(|a| (a.subject(), a.kind.as_str()))
        .collect();
    assert_eq!(
        open,
        vec![
            ("m", "quarantine:too_large"),
            ("other", "quarantine:too_large"),
            ("m", "quarantined")
        ]
    );
}

pub fn profile_alerts_are_their_own_subject_and_queries_filter<F: Fixture>(fx: &F) {
    let s = store(fx);
    let profile = NewAlert {
        kind: "profile_failing",
        level: AlertLevel::Error,
        mailbox: None,
        profile: Some("p"),
        text: "3 of 4 failed",
    };
    let p = s.raise_alert(profile, 10).unwrap();
    assert_eq!(s.raise_alert(profile, 11).unwrap().id, p.id);
    s.raise_alert(
        mailbox_alert(
            "profile_failing",
            AlertLevel::Error,
            "m",
            "not a profile alert",
        ),
        12,
    )
    .unwrap();
    s.raise_alert(
        mailbox_alert("sync_failing", AlertLevel::Warning, "m", "retrying"),
        13,
    )
    .unwrap();
    s.raise_alert(
        mailbox_alert("not_approved", AlertLevel::Information, "n", "pending"),
        14,
    )
    .unwrap();
    assert_eq!(s.resolve_alerts("n", "not_approved", 15).unwrap(), 1);
    let q = |level, mailbox: Option<&str>, state| AlertQuery {
        level,
        mailbox: mailbox.map(str::to_string),
        state,
        limit: 100,
    };
    let ids = |q: AlertQuery| -> Vec<(String, String)> {
        s.query_alerts(&q)
            .unwrap()
            .into_iter()
            .map(|a| (a.subject().to_string(), a.kind))
            .collect()
    };
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        ids(q(Some(AlertLevel::Error), None, None)),
        vec![pair("m", "profile_failing"), pair("p", "profile_failing")]
    );
    assert_eq!(
        ids(q(None, Some("m"), Some(AlertState::Open))),
        vec![pair("m", "sync_failing"), pair("m", "profile_failing")]
    );
    assert_eq!(
        ids(q(None, Some("p"), None)),
        vec![pair("p", "profile_failing")]
    );
    assert_eq!(
        ids(q(None, None, Some(AlertState::Resolved))),
        vec![pair("n", "not_approved")]
    );
    assert_eq!(ids(q(Some(AlertLevel::Warning), Some("n"), None)), vec![]);
    assert_eq!(s.query_alerts(&AlertQuery::latest(2)).unwrap().len(), 2);
    // The profile alert resolves by its profile's name.
    assert_eq!(s.resolve_alerts("p", "profile_failing", 20).unwrap(), 1);
    assert!(s.alert(p.id).unwrap().unwrap().resolved_at.is_some());
}

fn journal<S: Store>(s: &S) -> Vec<(u64, AlertEventKind, u64, AlertLevel)> {
    s.alert_events_after(0, 0)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.kind, e.alert.id, e.alert.level))
        .collect()
}

/// An alert raised as an Error, and one escalated in place from a Warning,
/// each append one journal entry (seqs 1..N) with the alert as written;
/// repeats at Error, Warnings and Information append nothing; a resolved
/// Error raised again is a new alert and a new entry. A mailbox entry
/// names its profile's alert when that one was open.
pub fn an_alert_that_becomes_an_error_is_journaled_with_its_write<F: Fixture>(fx: &F) {
    let s = store(fx);
    let mut watch = s.watch_alert_events();
    assert_eq!(s.last_alert_event_seq(), 0);
    let w = s
        .raise_alert(
            mailbox_alert("sync_failing", AlertLevel::Warning, "m", "retrying"),
            10,
        )
        .unwrap();
    s.raise_alert(
        mailbox_alert("not_approved", AlertLevel::Information, "m", "pending"),
        10,
    )
    .unwrap();
    assert!(journal(&s).is_empty(), "no Error yet");
    let e = s
        .raise_alert(
            mailbox_alert("sync_failing", AlertLevel::Error, "m", "not synced since"),
            20,
        )
        .unwrap();
    assert_eq!(e.id, w.id, "escalated in place");
    assert!(watch.has_changed().unwrap());
    assert_eq!(*watch.borrow_and_update(), 1);
    s.raise_alert(
        mailbox_alert("sync_failing", AlertLevel::Error, "m", "still not"),
        30,
    )
    .unwrap();
    let d = s
        .raise_alert(
            mailbox_alert("disabled", AlertLevel::Error, "n", "gone"),
            40,
        )
        .unwrap();
    let events = s.alert_events_after(0, 0).unwrap();
    assert_eq!(
        journal(&s),
        vec![
            (1, AlertEventKind::Escalated, w.id, AlertLevel::Error),
            (2, AlertEventKind::Raised, d.id, AlertLevel::Error),
        ],
        "the repeat at Error added nothing"
    );
    assert_eq!(events[0].alert, e, "the alert as the escalation wrote it");
    assert_eq!(events[0].at, 20);
    assert_eq!(events[1].alert, d);
    assert_eq!(
        events[0].webhook_id(),
        format!("alert_{}_escalated_1", w.id)
    );
    assert_eq!(events[1].webhook_id(), format!("alert_{}", d.id));
    assert_eq!(events[1].profile_alert, None, "no profile alert open");

    // Resolved, then failing again: a new alert, a new entry.
    s.resolve_alerts("n", "disabled", 41).unwrap();
    let p = s
        .raise_alert(
            NewAlert {
                kind: "profile_failing",
                level: AlertLevel::Error,
                mailbox: None,
                profile: Some("p"),
                text: "3 of 4 failed",
            },
            42,
        )
        .unwrap();
    let again = s
        .raise_alert(
            mailbox_alert("disabled", AlertLevel::Error, "n", "gone"),
            43,
        )
        .unwrap();
    assert_ne!(again.id, d.id);
    let tail = s.alert_events_after(2, 0).unwrap();
    assert_eq!(
        tail.iter()
            .map(|e| (e.seq, e.alert.id, e.profile_alert))
            .collect::<Vec<_>>(),
        vec![(3, p.id, None), (4, again.id, Some(p.id))],
        "the profile alert itself, then a mailbox Error while it was open"
    );
    s.resolve_alerts("p", "profile_failing", 44).unwrap();
    s.raise_alert(mailbox_alert("stuck", AlertLevel::Error, "m", "hung"), 45)
        .unwrap();
    let last = s.alert_events_after(4, 0).unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(
        last[0].profile_alert, None,
        "the profile alert was resolved"
    );
    assert_eq!(s.last_alert_event_seq(), 5);
    assert_eq!(s.alert_events_after(3, 1).unwrap()[0].seq, 4, "a limit");
    assert!(s.alert_events_after(5, 0).unwrap().is_empty());
}

/// What a consumer sent is pruned with its cursor in one batch; the seq
/// goes on after every entry was pruned, also across a reopen, so a seq
/// (and the webhook-id of an escalation) is never handed out twice.
pub fn sent_alert_events_are_pruned_and_seqs_survive_a_reopen<F: Fixture>(fx: &F) {
    {
        let s = store(fx);
        for m in ["a", "b", "c"] {
            s.raise_alert(mailbox_alert("disabled", AlertLevel::Error, m, "x"), 1)
                .unwrap();
        }
        s.alert_events_sent("hook", 2).unwrap();
        assert_eq!(s.named_cursor("hook").unwrap(), Some(2));
        assert_eq!(journal(&s).iter().map(|e| e.0).collect::<Vec<_>>(), vec![3]);
        s.alert_events_sent("hook", 3).unwrap();
        assert!(journal(&s).is_empty());
        assert_eq!(s.last_alert_event_seq(), 3);
    }
    let s = store(fx);
    assert_eq!(
        s.last_alert_event_seq(),
        3,
        "kept with nothing left to scan"
    );
    assert_eq!(s.named_cursor("hook").unwrap(), Some(3));
    s.raise_alert(mailbox_alert("disabled", AlertLevel::Error, "d", "x"), 2)
        .unwrap();
    assert_eq!(journal(&s).iter().map(|e| e.0).collect::<Vec<_>>(), vec![4]);
    // An unsent entry survives a reopen too (the sender resumes after it).
    drop(s);
    let s = store(fx);
    assert_eq!(s.alert_events_after(3, 0).unwrap()[0].seq, 4);
}

/// Without a consumer the journal stays bounded: appending past the cap
/// drops the oldest entries in the same batch.
pub fn the_alert_journal_keeps_at_most_its_cap<F: Fixture>(fx: &F) {
    let s = store(fx);
    s.set_alert_journal_cap(3);
    for i in 0..7 {
        s.raise_alert(
            mailbox_alert("disabled", AlertLevel::Error, &format!("m{i}"), "x"),
            i,
        )
        .unwrap();
    }
    assert_eq!(
        journal(&s).iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert_eq!(s.last_alert_event_seq(), 7);
}
