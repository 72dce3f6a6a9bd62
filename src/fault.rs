//! Test-only fault injection: compiled only with the `fault-injection`
//! feature (which the `real-servers` test feature turns on), never in a
//! normal build. Tests start the daemon with an environment variable that
//! makes it die at a chosen point, to prove what survives a crash there.

use std::sync::atomic::{AtomicU64, Ordering};

/// `CRM_MAILSYNC_FAULT_KILL_AFTER_COMMIT=N`: the process SIGKILLs itself
/// right after its N-th commit that recorded follow-ups, before any of them
/// is carried out.
pub const KILL_AFTER_COMMIT: &str = "CRM_MAILSYNC_FAULT_KILL_AFTER_COMMIT";

static COMMITS_WITH_FOLLOW_UPS: AtomicU64 = AtomicU64::new(0);

/// Called between a commit that recorded follow-ups and those follow-ups.
pub fn committed_with_follow_ups() {
    let Some(n) = std::env::var(KILL_AFTER_COMMIT)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return;
    };
    if COMMITS_WITH_FOLLOW_UPS.fetch_add(1, Ordering::SeqCst) + 1 == n {
        kill_self();
    }
}

/// `CRM_MAILSYNC_FAULT_KILL_AFTER_DELIVERY=N`: the process SIGKILLs itself
/// right after the CRM accepted its N-th delivered event, before the outbox
/// records it: the event must be delivered again (same id) on restart.
pub const KILL_AFTER_DELIVERY: &str = "CRM_MAILSYNC_FAULT_KILL_AFTER_DELIVERY";

static DELIVERIES: AtomicU64 = AtomicU64::new(0);

/// Called between the CRM's 2xx and `finish_delivery`.
pub fn delivered_before_recording() {
    let Some(n) = std::env::var(KILL_AFTER_DELIVERY)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return;
    };
    if DELIVERIES.fetch_add(1, Ordering::SeqCst) + 1 == n {
        kill_self();
    }
}

/// `CRM_MAILSYNC_FAULT_KILL_AFTER_ALERT_EVENT=N`: the process SIGKILLs
/// itself right after the webhook accepted its N-th alert event, before the
/// alert cursor records it: the event must be sent again (same webhook-id,
/// same body) on restart.
pub const KILL_AFTER_ALERT_EVENT: &str = "CRM_MAILSYNC_FAULT_KILL_AFTER_ALERT_EVENT";

static ALERT_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Called between the webhook's 2xx for an alert event and the cursor write.
pub fn alert_event_sent_before_recording() {
    let Some(n) = std::env::var(KILL_AFTER_ALERT_EVENT)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return;
    };
    if ALERT_EVENTS.fetch_add(1, Ordering::SeqCst) + 1 == n {
        kill_self();
    }
}

/// SIGKILL, as an operator's `kill -9` or the OOM killer would: no
/// destructors, no flush, and no other thread runs on after it (a `kill`
/// subprocess would leave the other mailboxes a few milliseconds).
fn kill_self() -> ! {
    // SAFETY: kill(2) on our own pid takes no pointers; SIGKILL does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
