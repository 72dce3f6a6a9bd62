//! Alerts kept and pruned: resolved alerts past their age or beyond the
//! newest kept go (oldest resolved first), open ones never; the open alert
//! index answers the open query and agrees with the rows after every write,
//! also in a store written before the indexes.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{store, Fixture};
use crate::model::{Alert, AlertLevel, NewAlert};
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};
use crate::store::{AlertQuery, AlertRetention, AlertState, KvStore, Store};

fn raise<B: KvBackend>(s: &KvStore<B>, kind: &str, mailbox: &str, at: i64) -> Alert {
    s.raise_alert(
        NewAlert {
            kind,
            level: AlertLevel::Warning,
            mailbox: Some(mailbox),
            profile: Some("p"),
            text: "t",
        },
        at,
    )
    .unwrap()
}

fn retention(max_age_secs: u64, keep: u64) -> AlertRetention {
    AlertRetention {
        max_age: Duration::from_secs(max_age_secs),
        keep,
    }
}

/// The ids of the keys under `prefix` (their last 8 bytes).
fn ids_under<B: KvBackend>(kv: &B, prefix: &[u8]) -> BTreeSet<u64> {
    kv.scan_keys(&KeyRange::prefix(prefix), ScanOrder::Ascending, 0)
        .unwrap()
        .iter()
        .map(|k| u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap()))
        .collect()
}

fn open_query() -> AlertQuery {
    AlertQuery {
        state: Some(AlertState::Open),
        limit: 100_000,
        ..Default::default()
    }
}

/// Checks that the indexes agree with the alert rows (`lo/` the open ones,
/// `lr/` and its count the resolved ones) and that the open query answers
/// what filtering every alert does; returns every alert.
fn indexes_agree<B: KvBackend>(s: &KvStore<B>) -> Vec<Alert> {
    let all = s.alerts(100_000).unwrap();
    let kv = s.backend();
    let open: Vec<Alert> = all.iter().filter(|a| a.is_open()).cloned().collect();
    let resolved: BTreeSet<u64> = all.iter().filter(|a| !a.is_open()).map(|a| a.id).collect();
    assert_eq!(
        ids_under(kv, b"lo/"),
        open.iter().map(|a| a.id).collect::<BTreeSet<_>>(),
        "lo/ lists exactly the open alerts"
    );
    assert_eq!(ids_under(kv, b"lr/"), resolved, "lr/: the resolved ones");
    let count = kv
        .get(b"lrn")
        .unwrap()
        .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
    assert_eq!(count, resolved.len() as u64, "lrn counts them");
    assert_eq!(s.query_alerts(&open_query()).unwrap(), open);
    all
}

pub fn resolved_alerts_past_their_age_are_pruned_open_ones_never<F: Fixture>(fx: &F) {
    let (open, old, recent, last) = {
        let s = store(fx);
        s.set_alert_retention(retention(100, 1_000));
        let open = raise(&s, "stuck", "m0", 0);
        let old = raise(&s, "a", "m1", 0);
        assert_eq!(s.resolve_alerts("m1", "a", 10).unwrap(), 1);
        let recent = raise(&s, "a", "m2", 0);
        s.resolve_alerts("m2", "a", 110).unwrap();
        indexes_agree(&s);
        assert!(s.alert(old.id).unwrap().is_some(), "exactly 100 s: kept");
        // A resolve at 950 prunes, in its own batch, what was resolved
        // before 850; one at 1000 what was resolved before 900.
        let second = recent;
        let recent = raise(&s, "a", "m2", 900);
        s.resolve_alerts("m2", "a", 950).unwrap();
        assert_eq!(s.alert(old.id).unwrap(), None, "resolved 940 s before");
        assert_eq!(s.alert(second.id).unwrap(), None, "840 s before");
        let last = raise(&s, "a", "m3", 990);
        s.resolve_alerts("m3", "a", 1_000).unwrap();
        assert!(s.alert(recent.id).unwrap().is_some(), "50 s before");
        assert!(s.alert(last.id).unwrap().is_some());
        assert!(s.alert(open.id).unwrap().unwrap().is_open());
        indexes_agree(&s);
        (open, old, recent, last)
    };
    // After a reopen, time alone: the pass prunes without a resolve, what
    // was resolved more than the age ago and nothing at the boundary.
    let s = store(fx);
    s.set_alert_retention(retention(100, 1_000));
    assert_eq!(s.prune_resolved_alerts(1_050).unwrap(), 0, "exactly 100 s");
    assert_eq!(s.prune_resolved_alerts(1_051).unwrap(), 1);
    assert_eq!(s.alert(recent.id).unwrap(), None);
    assert_eq!(s.prune_resolved_alerts(1_051).unwrap(), 0);
    let all = indexes_agree(&s);
    assert_eq!(
        all.iter().map(|a| a.id).collect::<BTreeSet<_>>(),
        BTreeSet::from([open.id, last.id]),
        "the open alert (first seen at 0) stays: {all:?}"
    );
    assert_eq!(s.prune_resolved_alerts(1_000_000).unwrap(), 1);
    assert!(s.alert(open.id).unwrap().is_some(), "open alerts never go");
    assert_eq!(s.alert(old.id).unwrap(), None);
    indexes_agree(&s);
}

