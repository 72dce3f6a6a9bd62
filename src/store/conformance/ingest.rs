//! Ingest rules: deduplication and its outcomes, re-pointing,
//! `also_seen_as`, listings, correlation indexes, positions, counters,
//! follow-ups, loop marks (alerts: `alerts`).

use super::{activity, batch, inserted, store, Fixture};
use crate::correlate::{Indexes, MAX_SHINGLE_POSTINGS};
use crate::model::{CorrelationMethod, FolderPosition, FollowUp, MailboxState, QuarantineEntry};
use crate::store::{
    ActivityQuery, AutomaticMark, CommitBatch, CommitOutcome, PendingItem, Store, Tally,
};

pub fn dedupes_by_source_then_message_id_and_hash<F: Fixture>(fx: &F) {
    let s = store(fx);
    let out = s
        .commit(batch(vec![
            activity("m", "1", Some("a@x"), "h1"),
            activity("m", "2", Some("b@x"), "h2"),
        ]))
        .unwrap();
    assert!(matches!(
        out[..],
        [CommitOutcome::Inserted(_), CommitOutcome::Inserted(_)]
    ));
    let first = match out[0] {
        CommitOutcome::Inserted(i) => i,
        _ => unreachable!(),
    };
    // Same source again: a replay after a crash.
    let again = s
        .commit(batch(vec![activity("m", "1", Some("a@x"), "h1")]))
        .unwrap();
    assert_eq!(again, vec![CommitOutcome::AlreadySeen(first)]);
    // Same email under a new UID (UIDVALIDITY reset) and within one batch twice.
    let moved = s
        .commit(batch(vec![
            activity("m", "9", Some("<A@X>"), "h1"),
            activity("m", "10", Some("a@x"), "h1"),
        ]))
        .unwrap();
    assert_eq!(
        moved,
        vec![
            CommitOutcome::Duplicate(first),
            CommitOutcome::Duplicate(first)
        ]
    );
    assert_eq!(s.activity(first).unwrap().unwrap().also_seen_as.len(), 2);
    // Same Message-ID, another sender, date or subject: a different email.
    let mut reused = activity("m", "11", Some("a@x"), "zz");
    reused.subject = "another email reusing the Message-ID".into();
    let other = s.commit(batch(vec![reused])).unwrap();
    assert!(matches!(other[0], CommitOutcome::Inserted(_)));
    assert_eq!(s.count_activities(None).unwrap(), 3);
    assert_eq!(s.count_activities(Some("m")).unwrap(), 3);
    assert!(s.is_seen(&activity("m", "10", None, "").source).unwrap());
    let t = s
        .tracked_by_message_ids(&["a@x".into(), "nope@x".into()])
        .unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t["a@x"].activity, first);
}

/// The header method takes the first tracked id of In-Reply-To, then
/// References newest first; the store reads up to that one only, and a
/// batch's staged overlay layered over it still gives the method the
/// first hit of both.
pub fn message_ids_resolve_up_to_the_first_tracked_one<F: Fixture>(fx: &F) {
    use crate::correlate::{
        correlate, lookup_keys, CorrelationSettings, MemIndex, MessageFeatures,
    };
    let s = store(fx);
    let mut stored = Vec::new();
    for (n, mid) in ["root@x", "mid@x", "newest@x"].iter().enumerate() {
        let mut a = activity("m", &n.to_string(), Some(mid), &format!("h{n}"));
        a.regarding = Some(format!("case:{n}").parse().unwrap());
        stored.push(a);
    }
    s.commit(batch(stored)).unwrap();
    let settings = CorrelationSettings::default();
    let reply = MessageFeatures {
        in_reply_to: vec!["unknown@x".into()],
        references: vec!["root@x".into(), "mid@x".into(), "newest@x".into()],
        ..Default::default()
    };
    let keys = lookup_keys(&reply, &settings);
    let mut idx = Indexes::default();
    s.lookup_into(&keys, &mut idx).unwrap();
    assert_eq!(
        idx.by_message_id.keys().collect::<Vec<_>>(),
        vec!["newest@x"],
        "nothing read past the first hit"
    );
    let d = correlate(&reply, &idx, &settings);
    assert_eq!(d.method, CorrelationMethod::InReplyTo);
    assert_eq!(d.regarding, Some("case:2".parse().unwrap()));
    assert!(
        d.reasons[0].contains("References contains <newest@x>"),
        "{:?}",
        d.reasons
    );
    // The parent staged in the same batch (not in the store yet) comes
    // first in the order, so it wins over the store's hit.
    let mut staged = MemIndex::default();
    staged.insert_message_ids(&["unknown@x".into()], 99, Some("case:9".parse().unwrap()));
    staged.fill(&keys, &mut idx);
    let d = correlate(&reply, &idx, &settings);
    assert_eq!(d.method, CorrelationMethod::InReplyTo);
    assert_eq!(d.regarding, Some("case:9".parse().unwrap()));
}

