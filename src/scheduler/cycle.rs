//! One sync cycle of a mailbox: owed follow-ups, then batches (fetch,
//! pipeline, commit, follow-ups).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::alerts::kind;
use crate::connector::{Ack, AckKind, Connector};
use crate::error::Disposition;
use crate::model::{self, AlertLevel, FollowUp, MailboxState, SourceKey};
use crate::pipeline::{self, ItemResult, PipelineContext};
use crate::store::{CommitBatch, CommitOutcome, Tally};
use crate::telemetry;

use tokio::sync::OwnedSemaphorePermit;

use super::runtime::ConnectionQueue;
use super::task::{CycleError, MailboxTask};

impl MailboxTask {
    /// One cycle outside any turn: tests drive single cycles with it.
    #[cfg(test)]
    pub(super) async fn cycle<C: Connector>(
        &self,
        connector: &mut C,
        state: &mut MailboxState,
    ) -> Result<Turn, CycleError> {
        let queue = self.runtime.connection_queue(
            &self.profile.name,
            usize::from(self.profile.max_concurrent_connections),
        );
        self.cycle_in_turn(connector, state, &queue, &mut None)
            .await
    }

    /// One sync cycle: first the follow-ups still owed (by an earlier cycle, or
    /// by a process that died between a commit and its follow-ups), then
    /// batches until the source has nothing more, shutdown, or the end of
    /// the mailbox's turn (see [`TURN_LIMIT`]), within the profile's
    /// connection queue; `backlog` is the mailbox's backlog slot, if it
    /// holds one (taken here when it goes on past a batch while others wait).
    pub(super) async fn cycle_in_turn<C: Connector>(
        &self,
        connector: &mut C,
        state: &mut MailboxState,
        queue: &ConnectionQueue,
        backlog: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Turn, CycleError> {
        let mut changes = FollowUpChanges::default();
        let owed = self.store.follow_ups(&self.mailbox.name)?;
        if !owed.is_empty() {
            let acks = owed
                .iter()
                .map(|f| Ack {
                    source: f.source.clone(),
                    kind: f.kind,
                })
                .collect();
            self.follow_up(connector, acks, owed, &mut changes).await;
        }
        let result = self
            .sync_batches(connector, state, &mut changes, queue, backlog)
            .await;
        // What the last follow-ups did, unless a batch commit carried it already.
        if !changes.is_empty() {
            let commit = CommitBatch {
                follow_ups: changes.updated,
                follow_ups_done: changes.done,
                ..Default::default()
            };
            let store = self.store.clone();
            let settled = tokio::task::spawn_blocking(move || store.commit(commit))
                .await
                .map_err(|e| CycleError::Join(e.to_string()))
                .and_then(|r| r.map_err(CycleError::from));
            if let Err(e) = settled {
                // Not lost: the follow-ups stay recorded and are replayed (idempotent).
                tracing::warn!(mailbox = %self.mailbox.name, error = %e, "cannot clear completed follow-ups");
            }
        }
        result
    }

    /// The batches of a cycle. Each commit also records the follow-ups its
    /// messages are owed, and clears those done since the last commit.
    pub(super) async fn sync_batches<C: Connector>(
        &self,
        connector: &mut C,
        state: &mut MailboxState,
        changes: &mut FollowUpChanges,
        queue: &ConnectionQueue,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Turn, CycleError> {
        let turn_started = tokio::time::Instant::now();
        // Built at the first message: an idle cycle needs none.
        let mut ctx: Option<Arc<PipelineContext>> = None;
        let mut found = 0u64;
        loop {
            let batch = connector.fetch().await?;
            for n in &batch.notices {
                self.alert(&format!("{}:{}", kind::CONNECTOR, n.what), n.level, &n.text);
            }
            let backlog = batch.backlog;
            self.runtime
                .update(&self.mailbox.name, |m| m.backlog = backlog);
            metrics::gauge!(telemetry::BACKLOG, "mailbox" => self.mailbox.name.clone())
                .set(backlog as f64);
            if batch.messages.is_empty() && batch.positions.is_empty() {
                return Ok(Turn {
                    found,
                    yielded: false,
                });
            }
            let more = batch.more;
            let messages = batch.messages;
            let (mut commit, results) = if messages.is_empty() {
                // Positions only: nothing for the pipeline (no blocking hop).
                (CommitBatch::default(), Vec::new())
            } else {
                let store = self.store.clone();
                let ctx2 = ctx
                    .get_or_insert_with(|| {
                        Arc::new(PipelineContext::for_mailbox(&self.config, &self.mailbox))
                    })
                    .clone();
                tokio::task::spawn_blocking(move || {
                    pipeline::process(store.as_ref(), &ctx2, &messages, model::now())
                })
                .await
                .map_err(|e| CycleError::Join(e.to_string()))??
            };
            commit.positions = batch
                .positions
                .into_iter()
                .map(|(f, p)| (self.mailbox.name.clone(), f, p))
                .collect();

            let acks: Vec<Ack> = results
                .iter()
                .map(|(source, r)| Ack {
                    source: source.clone(),
                    kind: if matches!(r, ItemResult::Quarantined { .. }) {
                        AckKind::Failed
                    } else {
                        AckKind::Recorded
                    },
                })
                .collect();
            let now = model::now();
            let owed: Vec<FollowUp> = acks
                .iter()
                .filter(|a| connector.wants_follow_up(a.kind))
                .map(|a| FollowUp {
                    source: a.source.clone(),
                    kind: a.kind,
                    recorded_at: now,
                    failures: 0,
                    last_error: None,
                })
                .collect();
            let recorded = results
                .iter()
                .filter(|(_, r)| matches!(r, ItemResult::Correlated { .. }))
                .count() as u64;
            commit.follow_ups = std::mem::take(&mut changes.updated);
            commit.follow_ups.extend(owed.iter().cloned());
            commit.follow_ups_done = std::mem::take(&mut changes.done);
            // The store adds this batch's tally to the counters it writes.
            commit.mailbox_state = Some(state.clone());
            let store = self.store.clone();
            let outcomes = tokio::task::spawn_blocking(move || store.commit(commit))
                .await
                .map_err(|e| CycleError::Join(e.to_string()))??;
            // The same tally for our copy, so it matches what was written.
            Tally::of(&outcomes).add_to(state);
            let live = state.clone();
            self.runtime.update(&self.mailbox.name, |m| m.state = live);
            found += recorded;
            self.record_metrics(&results, &outcomes);

            // Alerts for what the commit recorded, without waiting on the
            // server's follow-ups.
            for notice in pipeline::notices(&results) {
                self.alert(kind::PIPELINE_NOTICE, AlertLevel::Warning, notice);
            }
            for (source, r) in &results {
                if let ItemResult::Quarantined { reason, class } = r {
                    // One alert per mailbox and class, counting the messages.
                    self.alert(
                        &format!("{}:{}", kind::QUARANTINE, class.as_str()),
                        AlertLevel::Warning,
                        &format!(
                            "messages quarantined that {}; latest: message {source}: {reason} (GET /api/v1/quarantine lists them; retry with POST /api/v1/quarantine/{{id}}/retry)",
                            class.describe()
                        ),
                    );
                }
            }
            #[cfg(feature = "fault-injection")]
            if !owed.is_empty() {
                crate::fault::committed_with_follow_ups();
            }
            self.follow_up(connector, acks, owed, changes).await;
            if !more || self.cancel.is_cancelled() {
                return Ok(Turn {
                    found,
                    yielded: false,
                });
            }
            // Fairness: while others wait (for a connection or a backlog
            // slot), a mailbox goes on past a batch only with a backlog slot
            // (half the profile's connections) and for at most TURN_LIMIT;
            // then it gives its connection back and queues again behind
            // them (FIFO).
            if queue.contended() {
                if slot.is_none() {
                    *slot = queue.try_backlog_slot();
                }
                if slot.is_some() && turn_started.elapsed() < TURN_LIMIT {
                    continue;
                }
                return Ok(Turn {
                    found,
                    yielded: true,
                });
            }
        }
    }

    /// Carries out follow-ups whose records (`owed`) are committed, and notes
    /// in `changes` what the next commit clears or updates. Never fails the
    /// cycle: what did not happen stays recorded and is tried again next
    /// cycle; a follow-up refused [`MAX_FOLLOW_UP_FAILURES`] times for a
    /// permanent reason is given up with a Warning, so it cannot pin the
    /// mailbox.
    pub(super) async fn follow_up<C: Connector>(
        &self,
        connector: &mut C,
        acks: Vec<Ack>,
        owed: Vec<FollowUp>,
        changes: &mut FollowUpChanges,
    ) {
        let report = match connector.acknowledge(acks).await {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(mailbox = %self.mailbox.name, error = %e, pending = owed.len(), "follow-ups failed; they are retried next cycle");
                return;
            }
        };
        let failed: HashMap<&SourceKey, (&str, Disposition)> = report
            .failed
            .iter()
            .map(|(s, e, d)| (s, (e.as_str(), *d)))
            .collect();
        let obsolete: HashMap<&SourceKey, &str> = report
            .obsolete
            .iter()
            .map(|(s, why)| (s, why.as_str()))
            .collect();
        let mut dropped: BTreeMap<&str, usize> = BTreeMap::new();
        for mut f in owed {
            if let Some(why) = obsolete.get(&f.source) {
                *dropped.entry(why).or_default() += 1;
                changes.done.push(f.source);
                continue;
            }
            let Some((error, disposition)) = failed.get(&f.source).copied() else {
                changes.done.push(f.source);
                continue;
            };
            if disposition == Disposition::Transient {
                // Retried as it is: an outage must not use up its attempts.
                continue;
            }
            f.failures += 1;
            f.last_error = Some(error.to_string());
            if f.failures >= MAX_FOLLOW_UP_FAILURES {
                self.alert(
                    kind::FOLLOW_UP,
                    AlertLevel::Warning,
                    &format!(
                        "gave up the follow-up ({}) on message {} after {} failed attempts: {error}",
                        follow_up_action(f.kind),
                        f.source,
                        f.failures
                    ),
                );
                changes.done.push(f.source);
            } else {
                tracing::warn!(mailbox = %self.mailbox.name, source = %f.source, attempt = f.failures, %error, "follow-up failed; retried next cycle");
                changes.updated.push(f);
            }
        }
        for (why, n) in dropped {
            self.alert(
                &format!("{}:dropped", kind::FOLLOW_UP),
                AlertLevel::Information,
                &format!("{n} follow-up(s) on processed messages dropped: {why}"),
            );
        }
    }

    pub(super) fn record_metrics(
        &self,
        results: &[(model::SourceKey, ItemResult)],
        outcomes: &[CommitOutcome],
    ) {
        let m = self.mailbox.name.clone();
        let mut outcome_iter = outcomes.iter();
        for (_, r) in results {
            match r {
                ItemResult::AlreadySeen => {}
                ItemResult::Quarantined { .. } => {
                    outcome_iter.next();
                    metrics::counter!(telemetry::FAILED, "mailbox" => m.clone()).increment(1);
                }
                ItemResult::Correlated { decision, .. } => match outcome_iter.next() {
                    Some(CommitOutcome::Inserted(_)) => {
                        metrics::counter!(telemetry::PROCESSED, "mailbox" => m.clone())
                            .increment(1);
                        metrics::counter!(telemetry::CORRELATIONS, "method" => decision.method.as_str()).increment(1);
                    }
                    Some(CommitOutcome::Duplicate(_)) => {
                        metrics::counter!(telemetry::DUPLICATES, "mailbox" => m.clone())
                            .increment(1);
                    }
                    _ => {}
                },
            }
        }
    }
}

/// How long one mailbox may keep a connection permit for batch after batch
/// while others wait for one (see [`MailboxTask::sync_batches`]).
pub const TURN_LIMIT: Duration = Duration::from_secs(30);

/// How a cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Turn {
    /// New messages recorded.
    pub found: u64,
    /// The source has more, but the turn ended to let queued mailboxes in.
    pub yielded: bool,
}

/// Permanent failures after which a follow-up is given up with a Warning
/// alert: a keyword or move the server keeps refusing must not be retried
/// forever.
pub(super) const MAX_FOLLOW_UP_FAILURES: u32 = 5;

/// Follow-up records the next commit removes (`done`: carried out, obsolete
/// or given up) or rewrites (`updated`: a failure counted).
#[derive(Debug, Default)]
pub(super) struct FollowUpChanges {
    done: Vec<SourceKey>,
    updated: Vec<FollowUp>,
}

impl FollowUpChanges {
    pub(super) fn is_empty(&self) -> bool {
        self.done.is_empty() && self.updated.is_empty()
    }
}

/// What a follow-up of this kind does, for alerts.
pub(super) fn follow_up_action(kind: AckKind) -> &'static str {
    match kind {
        AckKind::Recorded => "keyword or delete",
        AckKind::Failed => "move to the failed-mail folder",
    }
}
