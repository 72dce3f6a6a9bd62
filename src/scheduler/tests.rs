use super::backoff::idle_interval;
use super::cycle::MAX_FOLLOW_UP_FAILURES;
use super::task::{DISABLED_ALERT, STALL_ALERT, STAMPS_PERSIST_EVERY, TRANSIENT_ALERT};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::alerts::Alerts;
use crate::connector::FetchBatch;
use crate::connector::{Ack, AckKind, Connector, ConnectorError};
use crate::error::Disposition;
use crate::model::{self, AlertLevel, FollowUp, MailboxState, SourceKey};
use crate::pipeline::{self, PipelineContext};
use crate::store::SledStore;
use crate::store::{CommitBatch, Store};
use crate::telemetry;

/// What the scripted connector answers to `test` and `fetch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Succeed,
    Transient,
    Permanent,
    Panic,
}

#[derive(Debug)]
struct Script {
    mode: Mode,
    tests: u32,
    /// (paused) time of every fetch, to read the back-off delays off.
    fetches: Vec<tokio::time::Instant>,
    /// The password the connector was last built with.
    secret: Option<String>,
}

/// A connector whose answers the test switches; clones share the script,
/// so the task's rebuilt connectors follow it too.
#[derive(Debug, Clone)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn new(mode: Mode) -> Self {
        Fake(Arc::new(Mutex::new(Script {
            mode,
            tests: 0,
            fetches: Vec::new(),
            secret: None,
        })))
    }
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set(&self, mode: Mode) {
        self.script().mode = mode;
    }
    fn answer(&self) -> Result<(), ConnectorError> {
        let mode = self.script().mode;
        let disposition = match mode {
            Mode::Succeed => return Ok(()),
            Mode::Panic => panic!("scripted panic in fetch"),
            Mode::Transient => Disposition::Transient,
            Mode::Permanent => Disposition::Permanent,
        };
        Err(ConnectorError::Maildir {
            path: "fake".into(),
            detail: format!("scripted {disposition} failure"),
            disposition,
        })
    }
}

impl Connector for Fake {
    fn protocol(&self) -> &'static str {
        "fake"
    }
    async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
        self.script().fetches.push(tokio::time::Instant::now());
        self.answer()?;
        Ok(FetchBatch::default())
    }
    async fn acknowledge(&mut self, _acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
        Ok(AckReport::default())
    }
    async fn wait_for_changes(
        &mut self,
        max: Duration,
        _keep_connection: bool,
        cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        tokio::select! {
            _ = tokio::time::sleep(max) => {}
            _ = cancel.cancelled() => {}
        }
        Ok(())
    }
    async fn test(&mut self) -> Result<String, ConnectorError> {
        self.script().tests += 1;
        if self.script().mode == Mode::Panic {
            return Ok("fake ok".into());
        }
        self.answer().map(|()| "fake ok".to_string())
    }
    async fn close(&mut self) {}
}

struct Harness {
    task: MailboxTask,
    store: Arc<dyn Store>,
    runtime: Arc<Runtime>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn phase(&self) -> Phase {
        self.runtime.snapshot()[0].phase
    }
    fn state(&self) -> MailboxState {
        self.store.mailbox_state("m").unwrap().unwrap()
    }
    fn alerts_starting(&self, prefix: &str) -> Vec<model::Alert> {
        let all = self.store.alerts(1000).unwrap();
        all.into_iter()
            .filter(|a| a.text.starts_with(prefix))
            .collect()
    }
}

/// One IMAP mailbox "m" (the connector is the fake) with a password
/// file; `profile_extra` adds profile keys.
fn harness(profile_extra: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "old-secret\n").unwrap();
    let cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
[admin]
enabled = false
[[profiles]]
name = "p"
type = "imap_smtp"
host = "127.0.0.1"
poll_interval = "60s"
{profile_extra}
[[mailboxes]]
name = "m"
profile = "p"
email = "m@example.test"
approval = "approved"
username = "m"
password_file = "{pw}"
"#,
        state = dir.path().join("state").display(),
        pw = pw.display(),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    let config = crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let runtime = Arc::new(Runtime::default());
    let alerts = Arc::new(Alerts::new(store.clone(), HashMap::new()));
    let profile = config.profiles[0].clone();
    let task = MailboxTask {
        mailbox: Arc::new(config.mailboxes[0].clone()),
        backoff: Backoff::for_profile(&profile),
        profile: Arc::new(profile),
        config: Arc::new(config),
        store: store.clone(),
        runtime: runtime.clone(),
        alerts,
        connections: Arc::new(Semaphore::new(1)),
        cancel: CancellationToken::new(),
        watch_every: WATCH_EVERY,
        deployment: crate::deployment::Deployment::for_tests(),
    };
    task.register("fake");
    Harness {
        task,
        store,
        runtime,
        _dir: dir,
    }
}