pub fn correlation_indexes_are_written_with_their_activity_and_resolved<F: Fixture>(fx: &F) {
    use crate::correlate::{index_entry, lookup_keys, CorrelationSettings, MessageFeatures};
    let s = store(fx);
    let settings = CorrelationSettings {
        smart_matching: true,
        ..Default::default()
    };
    let f = MessageFeatures {
        subject: "Invoice 7781 CRM:0001001".into(),
        thread_index: Some(crate::correlate::thread_index::encode_root(
            1 << 40,
            [3; 16],
        )),
        ..Default::default()
    };
    let mut a = activity("m", "1", Some("p@x"), "h1");
    a.id = s.allocate_id().unwrap();
    let mut dup = activity("m", "2", Some("p@x"), "h1");
    dup.id = s.allocate_id().unwrap();
    let mut b = batch(vec![a.clone(), dup.clone()]);
    b.index = vec![
        index_entry(&f, a.id, &settings),
        index_entry(&f, dup.id, &settings),
    ];
    s.commit(b).unwrap();
    drop(s);
    // Reopen: nothing comes from the cache.
    let s = store(fx);
    let reply = MessageFeatures {
        subject: "RE: Invoice 7781 CRM:0001001".into(),
        thread_index: f.thread_index.clone(),
        ..Default::default()
    };
    let idx = s.lookup(&lookup_keys(&reply, &settings)).unwrap();
    assert_eq!(idx.by_token["0001001"].activity, a.id);
    assert_eq!(idx.by_thread_root.values().next().unwrap().activity, a.id);
    // The duplicate's entries were not written.
    assert_eq!(idx.candidates.len(), 1);
    assert_eq!(idx.candidates[0].activity, a.id);
    assert_eq!(
        idx.candidates[0].regarding.as_ref().unwrap().to_string(),
        "case:1"
    );
}

/// A parent body with enough words for a fingerprint.
const PARENT_TEXT: &str = "the pallets for the Rotterdam warehouse arrive on Friday and \
    the customs papers for both destinations are ready to sign today";

/// Scored smart-matching settings.
fn scored() -> crate::correlate::CorrelationSettings {
    crate::correlate::CorrelationSettings {
        smart_matching: true,
        ..Default::default()
    }
}

/// The in-memory bucket and posting lists must read exactly as the
/// tree does, however commits (ids out of order, more members than a
/// lookup takes) and lookups interleave.
pub fn cached_smart_matching_lists_read_as_a_fresh_store_does<F: Fixture>(fx: &F) {
    use crate::correlate::{index_entry, lookup_keys, MessageFeatures};
    let (s, settings) = (store(fx), scored());
    let text = PARENT_TEXT;
    let features = |i: i64| {
        let mut f = MessageFeatures {
            subject: "Delivery plan".into(),
            to: vec!["ann@customer.example".into()],
            sent_at: Some(1_767_000_000 + i),
            ..Default::default()
        };
        f.add_body_features(text);
        f
    };
    let mut reply = features(1_000);
    reply.subject = "Re: Delivery plan".into();
    reply.add_body_features(&format!("Fine.\n\nOn Monday, Ann wrote:\n> {text}"));
    let keys = lookup_keys(&reply, &settings);
    assert!(!keys.buckets.is_empty() && !keys.shingles.is_empty());
    // More members than a lookup takes, committed newest batch first.
    let ids: Vec<u64> = (0..45).map(|_| s.allocate_id().unwrap()).collect();
    let empty = s.lookup(&keys).unwrap();
    assert!(empty.candidates.is_empty() && empty.by_shingle.is_empty());
    for chunk in ids.chunks(9).rev() {
        let mut b = batch(
            chunk
                .iter()
                .map(|id| {
                    let mut a = activity("m", &id.to_string(), None, &format!("h{id}"));
                    a.id = *id;
                    a
                })
                .collect(),
        );
        b.index = chunk
            .iter()
            .map(|id| index_entry(&features(*id as i64), *id, &settings))
            .collect();
        s.commit(b).unwrap();
        // Caches the lists as they are now.
        s.lookup(&keys).unwrap();
    }
    let cached = s.lookup(&keys).unwrap();
    drop(s);
    let fresh = store(fx).lookup(&keys).unwrap();
    assert_eq!(cached.candidates, fresh.candidates);
    assert_eq!(cached.by_shingle, fresh.by_shingle);
    // Newest candidates of the bucket, oldest postings of a shingle.
    assert_eq!(
        fresh.candidates.first().map(|c| c.activity),
        ids.last().copied()
    );
    let postings = fresh.by_shingle.values().next().unwrap();
    assert_eq!(postings.len(), MAX_SHINGLE_POSTINGS);
    assert_eq!(postings[0].activity, ids[0]);
}

