//! Error disposition: the one place that decides whether a failure is retried or
//! disables a mailbox.
//!
//! Every leaf error type in the crate (connector, store, config…) implements
//! [`Classify`]; the scheduler only ever looks at [`Disposition`], so the policy
//! ("transient → back off and retry, permanent → disable + alert") is modelled once.

use std::fmt;

/// What the lifecycle layer should do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Network trouble, time-outs, server busy (`[UNAVAILABLE]`): retry with back-off.
    Transient,
    /// Wrong credentials, invalid certificate, missing folder: disable the mailbox and alert.
    Permanent,
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Disposition::Transient => "transient",
            Disposition::Permanent => "permanent",
        })
    }
}

/// Implemented by every error that can end a sync cycle.
pub trait Classify: std::error::Error {
    /// Whether the failure is worth retrying.
    fn disposition(&self) -> Disposition;
}