/// Builds connectors the way the daemon does: the password file read
/// again at every (re)build.
fn maker(h: &Harness, fake: &Fake) -> impl FnMut() -> Result<Fake, String> + Clone + Send {
    let (profile, mailbox, fake) = (h.task.profile.clone(), h.task.mailbox.clone(), fake.clone());
    move || {
        let (_, mailbox) = crate::daemon::with_current_secrets(&profile, &mailbox)?;
        fake.script().secret = mailbox.secret.map(|s| s.expose().to_string());
        Ok(fake.clone())
    }
}

async fn stop(h: &Harness, run: tokio::task::JoinHandle<()>) {
    h.task.cancel.cancel();
    run.await.unwrap();
}

fn sleep(secs: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_secs(secs))
}

#[tokio::test(start_paused = true)]
async fn fifty_transient_failures_in_a_row_do_not_disable_the_mailbox() {
    let h = harness("");
    let fake = Fake::new(Mode::Transient);
    let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
    // 50 failures take about 10 h at the 15 min cap; give it 24.
    for _ in 0..24 * 60 {
        if fake.script().fetches.len() >= 50 {
            break;
        }
        sleep(60).await;
    }
    assert!(fake.script().fetches.len() >= 50);
    assert_eq!(h.phase(), Phase::BackingOff);
    let state = h.state();
    assert!(state.enabled, "{state:?}");
    assert!(state.transient_failures >= 50, "{state:?}");
    assert!(h.alerts_starting(DISABLED_ALERT).is_empty());
    assert!(!run.is_finished(), "the task must keep retrying");
    fake.set(Mode::Succeed);
    sleep(16 * 60).await;
    assert_eq!(h.phase(), Phase::Waiting);
    assert_eq!(h.state().transient_failures, 0);
    stop(&h, run).await;
}

#[tokio::test(start_paused = true)]
async fn transient_backoff_is_capped_at_the_profile_setting_with_jitter() {
    let h = harness("retry_backoff_max = \"2m\"");
    let fake = Fake::new(Mode::Transient);
    let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
    sleep(6 * 3600).await;
    stop(&h, run).await;
    let times = fake.script().fetches.clone();
    let delays: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(delays.len() > 100, "{} retries in 6 h", delays.len());
    let cap = Duration::from_secs(120);
    assert!(delays.iter().all(|d| *d <= cap), "{delays:?}");
    // It grows from the 5 s base (±20 %) to the cap ...
    assert!(delays[0] >= Duration::from_secs(4) && delays[0] <= Duration::from_secs(6));
    let capped = &delays[10..];
    assert!(capped.iter().all(|d| *d >= cap.mul_f64(0.8)), "{capped:?}");
    // ... and is jittered there, not lockstep.
    let distinct: std::collections::BTreeSet<_> = capped.iter().collect();
    assert!(distinct.len() > 10, "{capped:?}");
    // The default cap is 15 minutes.
    assert_eq!(Backoff::default().max, Duration::from_secs(900));
    assert_eq!(
        Backoff::for_profile(&harness("").task.profile).max,
        Duration::from_secs(900)
    );
}