pub fn fingerprint_shingles_find_a_quoted_parent_under_another_subject<F: Fixture>(fx: &F) {
    use crate::correlate::{index_entry, lookup_keys, MessageFeatures};
    let (s, settings) = (store(fx), scored());
    let text = PARENT_TEXT;
    let mut f = MessageFeatures {
        subject: "Delivery plan".into(),
        ..Default::default()
    };
    f.add_body_features(text);
    let mut a = activity("m", "1", Some("p@x"), "h1");
    a.id = s.allocate_id().unwrap();
    let mut b = batch(vec![a.clone()]);
    b.index = vec![index_entry(&f, a.id, &settings)];
    assert!(!b.index[0].shingle_keys.is_empty());
    s.commit(b).unwrap();
    drop(s);
    let s = store(fx);
    let mut reply = MessageFeatures {
        subject: "Something else entirely".into(),
        ..Default::default()
    };
    reply.add_body_features(&format!("Fine.\n\nOn Monday, Ann wrote:\n> {text}"));
    let idx = s.lookup(&lookup_keys(&reply, &settings)).unwrap();
    assert!(!idx.by_shingle.is_empty());
    assert_eq!(idx.candidates.len(), 1);
    assert_eq!(idx.candidates[0].activity, a.id);
    assert_eq!(
        idx.candidates[0].regarding.as_ref().unwrap().to_string(),
        "case:1"
    );
}

pub fn moving_into_another_tracked_folder_re_points_leaving_one_does_not<F: Fixture>(fx: &F) {
    let s = store(fx);
    let mut a = activity("m", "1", Some("p@x"), "h1");
    a.method = CorrelationMethod::Folder;
    let id = match s.commit(batch(vec![a])).unwrap()[0] {
        CommitOutcome::Inserted(i) => i,
        o => panic!("{o:?}"),
    };
    let mut moved = activity("m", "7", Some("p@x"), "h1");
    moved.source.folder = "INBOX/Contoso".into();
    moved.method = CorrelationMethod::Folder;
    moved.regarding = Some("account:contoso".parse().unwrap());
    assert_eq!(
        s.commit(batch(vec![moved])).unwrap(),
        vec![CommitOutcome::Duplicate(id)]
    );
    let after = s.activity(id).unwrap().unwrap();
    assert_eq!(after.regarding.unwrap().to_string(), "account:contoso");
    assert!(after
        .reasons
        .contains(&"moved to tracked folder \"INBOX/Contoso\"".to_string()));
    assert_eq!(
        s.tracked_by_message_ids(&["p@x".into()]).unwrap()["p@x"]
            .regarding
            .as_ref()
            .unwrap()
            .to_string(),
        "account:contoso"
    );
    // Out of the tracked folder into an untracked one: unchanged.
    let mut left = activity("m", "8", Some("p@x"), "h1");
    left.source.folder = "Archive".into();
    left.regarding = None;
    s.commit(batch(vec![left])).unwrap();
    let after = s.activity(id).unwrap().unwrap();
    assert_eq!(after.regarding.unwrap().to_string(), "account:contoso");
    assert_eq!(after.method, CorrelationMethod::Folder);
}

