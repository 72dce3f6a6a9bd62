//! The scheduler at scale: 10,000 mailboxes of one profile on a simulated
//! connector, for an hour of paused tokio time, built the way the daemon
//! builds them (one store, one runtime, one connection semaphore per
//! profile, supervised tasks).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::POLL_JITTER;
use super::cycle::TURN_LIMIT;
use super::*;
use crate::alerts::Alerts;
use crate::connector::{Ack, AckReport, Connector, ConnectorError, FetchBatch, RawMessage};
use crate::model::SourceKey;
use crate::store::{KvStore, MemBackend, Store};

const MAILBOXES: usize = 10_000;
/// Mailboxes that always have more mail, behind a slow fetch: more of them
/// than the profile has connections, so without turns they would hold every
/// connection for ever.
const BUSY: usize = 12;
const LIMIT: usize = 10;
const POLL: Duration = Duration::from_secs(60);
const CAP: u32 = 3;
const HOUR: Duration = Duration::from_secs(3600);
const IDLE_FETCH: Duration = Duration::from_millis(5);
const BUSY_FETCH: Duration = Duration::from_secs(10);
const TEST_TIME: Duration = Duration::from_millis(5);
/// The mailbox that gets new mail, and the one woken by a push, at minute 30.
const MAIL_AT_30: usize = BUSY;
const PUSH_AT_30: usize = BUSY + 1;

/// What every simulated connector shares: the open connections (with their
/// peak), every fetch's time per mailbox, and the test's levers.
struct Sim {
    t0: Instant,
    open: AtomicUsize,
    peak: AtomicUsize,
    /// Per mailbox: the time (since `t0`) of every fetch.
    fetches: Vec<Mutex<Vec<Duration>>>,
    /// Per mailbox: one new message waiting for its next fetch.
    mail: Vec<AtomicBool>,
    /// Per mailbox: a notify wake-up (IDLE, a change notification).
    push: Vec<Notify>,
}