#[tokio::test(start_paused = true)]
async fn stall_alert_after_the_configured_time_resolves_on_the_next_success() {
    let h = harness("stall_alert_after = \"30m\"\nretry_backoff_max = \"1m\"");
    let fake = Fake::new(Mode::Transient);
    let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
    sleep(20 * 60).await;
    assert!(h.runtime.stalled().is_empty(), "not yet 30 min");
    assert!(h.alerts_starting(STALL_ALERT).is_empty());
    sleep(20 * 60).await;
    let stalled = h.runtime.stalled();
    assert_eq!(stalled.len(), 1, "{stalled:?}");
    assert_eq!(stalled[0].0, "m");
    assert!(
        stalled[0]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("scripted transient failure"),
        "{stalled:?}"
    );
    let open = h.alerts_starting(STALL_ALERT);
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].level, AlertLevel::Error);
    assert!(
        open[0].text.contains("scripted transient failure"),
        "{}",
        open[0].text
    );
    assert_eq!(open[0].resolved_at, None);
    assert_eq!(h.phase(), Phase::BackingOff, "it keeps retrying");

    fake.set(Mode::Succeed);
    sleep(2 * 60).await;
    assert_eq!(h.phase(), Phase::Waiting);
    assert!(h.runtime.stalled().is_empty());
    let resolved = h.alerts_starting(STALL_ALERT);
    assert_eq!(resolved.len(), 1);
    assert!(resolved[0].resolved_at.is_some(), "{resolved:?}");
    assert!(h
        .alerts_starting(TRANSIENT_ALERT)
        .iter()
        .all(|a| a.resolved_at.is_some()));
    stop(&h, run).await;
}

#[tokio::test(start_paused = true)]
async fn permanent_error_disables_and_the_task_waits_to_be_re_enabled() {
    let h = harness("");
    let fake = Fake::new(Mode::Succeed);
    let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
    sleep(1).await;
    assert_eq!(h.phase(), Phase::Waiting);
    fake.set(Mode::Permanent);
    sleep(120).await;
    assert_eq!(h.phase(), Phase::Disabled);
    let state = h.state();
    assert!(!state.enabled);
    assert!(
        state
            .disabled_reason
            .as_deref()
            .unwrap_or("")
            .contains("scripted permanent"),
        "{state:?}"
    );
    assert_eq!(h.alerts_starting(DISABLED_ALERT).len(), 1);
    let fetches = fake.script().fetches.len();
    sleep(3600).await;
    assert_eq!(
        fake.script().fetches.len(),
        fetches,
        "no retries while disabled"
    );
    assert!(!run.is_finished(), "the disabled task stays alive");
    stop(&h, run).await;
    assert_eq!(h.phase(), Phase::Disabled);
}

#[tokio::test(start_paused = true)]
async fn enable_request_re_enables_a_disabled_mailbox() {
    let h = harness("");
    let fake = Fake::new(Mode::Permanent);
    let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
    sleep(10).await;
    assert_eq!(h.phase(), Phase::Disabled);
    assert_eq!(fake.script().tests, 1);
    assert_eq!(
        h.runtime.request_enable("nope"),
        Err(EnableError::Unknown("nope".into()))
    );
    fake.set(Mode::Succeed);
    h.runtime.request_enable("m").unwrap();
    sleep(10).await;
    assert_eq!(h.phase(), Phase::Waiting);
    assert_eq!(fake.script().tests, 2, "Test & Enable ran again");
    assert!(h.state().enabled);
    assert!(h
        .alerts_starting(DISABLED_ALERT)
        .iter()
        .all(|a| a.resolved_at.is_some()));
    assert!(matches!(
        h.runtime.request_enable("m"),
        Err(EnableError::NotDisabled { .. })
    ));
    stop(&h, run).await;
}