pub fn positions_and_state_persist_across_reopen<F: Fixture>(fx: &F) {
    {
        let s = store(fx);
        let mut b = batch(vec![activity("m", "1", None, "h")]);
        b.positions.push((
            "m".into(),
            "INBOX".into(),
            FolderPosition {
                uidvalidity: 7,
                next_uid: 2,
                highest_modseq: None,
                seen_count: 1,
                retry: Vec::new(),
                delta_link: None,
            },
        ));
        // The state as before the batch: the commit adds its one insert.
        b.mailbox_state = Some(MailboxState {
            name: "m".into(),
            items_processed: 4,
            ..Default::default()
        });
        s.commit(b).unwrap();
    }
    let s = store(fx);
    assert_eq!(s.folder_positions("m").unwrap()["INBOX"].next_uid, 2);
    assert_eq!(s.mailbox_state("m").unwrap().unwrap().items_processed, 5);
    assert_eq!(
        s.activities(&ActivityQuery {
            mailbox: Some("m".into()),
            limit: 10,
            before: None
        })
        .unwrap()
        .len(),
        1
    );
}

/// `items_processed` counted duplicates and re-scanned copies (a
/// UIDVALIDITY re-scan showed 2,324 processed with 1,314 stored): the
/// state written with a batch counts what its commit inserted, as the
/// metrics do.
pub fn items_processed_counts_only_inserted_activities<F: Fixture>(fx: &F) {
    let s = store(fx);
    let state = |processed, failed| MailboxState {
        name: "m".into(),
        items_processed: processed,
        items_failed: failed,
        ..Default::default()
    };
    let mut b = batch(vec![
        activity("m", "1", Some("a@x"), "h1"),
        activity("m", "2", Some("b@x"), "h2"),
    ]);
    b.mailbox_state = Some(state(0, 0));
    let first = s.commit(b).unwrap();
    assert_eq!(
        Tally::of(&first),
        Tally {
            inserted: 2,
            quarantined: 0
        }
    );
    // A re-scan under a new UIDVALIDITY: the same two emails, one new one,
    // one replayed source and a quarantined message.
    let mut rescanned = activity("m", "1", Some("a@x"), "h1");
    rescanned.source.uidvalidity = 2;
    let mut b = batch(vec![
        rescanned,
        activity("m", "2", Some("b@x"), "h2"),
        activity("m", "3", Some("c@x"), "h3"),
    ]);
    b.items.push(PendingItem::Quarantine(QuarantineEntry {
        id: 0,
        source: activity("m", "4", None, "").source,
        reason: "bad".into(),
        saved_as: String::new(),
        size: 1,
        at: 0,
        class: None,
    }));
    b.mailbox_state = Some(state(2, 0));
    let outcomes = s.commit(b).unwrap();
    let stored = s.mailbox_state("m").unwrap().unwrap();
    assert_eq!((stored.items_processed, stored.items_failed), (3, 1));
    assert_eq!(
        stored.items_processed,
        s.count_activities(Some("m")).unwrap()
    );
    let mut mine = state(2, 0);
    Tally::of(&outcomes).add_to(&mut mine);
    assert_eq!(mine, stored);
}

/// The same Message-ID delivered to two mailboxes, one copy with a
/// disclaimer footer (another content hash): one activity, listed under
/// both mailboxes, with both sources.
pub fn one_email_in_two_mailboxes_with_different_bytes_is_one_activity<F: Fixture>(fx: &F) {
    let s = store(fx);
    let mut original = activity("alice", "1", Some("one@x"), "plain");
    original.from = vec!["c@customer.example".into()];
    original.sent_at = Some(1_767_000_000);
    original.subject = "Quote  request".into();
    let id = match s.commit(batch(vec![original.clone()])).unwrap()[0] {
        CommitOutcome::Inserted(i) => i,
        o => panic!("{o:?}"),
    };
    let mut footer = original.clone();
    footer.mailbox = "queue".into();
    footer.source.mailbox = "queue".into();
    footer.content_hash = "with-footer".into();
    footer.subject = "Quote request".into();
    assert_eq!(
        s.commit(batch(vec![footer.clone()])).unwrap(),
        vec![CommitOutcome::Duplicate(id)]
    );
    let a = s.activity(id).unwrap().unwrap();
    assert_eq!(a.mailboxes(), vec!["alice", "queue"]);
    assert_eq!(a.also_seen_as, vec![footer.source.clone()]);
    assert_eq!(s.count_activities(None).unwrap(), 1);
    for m in ["alice", "queue"] {
        let listed = s
            .activities(&ActivityQuery {
                mailbox: Some(m.into()),
                limit: 10,
                before: None,
            })
            .unwrap();
        assert_eq!(listed.len(), 1, "{m}");
        assert_eq!(listed[0].id, id);
    }
    // Another sender, date or subject under the same Message-ID: another email.
    for change in 0..3 {
        let mut other = footer.clone();
        other.source.uid = format!("other{change}");
        match change {
            0 => other.from = vec!["someone@else.example".into()],
            1 => other.sent_at = Some(1_767_000_999),
            _ => other.subject = "Something else".into(),
        }
        assert!(matches!(
            s.commit(batch(vec![other])).unwrap()[0],
            CommitOutcome::Inserted(_)
        ));
    }
}

