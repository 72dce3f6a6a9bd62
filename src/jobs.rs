//! Jobs: long-running operator requests (Test & Enable of one mailbox or of
//! a whole profile) that the admin API starts and answers at once (202),
//! and whose progress `GET /api/v1/jobs/{id}` shows.
//!
//! The registry is in memory: a job lives as long as the daemon (the last
//! [`KEEP_FINISHED`] finished ones are kept); what a job found is also
//! stored on the mailbox state (the Test & Enable results), so nothing an
//! operator needs is lost with the registry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use utoipa::ToSchema;

use crate::model::{self, TestResult, UnixTime};

/// Finished jobs kept for `GET /api/v1/jobs/{id}`; older ones are dropped.
pub const KEEP_FINISHED: usize = 200;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Test & Enable of one mailbox.
    MailboxTest,
    /// Test & Enable of every mailbox of a profile.
    ProfileTest,
}

/// Whether a job is still at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Done,
}

/// What Test & Enable found for one mailbox.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MailboxTestOutcome {
    pub mailbox: String,
    pub incoming: TestResult,
    pub outgoing: TestResult,
    pub act: TestResult,
    /// Whether the mailbox is enabled once the test is done: a disabled
    /// mailbox whose tests passed was enabled; a running one keeps running.
    pub enabled: bool,
    /// What failed and what to do (the text of the Error alert), or why a
    /// mailbox whose tests passed could not be enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MailboxTestOutcome {
    /// Every direction that ran passed, and the mailbox is enabled.
    pub fn succeeded(&self) -> bool {
        let ok = |t: &TestResult| t.status != model::TestStatus::Failure;
        ok(&self.incoming) && ok(&self.outgoing) && ok(&self.act) && self.enabled
    }
}

/// A job as `GET /api/v1/jobs/{id}` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    /// The mailbox or profile tested.
    pub target: String,
    pub state: JobState,
    /// Mailboxes to test.
    pub total: usize,
    /// Mailboxes tested so far.
    pub completed: usize,
    /// Mailboxes whose every direction passed and that are enabled.
    pub succeeded: usize,
    pub failed: usize,
    /// The most connections the job held at once (each counted against the
    /// profile's `max_concurrent_connections`).
    pub peak_connections: usize,
    pub started_at: UnixTime,
    pub finished_at: Option<UnixTime>,
    /// One line for people once the job is done: how many passed, which failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Per mailbox, in the order they finished.
    pub results: Vec<MailboxTestOutcome>,
}

/// Connections a job holds now and at most, counted by [`ConnectionCount::hold`].
#[derive(Debug, Default)]
pub struct ConnectionCount {
    now: AtomicUsize,
    peak: AtomicUsize,
}

/// One connection counted until dropped.
#[derive(Debug)]
pub struct Held<'a>(&'a ConnectionCount);

impl ConnectionCount {
    /// Counts one more connection until the guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Held(self)
    }

    /// The most held at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A job being run: its view and its connection count.
#[derive(Debug)]
pub struct JobHandle {
    job: Mutex<Job>,
    /// The job's connections (shared by its workers).
    pub connections: ConnectionCount,
}

impl JobHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Job> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's id.
    pub fn id(&self) -> String {
        self.lock().id.clone()
    }

    /// The job as it is now.
    pub fn snapshot(&self) -> Job {
        let mut job = self.lock().clone();
        job.peak_connections = self.connections.peak();
        job
    }

    /// Records one mailbox's outcome.
    pub fn record(&self, outcome: MailboxTestOutcome) {
        let mut job = self.lock();
        job.completed += 1;
        if outcome.succeeded() {
            job.succeeded += 1;
        } else {
            job.failed += 1;
        }
        job.results.push(outcome);
    }

    /// Marks the job done, with its summary.
    pub fn finish(&self) {
        let peak = self.connections.peak();
        let mut job = self.lock();
        job.state = JobState::Done;
        job.finished_at = Some(model::now());
        job.peak_connections = peak;
        job.summary = Some(summary(&job));
    }

    /// Whether the job is done.
    pub fn is_done(&self) -> bool {
        self.lock().state == JobState::Done
    }
}

/// "200 mailbox(es) tested: 197 succeeded, 3 failed (a, b, c)".
fn summary(job: &Job) -> String {
    let mut failed: Vec<&str> = job
        .results
        .iter()
        .filter(|r| !r.succeeded())
        .map(|r| r.mailbox.as_str())
        .collect();
    failed.sort_unstable();
    let names = if failed.is_empty() {
        String::new()
    } else if failed.len() <= 20 {
        format!(" ({})", failed.join(", "))
    } else {
        format!(
            " ({}, and {} more)",
            failed[..20].join(", "),
            failed.len() - 20
        )
    };
    let untested = job.total.saturating_sub(job.completed);
    let untested = if untested > 0 {
        format!("; {untested} not tested (the daemon stopped)")
    } else {
        String::new()
    };
    format!(
        "{} of {} mailbox(es) tested: {} succeeded, {} failed{names}{untested}; at most {} connection(s) at once",
        job.completed, job.total, job.succeeded, job.failed, job.peak_connections
    )
}