#[tokio::test(start_paused = true)]
async fn secret_file_change_re_enables_a_disabled_mailbox() {
    let h = harness("");
    let fake = Fake::new(Mode::Permanent);
    let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
    sleep(10).await;
    assert_eq!(h.phase(), Phase::Disabled);
    assert_eq!(fake.script().secret.as_deref(), Some("old-secret"));
    fake.set(Mode::Succeed);
    sleep(60).await;
    assert_eq!(h.phase(), Phase::Disabled, "nothing changed yet");
    let pw = h.task.mailbox.password_file.clone().unwrap();
    std::fs::write(&pw, "new-secret\n").unwrap();
    sleep(2 * WATCH_EVERY.as_secs()).await;
    assert_eq!(h.phase(), Phase::Waiting);
    assert_eq!(fake.script().tests, 2);
    assert_eq!(fake.script().secret.as_deref(), Some("new-secret"));
    stop(&h, run).await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_a_mailbox_task_restarts_it_with_an_alert_and_a_metric() {
    let prometheus = telemetry::prometheus();
    let mut h = harness("");
    // A name of its own: the metrics recorder is process-wide.
    Arc::make_mut(&mut h.task.mailbox).name = "m-panics".into();
    h.task.register("fake");
    let fake = Fake::new(Mode::Panic);
    let run = tokio::spawn(h.task.clone().supervise(maker(&h, &fake)));
    sleep(60).await;
    let live = h
        .runtime
        .snapshot()
        .into_iter()
        .find(|m| m.name == "m-panics")
        .unwrap();
    assert!(live.restarts >= 2, "{live:?}");
    let alerts: Vec<_> = h
        .store
        .alerts(100)
        .unwrap()
        .into_iter()
        .filter(|a| a.text.contains("panicked"))
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].level, AlertLevel::Error);
    assert!(
        alerts[0].text.contains("scripted panic in fetch"),
        "{}",
        alerts[0].text
    );
    assert_eq!(alerts[0].count, live.restarts);
    {
        let text = prometheus.expect("recorder installed").render();
        let line = text
            .lines()
            .find(|l| l.starts_with(telemetry::TASK_RESTARTS) && l.contains("m-panics"))
            .unwrap_or_else(|| panic!("no restart metric in {text}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(n as u64, live.restarts, "{line}");
    }
    // Restarted, it syncs again once the cause is gone.
    fake.set(Mode::Succeed);
    sleep(600).await;
    let live = h
        .runtime
        .snapshot()
        .into_iter()
        .find(|m| m.name == "m-panics")
        .unwrap();
    assert_eq!(live.phase, Phase::Waiting);
    h.task.cancel.cancel();
    run.await.unwrap();
}

#[test]
fn old_configs_with_max_transient_failures_still_load() {
    let h = harness("max_transient_failures = 1000");
    assert_eq!(h.task.profile.max_transient_failures, Some(1000));
    assert_eq!(harness("").task.profile.max_transient_failures, None);
}

#[test]
fn backoff_grows_and_caps() {
    let b = Backoff {
        base: Duration::from_secs(5),
        max: Duration::from_secs(300),
        jitter: 0.0,
    };
    assert_eq!(b.delay(1), Duration::from_secs(5));
    assert_eq!(b.delay(2), Duration::from_secs(10));
    assert_eq!(b.delay(4), Duration::from_secs(40));
    assert_eq!(b.delay(30), Duration::from_secs(300));
    let j = Backoff { jitter: 0.2, ..b };
    for _ in 0..100 {
        let d = j.delay(3);
        assert!(
            d >= Duration::from_secs(16) && d <= Duration::from_secs(24),
            "{d:?}"
        );
    }
}

use crate::connector::maildir::MaildirConnector;
use crate::connector::{AckReport, RawMessage};

/// A task for mailbox "m" (Maildir profile) on a fresh store in `dir`.
fn task(dir: &std::path::Path, batch_size: usize) -> MailboxTask {
    let text = format!(
        r#"
        [daemon]
        state_dir = "{state}"
        [admin]
        token = "0123456789abcdef"
        [[profiles]]
        name = "local"
        type = "maildir"
        batch_size = {batch_size}
        [[mailboxes]]
        name = "m"
        profile = "local"
        email = "m@us.example"
        approval = "approved"
        path = "{maildir}"
        "#,
        state = dir.join("state").display(),
        maildir = dir.join("Maildir").display(),
    );
    let config = crate::config::from_toml_str(&text, Vec::new(), dir).unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("store")).unwrap());
    let task = MailboxTask {
        mailbox: Arc::new(config.mailboxes[0].clone()),
        profile: Arc::new(config.profiles[0].clone()),
        config: Arc::new(config),
        alerts: Arc::new(Alerts::new(store.clone(), HashMap::new())),
        store,
        runtime: Arc::new(Runtime::default()),
        connections: Arc::new(Semaphore::new(1)),
        cancel: CancellationToken::new(),
        backoff: Backoff::default(),
        watch_every: WATCH_EVERY,
        deployment: crate::deployment::Deployment::for_tests(),
    };
    task.register("test");
    task
}

fn mail(i: usize, extra_header: &str) -> String {
    format!("{extra_header}From: c@customer.example\nTo: m@us.example\nSubject: Question {i}\nDate: Mon, 5 Jan 2026 10:00:{i:02} +0000\nMessage-ID: <q{i}@customer.example>\n\nHello {i}.\n")
}