pub fn the_resolved_alert_cap_keeps_the_newest_resolved<F: Fixture>(fx: &F) {
    let s = store(fx);
    s.set_alert_retention(retention(3_650 * 86_400, 3));
    let open = raise(&s, "stuck", "open", 0);
    let alerts: Vec<Alert> = (0..5)
        .map(|i| raise(&s, "a", &format!("m{i}"), 0))
        .collect();
    // Resolved newest id first: the newest resolved are the oldest ids, so
    // a cap by id would keep the wrong ones.
    for (n, a) in alerts.iter().enumerate().rev() {
        s.resolve_alerts(a.subject(), "a", 105 - n as i64).unwrap();
        indexes_agree(&s);
    }
    let kept = |s: &KvStore<F::Backend>| -> Vec<u64> {
        let mut ids: Vec<u64> = s
            .query_alerts(&AlertQuery {
                state: Some(AlertState::Resolved),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .iter()
            .map(|a| a.id)
            .collect();
        ids.sort_unstable();
        ids
    };
    let ids: Vec<u64> = alerts.iter().map(|a| a.id).collect();
    assert_eq!(kept(&s), ids[..3], "the three resolved last");
    assert_eq!(s.alert(ids[4]).unwrap(), None);
    assert!(s.alert(open.id).unwrap().unwrap().is_open());
    // A lower cap: the pass trims to it, newest kept.
    s.set_alert_retention(retention(3_650 * 86_400, 1));
    assert_eq!(s.prune_resolved_alerts(106).unwrap(), 2);
    assert_eq!(kept(&s), ids[..1]);
    drop(s);
    let s = store(fx);
    assert_eq!(kept(&s), ids[..1], "after a reopen");
    assert!(s.alert(open.id).unwrap().unwrap().is_open());
    indexes_agree(&s);
}

pub fn the_open_alert_index_follows_every_alert_write<F: Fixture>(fx: &F) {
    let s = store(fx);
    let w = raise(&s, "sync_failing", "m", 10);
    assert_eq!(indexes_agree(&s).len(), 1);
    s.acknowledge_alert(w.id, 11).unwrap();
    indexes_agree(&s);
    let e = s
        .raise_alert(
            NewAlert {
                kind: "sync_failing",
                level: AlertLevel::Error,
                mailbox: Some("m"),
                profile: Some("p"),
                text: "escalated",
            },
            12,
        )
        .unwrap();
    assert_eq!(e.id, w.id);
    let profile = s
        .raise_alert(
            NewAlert {
                kind: "profile_failing",
                level: AlertLevel::Error,
                mailbox: None,
                profile: Some("p"),
                text: "half fail",
            },
            13,
        )
        .unwrap();
    indexes_agree(&s);
    let by_subject = |m: &str| -> Vec<u64> {
        let q = AlertQuery {
            mailbox: Some(m.into()),
            level: Some(AlertLevel::Error),
            ..open_query()
        };
        s.query_alerts(&q).unwrap().iter().map(|a| a.id).collect()
    };
    assert_eq!(by_subject("m"), [w.id]);
    assert_eq!(by_subject("p"), [profile.id], "a profile alert by its name");
    s.resolve_alerts("m", "sync_failing", 20).unwrap();
    indexes_agree(&s);
    assert_eq!(by_subject("m"), Vec::<u64>::new());
    let again = raise(&s, "sync_failing", "m", 30);
    assert_ne!(again.id, w.id);
    let open: Vec<u64> = indexes_agree(&s)
        .iter()
        .filter(|a| a.is_open())
        .map(|a| a.id)
        .collect();
    assert_eq!(open, [again.id, profile.id], "most recently seen first");
    // Acknowledging a resolved alert leaves it out of the open ones.
    s.acknowledge_alert(w.id, 31).unwrap();
    indexes_agree(&s);
    drop(s);
    let s = store(fx);
    assert_eq!(
        s.query_alerts(&open_query())
            .unwrap()
            .iter()
            .map(|a| a.id)
            .collect::<Vec<_>>(),
        [again.id, profile.id]
    );
    indexes_agree(&s);
}

pub fn a_store_written_before_the_alert_indexes_gets_them_at_open<F: Fixture>(fx: &F) {
    let alert = |id: u64, mailbox: &str, resolved_at: Option<i64>| Alert {
        id,
        level: AlertLevel::Warning,
        kind: "a".into(),
        mailbox: Some(mailbox.into()),
        profile: None,
        text: "t".into(),
        first_seen: 1,
        last_seen: 1,
        count: 1,
        resolved_at,
        acknowledged_at: None,
    };
    {
        // What an older binary wrote: rows and the open one's identity.
        let kv = fx.open();
        let mut b = WriteBatch::default();
        for a in [alert(1, "old", Some(5)), alert(2, "open", None)] {
            let row = [&b"l/"[..], &a.id.to_be_bytes()].concat();
            b.put(row, serde_json::to_vec(&a).unwrap());
        }
        b.put(b"lj/m\0open\0a".to_vec(), 2u64.to_be_bytes());
        kv.apply(b).unwrap();
        kv.flush().unwrap();
        // 100 ids are taken (the rows above came from the backend's ids).
        for _ in 0..100 {
            kv.generate_id().unwrap();
        }
    }
    let s = store(fx);
    let all = indexes_agree(&s);
    assert_eq!(all.len(), 2);
    assert_eq!(
        s.query_alerts(&open_query()).unwrap(),
        [alert(2, "open", None)]
    );
    // The old resolved alert is counted: a cap of 1 prunes it first.
    s.set_alert_retention(retention(3_650 * 86_400, 1));
    raise(&s, "a", "new", 10);
    s.resolve_alerts("new", "a", 20).unwrap();
    assert_eq!(s.alert(1).unwrap(), None);
    s.resolve_alerts("open", "a", 30).unwrap();
    assert_eq!(s.alert(2).unwrap().unwrap().resolved_at, Some(30));
    assert_eq!(indexes_agree(&s).len(), 1, "the newest resolved");
}
