//! Scheduler: one task per mailbox, each running sync cycles, waiting (poll or
//! push), and backing off on transient errors according to [`Backoff`].
//!
//! The lifecycle rules:
//! * Transient errors are retried forever with capped, jittered back-off
//!   ([`Backoff::for_profile`]). A mailbox without a successful sync for the
//!   profile's `stall_alert_after` gets an Error alert ("not synced since …")
//!   and is named by `/readyz`; both clear on the next success.
//! * A permanent error (login rejected, certificate invalid, folder gone)
//!   disables the mailbox with an Error alert. The task stays alive, waiting
//!   to be re-enabled without a restart: by `POST
//!   /api/v1/mailboxes/{name}/enable` ([`Runtime::request_enable`]) or when the
//!   content of its password or token file changes. Re-enabling runs Test &
//!   Enable again.
//! * [`MailboxTask::supervise`] restarts a task that panicked, with back-off,
//!   an Error alert naming the panic and a restart metric.
//!
//! Follow-ups (keyword, move, delete) are owed from the commit that records
//! their message: the commit writes them, each cycle starts by carrying out
//! what is still owed, and later commits clear what was done. They never fail
//! a cycle; one refused for a permanent reason is retried on the next cycles
//! and given up with a Warning after `MAX_FOLLOW_UP_FAILURES` (5) attempts.

mod backoff;
mod cycle;
mod runtime;
#[cfg(test)]
mod scale_tests;
mod task;
#[cfg(test)]
mod tests;

pub use backoff::{longest_poll_wait, Backoff};
pub use runtime::{ConnectionQueue, EnableError, LiveMailbox, Phase, Runtime};
pub use task::{MailboxTask, WATCH_EVERY};