fn live_processed(task: &MailboxTask) -> u64 {
    task.runtime.snapshot()[0].state.items_processed
}

/// Wraps a connector and notes, at every fetch, what the admin API shows
/// as `items_processed` at that moment.
struct Probe<C> {
    inner: C,
    runtime: Arc<Runtime>,
    seen: Vec<u64>,
}

impl<C: Connector> Connector for Probe<C> {
    fn protocol(&self) -> &'static str {
        "probe"
    }
    async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
        self.seen
            .push(self.runtime.snapshot()[0].state.items_processed);
        self.inner.fetch().await
    }
    async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
        self.inner.acknowledge(acks).await
    }
    fn wants_follow_up(&self, kind: AckKind) -> bool {
        self.inner.wants_follow_up(kind)
    }
    async fn wait_for_changes(
        &mut self,
        _max: Duration,
        _keep_connection: bool,
        _cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn test(&mut self) -> Result<String, ConnectorError> {
        Ok(String::new())
    }
    async fn close(&mut self) {}
}

/// `items_processed` in `/api/v1/mailboxes` stayed at its old value for a
/// whole cycle and counted re-delivered copies: it must move with every
/// batch and count only new activities, as the metrics do.
#[tokio::test]
async fn items_processed_is_live_per_batch_and_counts_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    for d in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(d)).unwrap();
    }
    // Four emails, two of them delivered twice (another Received line).
    for i in 0..4 {
        let path = maildir.join(format!("new/17670000{i:02}.M{i}P1.a"));
        std::fs::write(path, mail(i, "")).unwrap();
    }
    for i in 0..2 {
        let path = maildir.join(format!("new/17670001{i:02}.M{i}P1.b"));
        std::fs::write(path, mail(i, "Received: from relay by mx\n")).unwrap();
    }
    let task = task(dir.path(), 2);
    let mut probe = Probe {
        inner: MaildirConnector::new(
            "m",
            &maildir,
            Vec::new(),
            2,
            false,
            None,
            task.store.clone(),
        ),
        runtime: task.runtime.clone(),
        seen: Vec::new(),
    };
    let mut state = task.load_state();
    assert_eq!(task.cycle(&mut probe, &mut state).await.unwrap().found, 6);
    // Three batches of two, each visible before the next fetch, and the
    // last (two copies) adds nothing.
    assert_eq!(probe.seen, vec![0, 2, 4]);
    assert_eq!(live_processed(&task), 4);
    assert_eq!(state.items_processed, 4);
    let stored = task.store.mailbox_state("m").unwrap().unwrap();
    assert_eq!(stored.items_processed, 4);
    assert_eq!(task.store.count_activities(Some("m")).unwrap(), 4);
}

/// A connector whose follow-ups always fail with the given disposition,
/// delivering one message on its first fetch.
struct Refusing {
    disposition: Disposition,
    delivered: bool,
    acked: Vec<Vec<SourceKey>>,
}

impl Connector for Refusing {
    fn protocol(&self) -> &'static str {
        "refusing"
    }
    async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
        let mut batch = FetchBatch::default();
        if !std::mem::replace(&mut self.delivered, true) {
            batch.messages.push(RawMessage {
                source: SourceKey {
                    mailbox: "m".into(),
                    folder: "INBOX".into(),
                    uidvalidity: 1,
                    uid: "1".into(),
                },
                raw: mail(1, "").into_bytes(),
                received_at: None,
                too_large: None,
                unfetchable: None,
            });
        }
        Ok(batch)
    }
    async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
        self.acked
            .push(acks.iter().map(|a| a.source.clone()).collect());
        let mut report = AckReport::default();
        for a in acks {
            report
                .failed
                .push((a.source, "refused".into(), self.disposition));
        }
        Ok(report)
    }
    async fn wait_for_changes(
        &mut self,
        _max: Duration,
        _keep_connection: bool,
        _cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn test(&mut self) -> Result<String, ConnectorError> {
        Ok(String::new())
    }
    async fn close(&mut self) {}
}