/// Follow-ups are written with their batch, survive a reopen (a crash
/// before they were carried out), and a later commit removes them;
/// one owed again in that same commit stays.
pub fn follow_ups_commit_with_their_batch_and_are_cleared_later<F: Fixture>(fx: &F) {
    use crate::model::AckKind;
    let follow_up = |mailbox: &str, uid: &str, kind| FollowUp {
        source: activity(mailbox, uid, None, "").source,
        kind,
        recorded_at: 7,
        failures: 0,
        last_error: None,
    };
    {
        let s = store(fx);
        let mut b = batch(vec![
            activity("m", "1", Some("a@x"), "h1"),
            activity("m", "2", Some("b@x"), "h2"),
        ]);
        b.follow_ups = vec![
            follow_up("m", "1", AckKind::Recorded),
            follow_up("m", "2", AckKind::Failed),
            follow_up("m2", "1", AckKind::Recorded),
        ];
        s.commit(b).unwrap();
    }
    let s = store(fx);
    let owed = s.follow_ups("m").unwrap();
    assert_eq!(
        owed,
        vec![
            follow_up("m", "1", AckKind::Recorded),
            follow_up("m", "2", AckKind::Failed)
        ]
    );
    assert_eq!(s.follow_ups("m2").unwrap().len(), 1);
    // Done: 1 and 2; 2 is owed again by the same commit, 3 is new.
    let mut again = follow_up("m", "2", AckKind::Failed);
    again.failures = 1;
    let b = CommitBatch {
        follow_ups_done: vec![owed[0].source.clone(), owed[1].source.clone()],
        follow_ups: vec![again.clone(), follow_up("m", "3", AckKind::Recorded)],
        ..Default::default()
    };
    s.commit(b).unwrap();
    assert_eq!(
        s.follow_ups("m").unwrap(),
        vec![again, follow_up("m", "3", AckKind::Recorded)]
    );
    assert_eq!(s.follow_ups("m2").unwrap().len(), 1);
}

pub fn automatic_marks_count_by_pair_and_time_and_survive_a_reopen<F: Fixture>(fx: &F) {
    let s = store(fx);
    let mut b = batch(vec![
        activity("m", "1", Some("a1@x"), "h1"),
        activity("m", "2", Some("a2@x"), "h2"),
        activity("m", "3", Some("a3@x"), "h3"),
        activity("m", "4", Some("a4@x"), "h4"),
    ]);
    let ids: Vec<u64> = (0..4).map(|_| s.allocate_id().unwrap()).collect();
    for (item, id) in b.items.iter_mut().zip(&ids) {
        if let PendingItem::Activity(a) = item {
            a.id = *id;
        }
    }
    let mark = |pair: &str, at: i64, activity: u64| AutomaticMark {
        mailbox: "m".into(),
        pair: pair.into(),
        at,
        activity,
    };
    b.automatic = vec![
        mark("a@x b@x", -5, ids[0]),
        mark("a@x b@x", 100, ids[1]),
        mark("a@x b@x", 200, ids[2]),
        mark("a@x b@xx", 150, ids[3]),
        // Not an activity of this batch: not written.
        mark("a@x b@x", 300, 999_999),
    ];
    s.commit(b).unwrap();
    drop(s);
    let s = store(fx);
    assert_eq!(s.automatic_since("m", "a@x b@x", -10, 10).unwrap(), 3);
    assert_eq!(s.automatic_since("m", "a@x b@x", 100, 10).unwrap(), 2);
    assert_eq!(s.automatic_since("m", "a@x b@x", 101, 10).unwrap(), 1);
    assert_eq!(s.automatic_since("m", "a@x b@x", -10, 2).unwrap(), 2);
    assert_eq!(s.automatic_since("m", "a@x b@xx", 0, 10).unwrap(), 1);
    assert_eq!(s.automatic_since("other", "a@x b@x", 0, 10).unwrap(), 0);
}