impl Sim {
    fn fetches(&self, i: usize) -> Vec<Duration> {
        self.fetches[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One mailbox's connector. A connection is open from a test or fetch
/// until a wait without a permit (`keep_connection == false`) or a close,
/// as the IMAP connector holds one; `Sim::open` counts them.
struct SimConnector {
    sim: Arc<Sim>,
    index: usize,
    name: String,
    connected: bool,
    seq: u64,
}

impl SimConnector {
    fn connect(&mut self) {
        if !std::mem::replace(&mut self.connected, true) {
            let now = self.sim.open.fetch_add(1, Ordering::SeqCst) + 1;
            self.sim.peak.fetch_max(now, Ordering::SeqCst);
        }
    }

    fn disconnect(&mut self) {
        if std::mem::replace(&mut self.connected, false) {
            self.sim.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn message(&mut self) -> RawMessage {
        self.seq += 1;
        let (name, seq) = (&self.name, self.seq);
        RawMessage {
            source: SourceKey {
                mailbox: name.clone(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: seq.to_string(),
            },
            raw: format!(
                "From: c@customer.example\nTo: {name}@us.example\nSubject: Order {seq}\nMessage-ID: <{name}-{seq}@customer.example>\n\nHello.\n"
            )
            .into_bytes(),
            received_at: None,
            too_large: None,
            unfetchable: None,
        }
    }
}

impl Connector for SimConnector {
    fn protocol(&self) -> &'static str {
        "sim"
    }

    async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
        self.connect();
        let sim = self.sim.clone();
        sim.fetches[self.index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sim.t0.elapsed());
        let mut batch = FetchBatch::default();
        if self.index < BUSY {
            tokio::time::sleep(BUSY_FETCH).await;
            batch.messages.push(self.message());
            batch.more = true;
            batch.backlog = 1_000;
        } else {
            tokio::time::sleep(IDLE_FETCH).await;
            if sim.mail[self.index].swap(false, Ordering::SeqCst) {
                batch.messages.push(self.message());
            }
        }
        Ok(batch)
    }

    async fn acknowledge(&mut self, _acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
        Ok(AckReport::default())
    }

    async fn wait_for_changes(
        &mut self,
        max: Duration,
        keep_connection: bool,
        cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        if !keep_connection {
            self.disconnect();
        }
        let sim = self.sim.clone();
        tokio::select! {
            _ = tokio::time::sleep(max) => {}
            _ = sim.push[self.index].notified() => {}
            _ = cancel.cancelled() => {}
        }
        Ok(())
    }

    async fn test(&mut self) -> Result<String, ConnectorError> {
        self.connect();
        tokio::time::sleep(TEST_TIME).await;
        self.disconnect();
        Ok("sim ok".into())
    }

    async fn close(&mut self) {
        self.disconnect();
    }
}

/// Gaps between consecutive fetches.
fn gaps(times: &[Duration]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// 10,000 mailboxes, 12 of them always busy behind a 10 s fetch, one
/// profile with 10 connections, an hour of paused time. Every idle mailbox
/// is polled within its interval bound (the busy ones cannot starve them),
/// the polls are spread over time, idle gaps grow to `idle_backoff_cap` ×
/// `poll_interval`, new mail or a push brings a mailbox back to its base
/// interval, and the profile's connection limit is reached but never
/// exceeded.
#[tokio::test(start_paused = true)]
async fn ten_thousand_mailboxes_for_an_hour_fair_backed_off_and_within_the_connection_limit() {
    let wall = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
        [daemon]
        state_dir = "{state}"
        [admin]
        enabled = false
        [[profiles]]
        name = "p"
        type = "maildir"
        poll_interval = "{poll}s"
        idle_backoff_cap = {CAP}
        max_concurrent_connections = {LIMIT}
        [[mailboxes]]
        name = "template"
        profile = "p"
        email = "template@us.example"
        approval = "approved"
        path = "{maildir}"
        "#,
        state = dir.path().join("state").display(),
        maildir = dir.path().join("unused").display(),
        poll = POLL.as_secs(),
    );
    let config = Arc::new(crate::config::from_toml_str(&text, Vec::new(), dir.path()).unwrap());
    let profile = config.profiles[0].clone();
    let template = config.mailboxes[0].clone();
    let names: Vec<String> = (0..MAILBOXES).map(|i| format!("m{i:05}")).collect();
    // The daemon's sharing: one store, runtime, alerts and semaphore.
    let store: Arc<dyn Store> = Arc::new(KvStore::new(MemBackend::new()).unwrap());
    let runtime = Arc::new(Runtime::default());
    let alerts = Arc::new(Alerts::new(
        store.clone(),
        HashMap::from([(profile.name.clone(), names.clone())]),
    ));
    let connections = Arc::new(Semaphore::new(usize::from(
        profile.max_concurrent_connections,
    )));
    let cancel = CancellationToken::new();
    let sim = Arc::new(Sim {
        t0: Instant::now(),
        open: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        fetches: (0..MAILBOXES).map(|_| Mutex::new(Vec::new())).collect(),
        mail: (0..MAILBOXES).map(|_| AtomicBool::new(false)).collect(),
        push: (0..MAILBOXES).map(|_| Notify::new()).collect(),
    });
    let mut handles = Vec::with_capacity(MAILBOXES);
    let shared_profile = Arc::new(profile.clone());
    for (index, name) in names.iter().enumerate() {
        let mut mailbox = template.clone();
        mailbox.name = name.clone();
        mailbox.email = format!("{name}@us.example");
        let task = MailboxTask {
            config: config.clone(),
            mailbox: Arc::new(mailbox),
            profile: shared_profile.clone(),
            store: store.clone(),
            runtime: runtime.clone(),
            alerts: alerts.clone(),
            connections: connections.clone(),
            cancel: cancel.clone(),
            backoff: Backoff::for_profile(&profile),
            watch_every: WATCH_EVERY,
            deployment: crate::deployment::Deployment::for_tests(),
        };
        task.register("sim");
        let (sim, name) = (sim.clone(), name.clone());
        let make = move || {
            Ok(SimConnector {
                sim: sim.clone(),
                index,
                name: name.clone(),
                connected: false,
                seq: 0,
            })
        };
        handles.push(tokio::spawn(task.supervise(make)));
    }

    tokio::time::sleep(HOUR / 2).await;
    let at_30 = sim.t0.elapsed();
    sim.mail[MAIL_AT_30].store(true, Ordering::SeqCst);
    sim.push[PUSH_AT_30].notify_one();
    tokio::time::sleep(HOUR / 2).await;
    cancel.cancel();
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(
        sim.open.load(Ordering::SeqCst),
        0,
        "every connection closed"
    );

    let idle: Vec<usize> = (BUSY..MAILBOXES)
        .filter(|i| ![MAIL_AT_30, PUSH_AT_30].contains(i))
        .collect();

    // Spread: in the second half hour no second holds more than five times
    // the average share of polls. Lockstep would put them into the few
    // seconds the profile's 10 connections need for 10,000 polls of 5 ms
    // (2,000 a second, over 30 times the mean).
    let mut per_second: HashMap<u64, usize> = HashMap::new();
    for &i in &idle {
        for t in sim.fetches(i) {
            if t >= HOUR / 2 {
                *per_second.entry(t.as_secs()).or_default() += 1;
            }
        }
    }
    let total: usize = per_second.values().sum();
    let mean = total as f64 / secs(HOUR / 2);
    let busiest = per_second.values().copied().max().unwrap_or(0);
    let mut top: Vec<(u64, usize)> = per_second.iter().map(|(s, n)| (*s, *n)).collect();
    top.sort_by_key(|(s, n)| (std::cmp::Reverse(*n), *s));
    eprintln!(
        "peak connections {}, busiest seconds {:?}, mean {mean:.1} polls/s",
        sim.peak.load(Ordering::SeqCst),
        &top[..top.len().min(8)]
    );

    // The connection limit: reached (so this can fail), never exceeded.
    assert_eq!(sim.peak.load(Ordering::SeqCst), LIMIT);

    // Fairness: how long a poll may wait behind the busy mailboxes' turns.
    let slack = TURN_LIMIT + BUSY_FETCH + Duration::from_secs(15);
    let bound = (POLL * CAP).mul_f64(1.0 + POLL_JITTER) + slack;
    let mut worst = (Duration::ZERO, 0);
    for &i in &idle {
        let times = sim.fetches(i);
        assert!(
            times.len() >= 25,
            "m{i:05} polled only {} times",
            times.len()
        );
        assert!(
            times[0] <= Duration::from_secs(300),
            "m{i:05} first at {:?}",
            times[0]
        );
        for (n, g) in gaps(&times).into_iter().enumerate() {
            if g > worst.0 {
                worst = (g, i);
            }
            assert!(
                g <= bound,
                "m{i:05}: gap {n} of {g:?} > {bound:?}: {times:?}"
            );
        }
    }
    // The busy mailboxes share the backlog slots (half the connections)
    // evenly, in turns, and together never hold more than those slots.
    let busy: Vec<usize> = (0..BUSY).map(|i| sim.fetches(i).len()).collect();
    let fair_share = (LIMIT / 2) as f64 * secs(HOUR) / secs(BUSY_FETCH) / BUSY as f64;
    assert!(
        busy.iter().all(|n| *n as f64 >= 0.8 * fair_share),
        "busy batches {busy:?}, fair share {fair_share:.0}"
    );
    let busy_time = BUSY_FETCH * busy.iter().sum::<usize>() as u32;
    assert!(
        busy_time <= HOUR * (LIMIT / 2) as u32 + TURN_LIMIT * BUSY as u32,
        "busy batches {busy:?} took more than the backlog slots"
    );

    // Back-off: idle gaps start at the base interval and end at the cap.
    let (base_lo, base_hi) = (POLL, POLL.mul_f64(1.0 + POLL_JITTER) + slack);
    let cap_lo = POLL * CAP;
    for &i in &idle {
        let g = gaps(&sim.fetches(i));
        assert!(
            g[1..5].iter().all(|g| *g >= base_lo && *g <= base_hi),
            "m{i:05} early gaps {g:?}"
        );
        assert!(*g.last().unwrap() >= cap_lo, "m{i:05} late gaps {g:?}");
    }

    assert!(
        (busiest as f64) <= 5.0 * mean,
        "busiest second {busiest} polls, mean {mean:.1}"
    );

    // Snap back: the mailbox given mail at minute 30 finds it at its next
    // poll and polls at the base interval again right after; the one woken
    // by a push polls at once, then at the base interval.
    for (i, what) in [(MAIL_AT_30, "new mail"), (PUSH_AT_30, "push")] {
        let times = sim.fetches(i);
        let k = times.iter().position(|t| *t >= at_30).unwrap();
        let before = times[k - 1] - times[k - 2];
        assert!(before >= POLL * 2, "{what}: backed off before: {times:?}");
        if i == PUSH_AT_30 {
            assert!(
                times[k] - at_30 <= slack,
                "{what}: polled at once: {times:?}"
            );
        } else {
            assert!(times[k] - at_30 <= bound, "{what}: {times:?}");
        }
        let after = times[k + 1] - times[k];
        assert!(
            after >= base_lo && after <= base_hi,
            "{what}: base interval after: {after:?} {times:?}"
        );
    }
    assert_eq!(store.count_activities(Some(&names[MAIL_AT_30])).unwrap(), 1);

    eprintln!(
        "10,000 mailboxes, 1 h paused: wall {:.1} s, worst idle gap {:.0} s (m{:05}), busiest second {busiest} polls (mean {mean:.1}), peak connections {}, busy batches {busy:?}",
        wall.elapsed().as_secs_f64(),
        secs(worst.0),
        worst.1,
        sim.peak.load(Ordering::SeqCst)
    );
}