/// A follow-up the server refuses for good is retried on the next
/// cycles, then given up with a Warning; it never fails a cycle. One
/// that fails for a passing reason (an outage) keeps its attempts.
#[tokio::test]
async fn refused_follow_ups_are_retried_a_bounded_number_of_times_then_alerted() {
    for disposition in [Disposition::Permanent, Disposition::Transient] {
        let dir = tempfile::tempdir().unwrap();
        let task = task(dir.path(), 10);
        let mut connector = Refusing {
            disposition,
            delivered: false,
            acked: Vec::new(),
        };
        let mut state = task.load_state();
        for cycle in 1..=MAX_FOLLOW_UP_FAILURES {
            task.cycle(&mut connector, &mut state).await.unwrap();
            assert_eq!(connector.acked.len(), cycle as usize);
            let owed = task.store.follow_ups("m").unwrap();
            if disposition == Disposition::Transient {
                assert_eq!(owed.len(), 1);
                assert_eq!(owed[0].failures, 0);
            } else if cycle < MAX_FOLLOW_UP_FAILURES {
                assert_eq!(owed.len(), 1, "cycle {cycle}");
                assert_eq!(owed[0].failures, cycle);
                assert_eq!(owed[0].last_error.as_deref(), Some("refused"));
            } else {
                assert!(owed.is_empty(), "given up after {cycle} attempts");
            }
        }
        let gave_up = task
            .store
            .alerts(10)
            .unwrap()
            .into_iter()
            .filter(|a| a.level == AlertLevel::Warning && a.text.contains("gave up"))
            .count();
        assert_eq!(
            gave_up,
            usize::from(disposition == Disposition::Permanent),
            "{disposition}"
        );
    }
}

/// Follow-ups a crashed process owed are carried out at the start of the
/// next cycle, before anything is fetched, and cleared; one that can no
/// longer apply (UIDVALIDITY changed) is dropped with a notice.
#[tokio::test]
async fn owed_follow_ups_are_replayed_before_fetching_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    for d in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(d)).unwrap();
    }
    let file = maildir.join("new/1767000000.M1P1.a");
    std::fs::write(&file, mail(1, "")).unwrap();
    let task = task(dir.path(), 10);
    let source = |uid: &str| SourceKey {
        mailbox: "m".into(),
        folder: "INBOX".into(),
        uidvalidity: 0,
        uid: uid.into(),
    };
    // What a process that died right after its commit left behind: the
    // activity, and its follow-up (a delete) not yet carried out.
    let mut connector = MaildirConnector::new(
        "m",
        &maildir,
        Vec::new(),
        10,
        true,
        None,
        task.store.clone(),
    );
    let batch = connector.fetch().await.unwrap();
    let (mut commit, _) = pipeline::process(
        task.store.as_ref(),
        &PipelineContext::for_mailbox(&task.config, &task.mailbox),
        &batch.messages,
        0,
    )
    .unwrap();
    commit.follow_ups = vec![FollowUp {
        source: batch.messages[0].source.clone(),
        kind: AckKind::Recorded,
        recorded_at: 0,
        failures: 0,
        last_error: None,
    }];
    task.store.commit(commit).unwrap();
    assert!(file.exists());
    assert!(
        connector.fetch().await.unwrap().messages.is_empty(),
        "seen: never fetched again"
    );
    let mut state = task.load_state();
    task.cycle(&mut connector, &mut state).await.unwrap();
    assert!(!file.exists(), "the owed delete was carried out");
    assert!(task.store.follow_ups("m").unwrap().is_empty());
    // Replaying it again (a crash before the clear) is harmless.
    let report = connector
        .acknowledge(vec![Ack {
            source: batch.messages[0].source.clone(),
            kind: AckKind::Recorded,
        }])
        .await
        .unwrap();
    assert!(report.failed.is_empty() && report.obsolete.is_empty());

    // An obsolete one is dropped with an Information alert.
    struct Obsolete;
    impl Connector for Obsolete {
        fn protocol(&self) -> &'static str {
            "obsolete"
        }
        async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
            Ok(FetchBatch::default())
        }
        async fn acknowledge(&mut self, acks: Vec<Ack>) -> Result<AckReport, ConnectorError> {
            let mut r = AckReport::default();
            r.obsolete.extend(
                acks.into_iter()
                    .map(|a| (a.source, "UIDVALIDITY changed".into())),
            );
            Ok(r)
        }
        async fn wait_for_changes(
            &mut self,
            _max: Duration,
            _keep_connection: bool,
            _cancel: &CancellationToken,
        ) -> Result<(), ConnectorError> {
            Ok(())
        }
        async fn test(&mut self) -> Result<String, ConnectorError> {
            Ok(String::new())
        }
        async fn close(&mut self) {}
    }
    let owed: Vec<FollowUp> = ["a", "b"]
        .iter()
        .map(|u| FollowUp {
            source: source(u),
            kind: AckKind::Recorded,
            recorded_at: 0,
            failures: 0,
            last_error: None,
        })
        .collect();
    task.store
        .commit(CommitBatch {
            follow_ups: owed,
            ..Default::default()
        })
        .unwrap();
    task.cycle(&mut Obsolete, &mut state).await.unwrap();
    assert!(task.store.follow_ups("m").unwrap().is_empty());
    let alerts = task.store.alerts(10).unwrap();
    assert!(
        alerts.iter().any(|a| a.level == AlertLevel::Information
            && a.text == "2 follow-up(s) on processed messages dropped: UIDVALIDITY changed"),
        "{alerts:?}"
    );
}