/// A quarantined source is seen; quarantining it again (a replay) keeps its
/// one entry; the listing is newest first.
pub fn quarantine_is_keyed_by_source_and_listed_newest_first<F: Fixture>(fx: &F) {
    let s = store(fx);
    let entry = |uid: &str| QuarantineEntry {
        id: 0,
        source: activity("m", uid, None, "").source,
        reason: format!("bad {uid}"),
        saved_as: String::new(),
        size: 1,
        at: 0,
        class: Some("too_large".into()),
    };
    let b = CommitBatch {
        items: vec![
            PendingItem::Quarantine(entry("1")),
            PendingItem::Quarantine(entry("2")),
            PendingItem::Quarantine(entry("1")),
        ],
        ..Default::default()
    };
    let out = s.commit(b).unwrap();
    let (CommitOutcome::Quarantined(q1), CommitOutcome::Quarantined(q2)) = (out[0], out[1]) else {
        panic!("{out:?}");
    };
    assert_ne!(q1, q2);
    assert_eq!(
        out[2],
        CommitOutcome::Quarantined(q1),
        "same source, same entry"
    );
    let again = s
        .commit(CommitBatch {
            items: vec![PendingItem::Quarantine(entry("2"))],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(again, vec![CommitOutcome::Quarantined(q2)]);
    assert!(s.is_seen(&entry("1").source).unwrap());
    assert!(!s.is_seen(&entry("3").source).unwrap());
    let listed = s.quarantined(10).unwrap();
    assert_eq!(
        listed.iter().map(|q| q.id).collect::<Vec<_>>(),
        vec![q2, q1]
    );
    assert_eq!(listed[1].reason, "bad 1");
    assert_eq!(s.quarantined(1).unwrap().len(), 1);
    assert_eq!(s.count_activities(None).unwrap(), 0);
}

/// Listings run newest first, per mailbox (an activity seen in a second
/// mailbox is listed there too) or over all, paged by `before`.
pub fn activities_list_newest_first_per_mailbox_and_page<F: Fixture>(fx: &F) {
    let s = store(fx);
    let mut ids = Vec::new();
    for n in 0..6 {
        let mailbox = if n % 2 == 0 { "even" } else { "odd" };
        let a = activity(mailbox, &n.to_string(), Some(&format!("{n}@x")), "h");
        ids.push(inserted(s.commit(batch(vec![a])).unwrap()[0]));
    }
    // The first "odd" email, delivered to "even" too.
    let copy = activity("even", "copy", Some("1@x"), "h");
    assert_eq!(
        s.commit(batch(vec![copy])).unwrap(),
        vec![CommitOutcome::Duplicate(ids[1])]
    );
    let list = |mailbox: Option<&str>, before: Option<u64>, limit: usize| -> Vec<u64> {
        s.activities(&ActivityQuery {
            mailbox: mailbox.map(str::to_string),
            before,
            limit,
        })
        .unwrap()
        .iter()
        .map(|a| a.id)
        .collect()
    };
    let newest_first: Vec<u64> = ids.iter().rev().copied().collect();
    assert_eq!(list(None, None, 0), newest_first);
    assert_eq!(list(None, None, 2), newest_first[..2].to_vec());
    assert_eq!(list(None, Some(ids[4]), 2), vec![ids[3], ids[2]]);
    assert_eq!(list(Some("odd"), None, 10), vec![ids[5], ids[3], ids[1]]);
    assert_eq!(
        list(Some("even"), None, 10),
        vec![ids[4], ids[2], ids[1], ids[0]]
    );
    assert_eq!(list(Some("even"), Some(ids[2]), 1), vec![ids[1]]);
    assert_eq!(list(Some("even"), Some(ids[0]), 10), Vec::<u64>::new());
    assert_eq!(list(Some("none"), None, 10), Vec::<u64>::new());
    assert_eq!(s.count_activities(None).unwrap(), 6);
    assert_eq!(s.count_activities(Some("even")).unwrap(), 4);
    assert_eq!(s.count_activities(Some("odd")).unwrap(), 3);
}
