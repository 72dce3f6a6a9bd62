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

/// Poll interval, stretched for mailboxes that keep finding nothing (up to 4×).
pub(super) fn idle_interval(base: Duration, empty_cycles: u32) -> Duration {
    let factor = 1 + (empty_cycles / 10).min(3);
    base * factor
}