#[test]
fn idle_mailboxes_back_off_step_by_step_up_to_the_profile_cap() {
    let base = Duration::from_secs(60);
    assert_eq!(idle_interval(base, 0, 4), base);
    assert_eq!(idle_interval(base, 9, 4), base);
    assert_eq!(idle_interval(base, 10, 4), base * 2);
    assert_eq!(idle_interval(base, 35, 4), base * 4);
    assert_eq!(idle_interval(base, 1000, 4), base * 4);
    assert_eq!(idle_interval(base, 1000, 1), base, "1: no back-off");
    assert_eq!(idle_interval(base, 1000, 10), base * 10);
    assert_eq!(idle_interval(base, u32::MAX, 60), base * 60);
    // The default is four times, as before the setting existed.
    assert_eq!(harness("").task.profile.idle_backoff_cap, 4);
    assert_eq!(
        harness("idle_backoff_cap = 12")
            .task
            .profile
            .idle_backoff_cap,
        12
    );
}

/// An idle poll writes nothing to the store: `last_sync_at`,
/// `last_success_at` and `no_email_cycles` move in the runtime view at every
/// poll and reach the store only every `STAMPS_PERSIST_EVERY` (or with the
/// next write that happens anyway), not at every cycle.
#[tokio::test(start_paused = true)]
async fn idle_polls_write_the_stamps_only_every_few_minutes() {
    let h = harness("");
    let fake = Fake::new(Mode::Succeed);
    let run = tokio::spawn(h.task.clone().run(maker(&h, &fake)));
    sleep(1).await;
    // The first success is written at once.
    assert_eq!(h.state().no_email_cycles, 1);
    assert!(h.state().last_success_at.is_some());
    sleep(4 * 60).await;
    let live = h.runtime.snapshot()[0].state.no_email_cycles;
    assert!(live >= 3, "polled every minute: {live}");
    assert_eq!(h.state().no_email_cycles, 1, "nothing written since");
    sleep(STAMPS_PERSIST_EVERY.as_secs() + 120).await;
    let stored = h.state().no_email_cycles;
    assert!(
        stored >= 5,
        "persisted after {STAMPS_PERSIST_EVERY:?}: {stored}"
    );
    // A failure is written at once, whatever the stamps' schedule.
    fake.set(Mode::Transient);
    sleep(3 * 60).await;
    assert!(h.state().transient_failures >= 1);
    stop(&h, run).await;
}

/// Regression: 10,000 idle Maildir mailboxes took 240 MB, 22 KB each, most
/// of it their task futures (8 KB each: the task and its connector maker
/// each held a copy of the profile and mailbox settings, and the Test &
/// Enable and sync steps were laid out inline, sized for the largest).
#[test]
fn an_idle_mailbox_task_keeps_a_small_future() {
    let h = harness("");
    let make = || Err::<crate::connector::maildir::MaildirConnector, String>("unused".into());
    let task = h.task.clone().supervise(make);
    let size = std::mem::size_of_val(&task);
    assert!(size <= 4096, "a mailbox task's future takes {size} bytes");
    assert!(std::mem::size_of::<MailboxTask>() <= 256);
}
