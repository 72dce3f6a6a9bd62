//! The one test suite every storage backend must pass unchanged: one
//! function per rule, each generic over a [`Fixture`] that opens (and
//! reopens) the backend under test.
//!
//! Always compiled, so a backend's tests inside or outside this crate run
//! the very same suite (`tests/store_conformance.rs` runs it for
//! [`SledBackend`](crate::store::SledBackend) and
//! [`MemBackend`]; a PostgreSQL backend adds a [`Fixture`] and one line).
//! Every function is generic, so none of it is in the daemon's binary
//! unless a test instantiates it. It is test code: it panics on a broken
//! rule (hence the `unwrap`s, allowed here only).
//!
//! ```ignore
//! struct PgFixture { /* a scratch database */ }
//! impl Fixture for PgFixture { type Backend = PgBackend; fn open(&self) -> PgBackend { … } }
//! mod postgres { crm_mailsync::store_conformance_suite!(super::PgFixture::new()); }
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod alert_retention;
mod alerts;
mod backend;
mod events;
mod ingest;
mod records;

pub use alert_retention::*;
pub use alerts::*;
pub use backend::*;
pub use events::*;
pub use ingest::*;
pub use records::*;

use crate::model::{CorrelationMethod, Direction, EmailActivity, SourceKey};
use crate::store::kv::{KvBackend, MemBackend};
use crate::store::{CommitBatch, CommitOutcome, KvStore, PendingItem};

/// Opens the backend under test.
pub trait Fixture {
    type Backend: KvBackend;

    /// The first call gives an empty backend; every later one reopens
    /// what the earlier ones wrote (the suite drops every store over the
    /// previous one first), as after a restart.
    fn open(&self) -> Self::Backend;
}

/// [`MemBackend`]: reopening shares the map (a fresh [`KvStore`] over it
/// starts with empty caches, as after a restart).
#[derive(Default)]
pub struct MemFixture(MemBackend);

impl Fixture for MemFixture {
    type Backend = MemBackend;

    fn open(&self) -> MemBackend {
        self.0.clone()
    }
}

/// A store over the fixture's backend (a fresh one, or reopened).
pub fn store<F: Fixture>(f: &F) -> KvStore<F::Backend> {
    KvStore::new(f.open()).expect("open the store")
}

/// A tracked incoming email in `mailbox`'s INBOX, regarding `case:1`.
pub fn activity(mailbox: &str, uid: &str, mid: Option<&str>, hash: &str) -> EmailActivity {
    EmailActivity {
        id: 0,
        mailbox: mailbox.into(),
        source: SourceKey {
            mailbox: mailbox.into(),
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid: uid.into(),
        },
        message_ids: mid.map(|m| vec![m.to_string()]).unwrap_or_default(),
        in_reply_to: vec![],
        references: vec![],
        direction: Direction::Incoming,
        subject: "s".into(),
        from: vec![],
        to: vec![],
        cc: vec![],
        sent_at: None,
        received_at: 0,
        regarding: Some("case:1".parse().unwrap()),
        method: CorrelationMethod::None,
        score: 0.0,
        reasons: vec![],
        correlated_with: None,
        content_hash: hash.into(),
        size: 1,
        also_seen_as: vec![],
        forwarded_by: None,
        automatic: None,
        no_reply: false,
        parties: vec![],
        send: None,
    }
}

/// A batch of these activities and nothing else.
pub fn batch(items: Vec<EmailActivity>) -> CommitBatch {
    CommitBatch {
        items: items
            .into_iter()
            .map(|a| PendingItem::Activity(Box::new(a)))
            .collect(),
        ..Default::default()
    }
}

/// The id of an [`CommitOutcome::Inserted`].
pub fn inserted(o: CommitOutcome) -> u64 {
    match o {
        CommitOutcome::Inserted(id) => id,
        other => panic!("expected Inserted, got {other:?}"),
    }
}

/// One `#[test]` per rule of the suite, each with a fresh fixture from
/// `$fixture` (an expression evaluated per test).
#[macro_export]
macro_rules! store_conformance_suite {
    ($fixture:expr) => {
        $crate::store_conformance_suite!(@rules $fixture;
            backend_batch_is_all_or_nothing,
            backend_scans_run_in_key_order_within_their_bounds,
            backend_data_and_ids_survive_a_reopen,
            dedupes_by_source_then_message_id_and_hash,
            one_email_in_two_mailboxes_with_different_bytes_is_one_activity,
            moving_into_another_tracked_folder_re_points_leaving_one_does_not,
            quarantine_is_keyed_by_source_and_listed_newest_first,
            activities_list_newest_first_per_mailbox_and_page,
            message_ids_resolve_up_to_the_first_tracked_one,
            correlation_indexes_are_written_with_their_activity_and_resolved,
            cached_smart_matching_lists_read_as_a_fresh_store_does,
            fingerprint_shingles_find_a_quoted_parent_under_another_subject,
            positions_and_state_persist_across_reopen,
            items_processed_counts_only_inserted_activities,
            follow_ups_commit_with_their_batch_and_are_cleared_later,
            automatic_marks_count_by_pair_and_time_and_survive_a_reopen,
            alerts_aggregate,
            an_alert_escalates_in_place_and_loses_its_acknowledgement,
            resolved_alert_stays_listed_and_a_repeat_opens_a_new_one,
            profile_alerts_are_their_own_subject_and_queries_filter,
            an_alert_that_becomes_an_error_is_journaled_with_its_write,
            sent_alert_events_are_pruned_and_seqs_survive_a_reopen,
            the_alert_journal_keeps_at_most_its_cap,
            resolved_alerts_past_their_age_are_pruned_open_ones_never,
            the_resolved_alert_cap_keeps_the_newest_resolved,
            the_open_alert_index_follows_every_alert_write,
            a_store_written_before_the_alert_indexes_gets_them_at_open,
            one_created_event_per_new_activity_in_commit_order,
            duplicates_and_re_points_append_updated_events_with_changes,
            seqs_stay_gapless_across_writers_and_a_reopen,
            a_pending_delivery_per_consumer_and_none_without,
            delivery_outcomes_apply_in_one_batch,
            update_activity_writes_the_activity_and_its_event,
            watchers_see_every_new_seq,
            records_upsert_counts_and_keeps_the_address_index,
            records_list_by_kind_and_page,
            unresolved_parties_are_indexed_by_address,
        );
    };
    (@rules $fixture:expr; $($rule:ident),* $(,)?) => {
        $(
            #[test]
            fn $rule() {
                let fixture = $fixture;
                $crate::store::conformance::$rule(&fixture);
            }
        )*
    };
}

#[cfg(test)]
mod memory {
    crate::store_conformance_suite!(super::MemFixture::default());
}
