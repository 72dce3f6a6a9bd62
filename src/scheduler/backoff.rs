//! Delays: the retry back-off after transient failures, and the stretched
//! poll interval of mailboxes that keep finding nothing.

use std::time::Duration;

use crate::config::Profile;

/// Retry policy for transient failures: exponential with jitter, capped.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Fraction of the delay added or removed at random (0–1), so mailboxes of
    /// one failing server do not retry in lockstep.
    pub jitter: f64,
}

/// First retry delay; the delay doubles from here up to the profile's cap.
const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Default cap (the profile's `retry_backoff_max` default).
const BACKOFF_MAX: Duration = Duration::from_secs(900);

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: BACKOFF_BASE,
            max: BACKOFF_MAX,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The profile's policy: capped at its `retry_backoff_max`.
    pub fn for_profile(profile: &Profile) -> Self {
        let max = profile.retry_backoff_max;
        Backoff {
            base: BACKOFF_BASE.min(max),
            max,
            ..Backoff::default()
        }
    }

    /// Delay before retry number `attempt` (1-based). Never above `max`: at
    /// the cap the jitter only shortens.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        let spread = (fastrand::f64() * 2.0 - 1.0) * self.jitter;
        raw.mul_f64((1.0 + spread).max(0.0)).min(self.max)
    }
}

/// Empty cycles in a row per step of the idle back-off: after 10 polls that
/// found nothing the interval grows by one more `poll_interval`.
pub const IDLE_STEP: u32 = 10;

/// Spread of the poll wait (up to 10 % longer, never shorter: the poll
/// interval is a minimum), so mailboxes started together drift apart
/// instead of polling in lockstep for ever.
pub const POLL_JITTER: f64 = 0.1;

/// Poll interval, stretched for mailboxes that keep finding nothing: one more
/// `base` every [`IDLE_STEP`] empty cycles, up to `cap` × `base` (the
/// profile's `idle_backoff_cap`; 1 = no back-off). New mail or a push
/// wake-up resets `empty_cycles`, so the mailbox snaps back to `base`.
pub(super) fn idle_interval(base: Duration, empty_cycles: u32, cap: u32) -> Duration {
    let factor = 1 + (empty_cycles / IDLE_STEP).min(cap.max(1) - 1);
    base * factor
}

/// The first wait after a (re)start: 1–2 × `base` at random, so mailboxes
/// started together (a daemon start) spread over a whole interval instead
/// of polling in one burst; never shorter than `base`.
pub(super) fn first_wait(base: Duration) -> Duration {
    base.mul_f64(1.0 + fastrand::f64())
}

/// The longest a healthy mailbox waits between two polls: the idle
/// back-off's cap (or the first wait after a start, up to 2 × `base`),
/// with its jitter. A mailbox quiet for longer is not just idle.
pub fn longest_poll_wait(base: Duration, cap: u32) -> Duration {
    (base * cap.max(2)).mul_f64(1.0 + POLL_JITTER)
}

/// `wait` made up to [`POLL_JITTER`] longer at random.
pub(super) fn poll_jitter(wait: Duration) -> Duration {
    wait.mul_f64(1.0 + fastrand::f64() * POLL_JITTER)
}

/// True when a wait of `wanted` that took `took` ended well before its time:
/// the connector was woken by a push (IMAP IDLE), not by its timer.
pub(super) fn woken_early(took: Duration, wanted: Duration) -> bool {
    let margin = (wanted / 20).max(Duration::from_millis(500));
    took + margin < wanted
}
