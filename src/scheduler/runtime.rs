//! The shared runtime view of every mailbox task (admin API, readiness) and
//! the re-enable wake-ups.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::model::{ApprovalStatus, MailboxState, UnixTime};

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
    /// When the task serving the mailbox now was started: at daemon start,
    /// or by the reload that added or changed the mailbox.
    pub started_at: UnixTime,
    /// Which start of a mailbox task in this process serves it (unique in
    /// the process): a reload that restarts the mailbox gives it a new one, one
    /// that leaves it running does not.
    pub task_id: u64,
    pub phase: Phase,
    pub backlog: u64,
    pub state: MailboxState,
    /// The approval in force: an operator's (`POST …/approve`, `…/reject`)
    /// over the configuration's.
    pub approval: ApprovalStatus,
    /// Set while an operator has the mailbox disabled (`POST …/disable`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_by_operator_at: Option<UnixTime>,
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
    /// Running mailboxes → the cancel token of their current enabled
    /// stretch: an operator's disable or reject ends it.
    stretches: Mutex<HashMap<String, CancellationToken>>,
    /// Per profile: the mailboxes queued for one of its connection permits.
    queues: Mutex<HashMap<String, Arc<ConnectionQueue>>>,
}

/// The last [`LiveMailbox::task_id`] handed out in this process (across
/// full restarts of the daemon's tasks, which start a new [`Runtime`]).
static LAST_TASK_ID: AtomicU64 = AtomicU64::new(0);

/// Who waits for a profile's connection permits, so a mailbox that holds
/// one only to keep an idle connection open (IMAP IDLE) gives it up as soon
/// as another mailbox needs it, and a busy one ends its turn.
#[derive(Debug)]
pub struct ConnectionQueue {
    waiting: AtomicUsize,
    wake: Notify,
    /// Slots for mailboxes working through a backlog batch after batch
    /// while others wait: half the profile's connections (at least one), so
    /// the polls of every other mailbox always find room.
    backlog: Arc<Semaphore>,
    /// Mailboxes with a backlog waiting for a slot.
    backlog_waiting: AtomicUsize,
}

/// Counts down however a wait ends (also when dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ConnectionQueue {
    /// The queue of a profile with `limit` connections.
    pub fn new(limit: usize) -> Self {
        ConnectionQueue {
            waiting: AtomicUsize::new(0),
            wake: Notify::new(),
            backlog: Arc::new(Semaphore::new((limit / 2).max(1))),
            backlog_waiting: AtomicUsize::new(0),
        }
    }

    /// True while another mailbox waits, for a connection or for a backlog
    /// slot: a mailbox with more to fetch then ends its turn.
    pub fn contended(&self) -> bool {
        self.waiting() > 0 || self.backlog_waiting.load(Ordering::SeqCst) > 0
    }

    /// A backlog slot, if one is free now.
    pub fn try_backlog_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.backlog.clone().try_acquire_owned().ok()
    }

    /// Waits for a backlog slot (FIFO), counted as waiting meanwhile.
    pub async fn backlog_slot(&self) -> Option<OwnedSemaphorePermit> {
        let _waiting = Waiting::new(&self.backlog_waiting);
        self.backlog.clone().acquire_owned().await.ok()
    }

    /// Mailboxes waiting for a permit now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Takes a permit of `connections`, counted as waiting meanwhile; `None`
    /// only if the semaphore was closed.
    pub async fn acquire(&self, connections: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = connections.clone().try_acquire_owned() {
            return Some(p);
        }
        let _waiting = Waiting::new(&self.waiting);
        // One holder of an idle connection is enough to make room.
        self.wake.notify_one();
        connections.clone().acquire_owned().await.ok()
    }

    /// Resolves once some mailbox waits for a permit.
    pub async fn someone_waits(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.waiting() > 0 {
                return;
            }
            notified.await;
        }
    }
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

    /// Ends the mailbox's current enabled stretch (if running) and wakes it
    /// if it waits: its task looks at what operators set again (disabled,
    /// approval) and holds or runs accordingly.
    pub fn control_changed(&self, name: &str) {
        if let Some(t) = self
            .stretches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            t.cancel();
        }
        // Only a task that waits (or is deciding whether to) has a handle;
        // a stored permit is not lost if it has not begun waiting yet.
        let waiting = self
            .reenable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        if let Some(wake) = waiting {
            wake.notify_one();
        }
    }

    pub(super) fn begin_stretch(&self, name: &str, token: CancellationToken) {
        let mut map = self.stretches.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(name.to_string(), token);
    }

    pub(super) fn end_stretch(&self, name: &str) {
        let mut map = self.stretches.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(name);
    }

    /// The wake-up of a disabled mailbox, registered from the moment it is
    /// disabled so an enable request right then is not refused or lost.
    pub(super) fn reenable_handle(&self, name: &str) -> Arc<Notify> {
        let mut map = self.reenable.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    /// The connection queue of a profile with `limit` connections.
    pub fn connection_queue(&self, profile: &str, limit: usize) -> Arc<ConnectionQueue> {
        let mut map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(profile.to_string())
            .or_insert_with(|| Arc::new(ConnectionQueue::new(limit)))
            .clone()
    }

    /// A new [`LiveMailbox::task_id`].
    pub(super) fn next_task_id(&self) -> u64 {
        LAST_TASK_ID.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Forgets a mailbox a reload removed (its task has ended): it is no
    /// longer listed, nor held for re-enabling.
    pub fn remove(&self, name: &str) {
        self.mailboxes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.clear_reenable(name);
        self.end_stretch(name);
    }

    /// Forgets a profile's connection queue, once none of its mailbox tasks
    /// runs any more: a reload that changed the profile (its connection
    /// limit) starts them again on a new one.
    pub fn forget_profile(&self, profile: &str) {
        let mut map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(profile);
    }

    pub(super) fn clear_reenable(&self, name: &str) {
        let mut map = self.reenable.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(name);
    }
}
