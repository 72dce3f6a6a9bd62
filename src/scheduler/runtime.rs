//! The shared runtime view of every mailbox task (admin API, readiness) and
//! the re-enable wake-ups.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use crate::model::{MailboxState, UnixTime};

/// What a mailbox task is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Syncing,
    Waiting,
    BackingOff,
    Disabled,
    NotApproved,
    Stopped,
}

/// Live view of one mailbox for the admin API and readiness.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LiveMailbox {
    pub name: String,
    pub profile: String,
    pub email: String,
    pub protocol: String,
    pub phase: Phase,
    pub backlog: u64,
    pub state: MailboxState,
    /// Set while the mailbox has gone longer than `stall_alert_after` without
    /// a successful sync: the last success (or the task start if none).
    pub not_synced_since: Option<UnixTime>,
    /// Times the supervisor restarted the task after a panic.
    pub restarts: u64,
    /// Why the mailbox processes no mail while the configuration keeps it
    /// from running (not approved, disabled, no incoming delivery); `None`
    /// otherwise. A permanent error's reason is `state.disabled_reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_processing_reason: Option<String>,
    #[serde(skip)]
    pub cycle_started: Option<Instant>,
}

/// Shared runtime state.
#[derive(Debug, Default)]
pub struct Runtime {
    pub mailboxes: RwLock<BTreeMap<String, LiveMailbox>>,
    pub scheduler_running: AtomicBool,
    /// The CRM outbox workers' view for `/readyz` (stuck or paused adapters).
    pub outbox: Arc<crate::crm::worker::OutboxHealth>,
    /// Disabled mailboxes waiting to be re-enabled → their wake-up.
    reenable: Mutex<HashMap<String, Arc<Notify>>>,
}

/// Why [`Runtime::request_enable`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnableError {
    #[error("no mailbox {0:?}")]
    Unknown(String),
    #[error("mailbox {0:?} is disabled in the configuration (enabled = false or incoming = \"none\"): change the configuration and restart")]
    DisabledByConfig(String),
    #[error("mailbox {name:?} is not disabled (phase {phase:?})")]
    NotDisabled { name: String, phase: Phase },
}

impl Runtime {
    pub(super) fn update(&self, name: &str, f: impl FnOnce(&mut LiveMailbox)) {
        let mut map = self.mailboxes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get_mut(name) {
            f(m);
        }
    }

    /// Mailboxes whose current sync cycle has run longer than `after`.
    pub fn stuck(&self, after: Duration) -> Vec<String> {
        let map = self.mailboxes.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter(|m| {
                m.phase == Phase::Syncing && m.cycle_started.is_some_and(|t| t.elapsed() > after)
            })
            .map(|m| m.name.clone())
            .collect()
    }

    /// Mailboxes past their `stall_alert_after` without a successful sync:
    /// (name, not synced since, last error).
    pub fn stalled(&self) -> Vec<(String, UnixTime, Option<String>)> {
        let map = self.mailboxes.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter_map(|m| {
                m.not_synced_since
                    .map(|t| (m.name.clone(), t, m.state.last_sync_error.clone()))
            })
            .collect()
    }

    /// A snapshot of every mailbox.
    pub fn snapshot(&self) -> Vec<LiveMailbox> {
        self.mailboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Wakes a mailbox disabled by a permanent error so it runs Test & Enable
    /// again.
    pub fn request_enable(&self, name: &str) -> Result<(), EnableError> {
        let phase = {
            let map = self.mailboxes.read().unwrap_or_else(|p| p.into_inner());
            match map.get(name) {
                Some(m) => m.phase,
                None => return Err(EnableError::Unknown(name.to_string())),
            }
        };
        let waiting = self
            .reenable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        match waiting {
            Some(wake) => {
                // A stored permit: a wake-up racing the task's wait is not lost.
                wake.notify_one();
                Ok(())
            }
            None if phase == Phase::Disabled => {
                Err(EnableError::DisabledByConfig(name.to_string()))
            }
            None => Err(EnableError::NotDisabled {
                name: name.to_string(),
                phase,
            }),
        }
    }

    /// The wake-up of a disabled mailbox, registered from the moment it is
    /// disabled so an enable request right then is not refused or lost.
    pub(super) fn reenable_handle(&self, name: &str) -> Arc<Notify> {
        let mut map = self.reenable.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    pub(super) fn clear_reenable(&self, name: &str) {
        let mut map = self.reenable.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(name);
    }
}