/// The jobs of this process.
#[derive(Debug)]
pub struct Jobs {
    /// Per-process prefix, so an id from before a restart is not mistaken
    /// for a new job.
    prefix: String,
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<JobHandle>>>,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs {
            prefix: format!("{:08x}", fastrand::u32(..)),
            next: AtomicU64::new(1),
            jobs: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Jobs {
    /// Registers a new running job.
    pub fn start(&self, kind: JobKind, target: &str, total: usize) -> Arc<JobHandle> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let handle = Arc::new(JobHandle {
            job: Mutex::new(Job {
                id: format!("{}-{n}", self.prefix),
                kind,
                target: target.to_string(),
                state: JobState::Running,
                total,
                completed: 0,
                succeeded: 0,
                failed: 0,
                peak_connections: 0,
                started_at: model::now(),
                finished_at: None,
                summary: None,
                results: Vec::new(),
            }),
            connections: ConnectionCount::default(),
        });
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.insert(n, handle.clone());
        // Drop the oldest finished jobs beyond the ones kept.
        let finished: Vec<u64> = jobs
            .iter()
            .filter(|(_, j)| j.is_done())
            .map(|(k, _)| *k)
            .collect();
        for k in finished
            .iter()
            .take(finished.len().saturating_sub(KEEP_FINISHED))
        {
            jobs.remove(k);
        }
        handle
    }

    /// The job with this id, as it is now.
    pub fn get(&self, id: &str) -> Option<Job> {
        let n: u64 = id
            .strip_prefix(&self.prefix)?
            .strip_prefix('-')?
            .parse()
            .ok()?;
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.get(&n).map(|j| j.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TestStatus;

    fn outcome(name: &str, incoming: TestStatus, enabled: bool) -> MailboxTestOutcome {
        MailboxTestOutcome {
            mailbox: name.into(),
            incoming: TestResult {
                status: incoming,
                completed_on: Some(1),
                detail: None,
                held_by: None,
            },
            outgoing: TestResult::default(),
            act: TestResult::default(),
            enabled,
            error: None,
        }
    }

    #[test]
    fn a_job_counts_successes_failures_and_its_peak_connections() {
        let jobs = Jobs::default();
        let job = jobs.start(JobKind::ProfileTest, "p", 3);
        {
            let _a = job.connections.hold();
            let _b = job.connections.hold();
        }
        let _c = job.connections.hold();
        job.record(outcome("m1", TestStatus::Success, true));
        job.record(outcome("m3", TestStatus::Failure, false));
        // Passed, but could not be enabled: a failure.
        job.record(outcome("m2", TestStatus::Success, false));
        job.finish();
        let got = jobs.get(&job.id()).unwrap();
        assert_eq!(got.state, JobState::Done);
        assert_eq!((got.completed, got.succeeded, got.failed), (3, 1, 2));
        assert_eq!(got.peak_connections, 2);
        assert_eq!(
            got.summary.as_deref(),
            Some("3 of 3 mailbox(es) tested: 1 succeeded, 2 failed (m2, m3); at most 2 connection(s) at once")
        );
    }

    #[test]
    fn unknown_and_foreign_job_ids_are_not_found() {
        let jobs = Jobs::default();
        let job = jobs.start(JobKind::MailboxTest, "m", 1);
        assert!(jobs.get(&job.id()).is_some());
        assert!(jobs.get("nope").is_none());
        assert!(jobs.get("00000000-1").is_none() || jobs.prefix == "00000000");
        let other = Jobs::default();
        assert!(other.get(&job.id()).is_none() || other.prefix == jobs.prefix);
    }

    #[test]
    fn only_the_newest_finished_jobs_are_kept() {
        let jobs = Jobs::default();
        let first = jobs.start(JobKind::MailboxTest, "m", 1);
        first.finish();
        let running = jobs.start(JobKind::MailboxTest, "m", 1);
        for _ in 0..KEEP_FINISHED + 1 {
            jobs.start(JobKind::MailboxTest, "m", 1).finish();
        }
        assert!(
            jobs.get(&first.id()).is_none(),
            "the oldest finished job is dropped"
        );
        assert!(
            jobs.get(&running.id()).is_some(),
            "a running job is never dropped"
        );
    }
}
