//! The web admin page at `/`, in a real browser: Debian's headless Chromium
//! driven through chromedriver (WebDriver), against a real daemon
//! (`crm-mailsync run`) on a copy of the demo configuration and its Maildir.
//!
//! Signs in (a wrong token first), reads the demo mailbox and its activities
//! from the tables, opens an activity's reasons, breaks the mailbox (its
//! tracked folder disappears: disabled, an Error alert) and mends it with the
//! page's Enable button, and sees the Test & Enable result update and the
//! alert resolve, and runs Test all of the demo's profile (its summary and
//! per-mailbox results as the job API has them). Screenshots of the main
//! screens go to a temporary folder, or to `docs/screenshots/` with
//! `UPDATE_SCREENSHOTS=1`.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`apt-get install
//! chromium chromium-driver`; `.ci/run` installs them): without them the test
//! fails, it does not skip.
#![cfg(feature = "real-servers")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, start, Running, TOKEN};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver, killed on drop.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// `config/demo.toml` with this test's state dir, port, token, Maildir copy
/// and a 1 s poll; each replaced line must be there, so a changed demo config
/// fails here rather than testing something else.
fn demo_config(dir: &Path, port: u16) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let maildir = dir.join("maildir");
    copy_dir(&root.join("fixtures/demo-maildir"), &maildir);
    let mut text = std::fs::read_to_string(root.join("config/demo.toml")).unwrap();
    for (from, to) in [
        (
            "state_dir = \"./data\"",
            format!("state_dir = \"{}\"", dir.join("state").display()),
        ),
        ("log_level = \"info\"", "log_level = \"warn\"".to_string()),
        (
            "listen = \"127.0.0.1:8025\"",
            format!("listen = \"127.0.0.1:{port}\""),
        ),
        (
            "token = \"demo-admin-token-change-me\"",
            format!("token = \"{TOKEN}\""),
        ),
        (
            "poll_interval = \"10s\"",
            "poll_interval = \"1s\"".to_string(),
        ),
        (
            "path = \"fixtures/demo-maildir\"",
            format!("path = \"{}\"", maildir.display()),
        ),
    ] {
        assert!(text.contains(from), "config/demo.toml no longer has {from}");
        text = text.replace(from, &to);
    }
    let path = dir.join("demo.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start_chromedriver() -> (Driver, u16) {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install Debian's chromium and chromium-driver \
             (apt-get install chromium chromium-driver; .ci/run does)"
        );
    }
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .arg("--log-level=WARNING")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver(child);
    common::wait_for(Duration::from_secs(20), "chromedriver to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    (driver, port)
}

async fn browser(driver_port: u16, profile: &Path) -> Client {
    let args = [
        "--headless".to_string(),
        "--no-sandbox".to_string(),
        "--disable-gpu".to_string(),
        "--disable-quic".to_string(),
        "--no-first-run".to_string(),
        "--disable-background-networking".to_string(),
        "--disable-component-update".to_string(),
        "--disable-sync".to_string(),
        "--disable-dev-shm-usage".to_string(),
        "--window-size=1280,900".to_string(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .unwrap_or_else(|e| panic!("chromedriver would not start Chromium: {e}"))
}

/// The rendered text of each element `css` selects.
async fn texts(c: &Client, css: &str) -> Vec<String> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim());",
            vec![json!(css)],
        )
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap_or_default().to_string())
        .collect()
}

async fn text(c: &Client, css: &str) -> String {
    texts(c, css).await.join("\n")
}

/// Waits until `$probe` (an expression that may `.await`) is `Some`; on a
/// time-out fails with what the page showed.
macro_rules! eventually {
    ($c:expr, $what:expr, $probe:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = $probe {
                break v;
            }
            if Instant::now() > deadline {
                let page = text($c, "body").await;
                panic!("timed out waiting for {}; the page shows:\n{page}", $what);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

/// Clicks what `css` selects; the tables are rebuilt every poll, so a click
/// that lands between find and click is retried.
async fn click(c: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let result = match c.find(Locator::Css(css)).await {
            Ok(e) => e.click().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot click {css}: {e}"),
        }
    }
}

/// The cells of the mailbox row `name`, as shown.
async fn mailbox_cells(c: &Client, name: &str) -> Vec<String> {
    texts(
        c,
        &format!("#mailboxes tr[data-mailbox=\"{name}\"] > th, #mailboxes tr[data-mailbox=\"{name}\"] > td"),
    )
    .await
}

/// Saves a screenshot of the viewport as `name`.png under `dir`, checking it
/// is a PNG of some substance (a blank page compresses to almost nothing).
async fn screenshot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name}: not a PNG");
    assert!(
        png.len() > 10_000,
        "{name}: {} bytes, a blank page?",
        png.len()
    );
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Where screenshots go: `docs/screenshots/` with `UPDATE_SCREENSHOTS=1`,
/// else a folder under the test's `dir`.
fn screenshots_dir(dir: &Path) -> PathBuf {
    let d = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
    } else {
        dir.join("screenshots")
    };
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A number of a job's JSON.
fn n(job: &serde_json::Value, key: &str) -> u64 {
    job[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {job}"))
}

/// Presses Test all of the demo's profile and waits for the job to be
/// done; checks that the page's progress line, bar, summary and result
/// rows say what `GET /api/v1/jobs/{id}` says, and answers that job.
async fn test_all(c: &Client, port: u16) -> serde_json::Value {
    let panel = "#profile-jobs [data-profile-job=\"demo-maildir\"]";
    let before = c
        .execute(
            "const p = document.querySelector(arguments[0]); return p ? p.dataset.job : null;",
            vec![json!(panel)],
        )
        .await
        .unwrap();
    let profiles = common::get_json(port, "/api/v1/profiles");
    let profile = &profiles["profiles"][0];
    assert_eq!(profile["name"], "demo-maildir", "{profiles}");
    let limit = profile["max_concurrent_connections"].as_u64().unwrap();
    let row = eventually!(c, "the profile's row", {
        let t = text(c, "#profiles tr[data-profile=\"demo-maildir\"]").await;
        (!t.is_empty()).then_some(t)
    });
    assert!(row.contains("support") && row.contains("Test all"), "{row}");
    let label = c
        .execute(
            "return document.querySelector('[data-key=\"pr:demo-maildir:test\"]').getAttribute('aria-label');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(label, "Test & Enable every mailbox of profile demo-maildir");
    click(c, "[data-key=\"pr:demo-maildir:test\"]").await;
    let id = eventually!(c, "the Test all job done", {
        let v = c
            .execute(
                "const p = document.querySelector(arguments[0]); \
                 return p && p.dataset.state === 'done' ? p.dataset.job : null;",
                vec![json!(panel)],
            )
            .await
            .unwrap();
        // Done, and not the job a click before this one left in the panel.
        v.as_str()
            .filter(|id| json!(id) != before)
            .map(str::to_string)
    });
    let job = common::get_json(port, &format!("/api/v1/jobs/{id}"));
    assert_eq!(
        (&job["state"], &job["kind"]),
        (&json!("done"), &json!("profile_test")),
        "{job}"
    );
    let n = |k: &str| n(&job, k);
    assert_eq!(
        text(c, &format!("{panel} .summary")).await,
        job["summary"].as_str().unwrap()
    );
    assert_eq!(
        text(c, &format!("{panel} .progress-line")).await,
        format!(
            "Finished. {} of {} mailbox(es) tested: {} passed, {} failed; at most {} of {limit} connection(s) at once",
            n("completed"),
            n("total"),
            n("succeeded"),
            n("failed"),
            n("peak_connections")
        )
    );
    let live = c
        .execute(
            "const p = document.querySelector(arguments[0]); \
             const l = p.querySelector('.progress-line'); const b = p.querySelector('progress'); \
             return [l.getAttribute('role'), l.getAttribute('aria-live'), b.value, b.max, b.getAttribute('aria-label')];",
            vec![json!(panel)],
        )
        .await
        .unwrap();
    assert_eq!(
        live,
        json!([
            "status",
            "polite",
            n("completed"),
            n("total"),
            "Mailboxes of profile demo-maildir tested"
        ])
    );
    // Each mailbox's row: passed or failed, each direction, the cause.
    let shown = c
        .execute(
            "return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr')) \
             .map(r => Array.from(r.cells).map(c => c.innerText.trim()));",
            vec![json!(panel)],
        )
        .await
        .unwrap();
    let direction = |t: &serde_json::Value| t["status"].as_str().unwrap().replace('_', " ");
    let expected: Vec<serde_json::Value> = job["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let dirs = [&r["incoming"], &r["outgoing"], &r["act"]];
            let passed = dirs.iter().all(|t| t["status"] != "failure") && r["enabled"] == true;
            // As the page words it: the daemon's error, else the
            // failing direction's detail.
            let failing = ["incoming", "outgoing", "ACT"]
                .iter()
                .zip(dirs)
                .find(|(_, t)| t["status"] == "failure")
                .map(|(l, t)| format!("{l}: {}", t["detail"].as_str().unwrap_or("failed")));
            let cause = match (r["error"].as_str(), failing) {
                (Some(e), _) => e.to_string(),
                (None, Some(f)) => f,
                (None, None) if passed => "—".to_string(),
                (None, None) => "not enabled".to_string(),
            };
            json!([
                r["mailbox"],
                if passed { "passed" } else { "failed" },
                direction(dirs[0]),
                direction(dirs[1]),
                direction(dirs[2]),
                cause
            ])
        })
        .collect();
    assert_eq!(shown, json!(expected));
    assert_eq!(expected.len() as u64, n("total"));
    // The button is back once the job is over.
    eventually!(c, "Test all ready again", {
        let t = text(c, "[data-key=\"pr:demo-maildir:test\"]").await;
        (t == "Test all").then_some(())
    });
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_signs_in_shows_the_demo_and_enables_a_mended_mailbox_in_chromium() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = demo_config(dir.path(), port);
    let _daemon = Running(Some(start(&config)));
    let base = format!("http://127.0.0.1:{port}");
    common::wait_for(Duration::from_secs(30), "the daemon's admin API", || {
        common::get(port, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    // The routes this daemon has: a button whose route is documented must
    // work; one whose route is not yet must say so.
    let documented: std::collections::BTreeSet<String> =
        common::get_json(port, "/api/v1/openapi.json")["paths"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
    let shots = screenshots_dir(dir.path());

    let (_driver, driver_port) = start_chromedriver();
    let profile = tempfile::tempdir().unwrap();
    let c = browser(driver_port, profile.path()).await;

    // Sign in: a wrong token gets the API's own 401 message.
    c.goto(&format!("{base}/")).await.unwrap();
    let token = c.wait().for_element(Locator::Id("token")).await.unwrap();
    token.send_keys("not-the-token").await.unwrap();
    click(&c, "#signin-button").await;
    let refused = eventually!(&c, "the wrong token's message", {
        let t = text(&c, "#signin-error").await;
        (!t.is_empty()).then_some(t)
    });
    assert_eq!(
        refused,
        "The daemon refused this token: missing or wrong bearer token."
    );
    assert!(
        !c.find(Locator::Id("app-view"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "the data view shows before a good token"
    );
    screenshot(&c, &shots, "sign-in").await;

    let token = c.find(Locator::Id("token")).await.unwrap();
    token.clear().await.unwrap();
    token.send_keys(TOKEN).await.unwrap();
    click(&c, "#signin-button").await;

    // The demo mailbox, synced: its row's cells as a person reads them.
    let cells = eventually!(&c, "the support mailbox synced", {
        let cells = mailbox_cells(&c, "support").await;
        (cells.len() == 10 && cells[1] == "waiting" && !cells[2].contains('—')).then_some(cells)
    });
    assert_eq!(cells[0], "support\nsupport@example.test", "{cells:?}");
    // Which deployment this is, as the API says.
    let me = common::get_json(port, "/api/v1/deployment");
    assert_eq!(me["id"], common::TEST_DEPLOYMENT_ID, "{me}");
    let shown = eventually!(&c, "the deployment in the header", {
        let t = text(&c, "#deployment").await;
        (!t.is_empty()).then_some(t)
    });
    assert_eq!(
        shown,
        format!(
            "Deployment {} on {} (v{}) ·",
            me["id"].as_str().unwrap(),
            me["host"].as_str().unwrap(),
            me["version"].as_str().unwrap()
        )
    );
    assert_eq!(cells[3], "0", "backlog: {cells:?}");
    assert!(
        cells[4].starts_with("success") && cells[4].contains("readable: 2 folder(s), 8 message(s)"),
        "incoming Test & Enable: {cells:?}"
    );
    assert!(cells[5].starts_with("not run"), "outgoing: {cells:?}");
    assert!(cells[6].starts_with("not run"), "ACT: {cells:?}");
    assert_eq!(cells[8], "enabled", "{cells:?}");
    assert!(
        cells[9].contains("Test") && cells[9].contains("Disable"),
        "{cells:?}"
    );
    // The token is in session storage and nowhere a request could leak it.
    let stored = c
        .execute(
            "return [sessionStorage.getItem('crm-mailsync.admin-token'), localStorage.length, document.cookie, location.href];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored, json!([TOKEN, 0, "", format!("{base}/")]));

    // The demo's activities, newest first, and its quarantined file.
    let subjects = eventually!(&c, "the demo's 7 activities", {
        let s = texts(&c, "#activities tbody th").await;
        (s.len() == 7).then_some(s)
    });
    assert_eq!(subjects[0], "January news: what’s new", "{subjects:?}");
    assert!(
        subjects.contains(&"Renewal terms for 2026".to_string()),
        "{subjects:?}"
    );
    let quarantine = text(&c, "#quarantine tbody").await;
    assert!(
        quarantine.contains("no header section"),
        "quarantine: {quarantine}"
    );
    let alerts = eventually!(&c, "the quarantine warning", {
        let t = text(&c, "#alerts tbody").await;
        t.contains("quarantined").then_some(t)
    });
    assert!(alerts.starts_with("warning"), "{alerts}");
    screenshot(&c, &shots, "mailboxes").await;

    // "Why is this email on this record?": the folder-tracked one.
    let row = subjects
        .iter()
        .position(|s| s == "Renewal terms for 2026")
        .unwrap()
        + 1;
    click(
        &c,
        &format!("#activities tbody tr:nth-child({row}) th button"),
    )
    .await;
    let regarding = eventually!(&c, "the activity's reasons", {
        let t = text(&c, "#r-regarding").await;
        (!t.is_empty()).then_some(t)
    });
    assert_eq!(regarding, "account:fabrikam");
    assert_eq!(text(&c, "#r-method").await, "folder");
    assert_eq!(text(&c, "#r-score").await, "1.00");
    let reasons = texts(&c, "#r-reasons li").await;
    assert_eq!(
        reasons,
        vec![
            "folder \"INBOX/Customers\" is tracked to account:fabrikam".to_string(),
            "sender frank.lee@fabrikam.example: unresolved: no record has this address".to_string(),
        ]
    );
    let focused = c
        .execute("return document.activeElement.id;", vec![])
        .await
        .unwrap();
    assert_eq!(focused, "reasons", "the reasons panel takes the focus");
    screenshot(&c, &shots, "activity-reasons").await;
    click(&c, "#reasons-close").await;

    // Approve: what the daemon answers, in the status line. A daemon whose
    // document lacks the route must say so in words, not break the page.
    click(&c, "[data-key=\"mb:support:approve\"]").await;
    let said = eventually!(&c, "approve's answer", {
        let t = text(&c, "#status").await;
        (t.starts_with("support: approve ") && !t.ends_with('…')).then_some(t)
    });
    if documented.contains("/api/v1/mailboxes/{name}/approve") {
        assert!(!said.contains("does not offer"), "{said}");
    } else {
        assert_eq!(
            said,
            "support: approve failed: this daemon does not offer POST /api/v1/mailboxes/support/approve (HTTP 404)"
        );
    }

    // Retry the quarantined file: the same rule.
    click(&c, "#quarantine tbody button").await;
    let said = eventually!(&c, "retry's answer", {
        let t = text(&c, "#status").await;
        t.starts_with("Quarantined message ").then_some(t)
    });
    if documented.contains("/api/v1/quarantine/{id}/retry") {
        assert!(!said.contains("does not offer"), "{said}");
    } else {
        let id = said
            .split(' ')
            .nth(2)
            .unwrap_or_default()
            .trim_end_matches(':');
        assert_eq!(
            said,
            format!("Quarantined message {id}: retry failed: this daemon does not offer POST /api/v1/quarantine/{id}/retry (HTTP 404)")
        );
    }

    // Live updates, and data as text only: a new email whose subject and
    // sender are HTML appears without a reload, shown literally, and no
    // markup of it reaches the page.
    let hostile = r#"<img src=x onerror="window.__xss=1"><b>Hi</b>"#;
    let tmp = dir.path().join("maildir/tmp/1767700000.M100009P1.test");
    std::fs::write(
        &tmp,
        format!(
            "Message-ID: <hostile@attacker.example>\r\nDate: Tue, 06 Jan 2026 12:00:00 +0000\r\n\
             From: \"<script>window.__xss=2</script>\" <evil@attacker.example>\r\n\
             To: support@example.test\r\nSubject: {hostile}\r\n\r\nbody\r\n"
        ),
    )
    .unwrap();
    std::fs::rename(
        &tmp,
        dir.path().join("maildir/new/1767700000.M100009P1.test"),
    )
    .unwrap();
    let newest = eventually!(&c, "the new email's activity", {
        let s = texts(&c, "#activities tbody th").await;
        (s.len() == 8).then(|| s[0].clone())
    });
    assert_eq!(newest, hostile);
    let injected = c
        .execute(
            "return [window.__xss === undefined, document.querySelectorAll('main img, main b, main script').length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        injected,
        json!([true, 0]),
        "markup from an email reached the page"
    );
    // The policy is in force: an inline script the page did not ship is
    // refused by the browser.
    let inline_ran = c
        .execute(
            "const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; \
             document.head.append(s); return window.__inline === 1;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        inline_ran,
        json!(false),
        "an inline script ran despite the CSP"
    );

    // Acknowledge the quarantine warning: acknowledged, and still open (its
    // condition lasts), its button gone.
    click(&c, "#alerts tbody tr[data-level=\"warning\"] button").await;
    let said = eventually!(&c, "acknowledge's answer", {
        let t = text(&c, "#status").await;
        t.contains("acknowledge").then_some(t)
    });
    assert!(said.ends_with(" acknowledged"), "{said}");
    let row = eventually!(&c, "the warning acknowledged", {
        texts(&c, "#alerts tbody tr")
            .await
            .into_iter()
            .find(|t| t.contains("quarantined") && t.contains("open, acknowledged"))
    });
    assert!(
        row.starts_with("warning") && !row.contains("Acknowledge"),
        "{row}"
    );

    // Break the mailbox: its tracked folder disappears → disabled, an Error
    // alert, the incoming result names the folder.
    let folder = dir.path().join("maildir/.INBOX.Customers");
    let away = dir.path().join("maildir-away");
    std::fs::rename(&folder, &away).unwrap();
    let cells = eventually!(&c, "the mailbox disabled", {
        let cells = mailbox_cells(&c, "support").await;
        (cells.len() == 10 && cells[8].starts_with("disabled")).then_some(cells)
    });
    assert_eq!(cells[1], "disabled", "{cells:?}");
    assert!(
        cells[8].contains("folder \"INBOX/Customers\" does not exist"),
        "{cells:?}"
    );
    let disabled_alert = eventually!(&c, "the disabled alert", {
        texts(&c, "#alerts tbody tr")
            .await
            .into_iter()
            .find(|t| t.contains("mailbox disabled:"))
    });
    assert!(disabled_alert.starts_with("error"), "{disabled_alert}");
    assert!(disabled_alert.contains("open"), "{disabled_alert}");

    // Test all of the demo's profile while it is broken: the job's
    // progress, then its summary and the mailbox failed with the cause, as
    // GET /api/v1/jobs/{id} has them.
    if documented.contains("/api/v1/profiles/{name}/test") {
        let job = test_all(&c, port).await;
        assert_eq!((n(&job, "succeeded"), n(&job, "failed")), (0, 1), "{job}");
        let cause = text(
            &c,
            "#profile-jobs [data-profile-job=\"demo-maildir\"] tbody tr[data-mailbox=\"support\"] td:last-child",
        )
        .await;
        assert!(
            cause.contains("folder \"INBOX/Customers\" does not exist"),
            "{cause}"
        );
        c.execute(
            "document.getElementById('profiles-title').scrollIntoView();",
            vec![],
        )
        .await
        .unwrap();
        screenshot(&c, &shots, "profile-test").await;
    } else {
        let t = text(&c, "#profiles").await;
        assert!(!t.is_empty(), "the profiles table shows without the route");
    }

    // Mend it and press Enable: Test & Enable runs again and succeeds, the
    // mailbox syncs, the alert resolves.
    std::fs::rename(&away, &folder).unwrap();
    let before = cells[4].clone();
    click(&c, "[data-key=\"mb:support:enable\"]").await;
    let said = eventually!(&c, "enable's answer", {
        let t = text(&c, "#status").await;
        t.starts_with("support: enable ").then_some(t)
    });
    assert_eq!(said, "support: enable accepted (enabling)");
    let cells = eventually!(&c, "the mailbox enabled again", {
        let cells = mailbox_cells(&c, "support").await;
        (cells.len() == 10 && cells[8] == "enabled" && cells[1] == "waiting").then_some(cells)
    });
    assert!(
        cells[4].starts_with("success") && cells[4] != before,
        "incoming result updated: {before:?} → {:?}",
        cells[4]
    );
    eventually!(&c, "the disabled alert gone from the open ones", {
        let open = text(&c, "#alerts tbody").await;
        (!open.contains("mailbox disabled:")).then_some(())
    });
    c.find(Locator::Id("alert-state"))
        .await
        .unwrap()
        .select_by_value("all")
        .await
        .unwrap();
    let resolved = eventually!(&c, "the disabled alert resolved", {
        texts(&c, "#alerts tbody tr")
            .await
            .into_iter()
            .find(|t| t.contains("mailbox disabled:") && t.contains("resolved"))
    });
    assert!(resolved.starts_with("error"), "{resolved}");

    // Test: a Test & Enable job on demand, its outcome in the job line and
    // a newer incoming result in the row (or, before the route exists, the
    // daemon's answer).
    let before = mailbox_cells(&c, "support").await[4].clone();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    click(&c, "[data-key=\"mb:support:test\"]").await;
    if documented.contains("/api/v1/mailboxes/{name}/test") {
        let done = eventually!(&c, "the Test & Enable job done", {
            let t = text(&c, "#job").await;
            t.starts_with("Test & Enable support done: ").then_some(t)
        });
        assert!(
            done.contains("support: incoming success") && done.contains(", enabled"),
            "{done}"
        );
        let after = eventually!(&c, "a newer incoming result", {
            let cell = mailbox_cells(&c, "support").await[4].clone();
            (cell != before).then_some(cell)
        });
        assert!(after.starts_with("success"), "{after}");
    } else {
        let said = eventually!(&c, "test's answer", {
            let t = text(&c, "#status").await;
            t.starts_with("support: test failed").then_some(t)
        });
        assert_eq!(
            said,
            "support: test failed: this daemon does not offer POST /api/v1/mailboxes/support/test (HTTP 404)"
        );
    }
    // Test all again, the mailbox mended: it passes.
    if documented.contains("/api/v1/profiles/{name}/test") {
        let job = test_all(&c, port).await;
        assert_eq!(job["results"][0]["mailbox"], "support");
        assert_eq!((n(&job, "succeeded"), n(&job, "failed")), (1, 0), "{job}");
        let shown = text(
            &c,
            "#profile-jobs [data-profile-job=\"demo-maildir\"] tbody",
        )
        .await;
        assert!(shown.starts_with("support\tpassed\tsuccess"), "{shown:?}");
    }
    c.execute(
        "document.getElementById('alerts-title').scrollIntoView();",
        vec![],
    )
    .await
    .unwrap();
    screenshot(&c, &shots, "alerts").await;

    // Signing out forgets the token.
    click(&c, "#signout").await;
    let stored = c
        .execute(
            "return sessionStorage.getItem('crm-mailsync.admin-token');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored, serde_json::Value::Null);
    c.close().await.unwrap();
    eprintln!(
        "web admin browser test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The open confirmation dialog's text, waiting for it to open.
async fn dialog_text(c: &Client) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.get_alert_text().await {
            Ok(t) => return t,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no dialog opened: {e}"),
        }
    }
}

/// One mailbox, one deployment, from the page: the demo mailbox holds a
/// marker of another deployment, so this daemon refuses it (disabled, the
/// incoming result naming the other); the row's Take over asks first
/// (declined: nothing happens), then runs a forced Test & Enable that claims
/// the mailbox here, and it syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_another_deployment_holds_is_taken_over_with_the_pages_button_in_chromium() {
    use crm_mailsync::connector::maildir::MARKER_FILE;
    use crm_mailsync::deployment::Marker;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = demo_config(dir.path(), port);
    let demo = std::fs::read_to_string(&config).unwrap();
    assert!(demo.contains("deployment_marker = false"), "{demo}");
    std::fs::write(
        &config,
        demo.replace("deployment_marker = false", "deployment_marker = true"),
    )
    .unwrap();
    let marker_path = dir.path().join("maildir").join(MARKER_FILE);
    let theirs = Marker {
        deployment: "deployment-a".into(),
        host: "other-host".into(),
        claimed_at: 1_767_225_600,
    };
    std::fs::write(&marker_path, theirs.to_json()).unwrap();
    let _daemon = Running(Some(start(&config)));
    let base = format!("http://127.0.0.1:{port}");
    common::wait_for(Duration::from_secs(30), "the daemon's admin API", || {
        common::get(port, "/healthz", None).filter(|(s, _)| *s == 200)
    });
    let (_driver, driver_port) = start_chromedriver();
    let profile = tempfile::tempdir().unwrap();
    let c = browser(driver_port, profile.path()).await;
    c.goto(&format!("{base}/")).await.unwrap();
    let token = c.wait().for_element(Locator::Id("token")).await.unwrap();
    token.send_keys(TOKEN).await.unwrap();
    click(&c, "#signin-button").await;

    // Refused: disabled, the incoming result names the other deployment,
    // nothing read, and the row offers Take over.
    let cells = eventually!(&c, "the mailbox refused for the other deployment", {
        let cells = mailbox_cells(&c, "support").await;
        (cells.len() == 10 && cells[8].starts_with("disabled")).then_some(cells)
    });
    assert!(
        cells[4].starts_with("failure") && cells[4].contains("deployment-a"),
        "incoming: {cells:?}"
    );
    assert!(cells[9].contains("Take over"), "actions: {cells:?}");
    let state = &common::get_json(port, "/api/v1/mailboxes")["mailboxes"][0]["state"];
    assert_eq!(
        state["incoming_test"]["held_by"],
        json!({"deployment": "deployment-a", "host": "other-host", "claimed_at": 1_767_225_600}),
        "{state}"
    );
    assert_eq!(texts(&c, "#activities tbody th").await.len(), 0);
    screenshot(&c, &screenshots_dir(dir.path()), "take-over").await;

    // Take over asks, naming the other deployment; no: nothing changes.
    click(&c, "[data-key=\"mb:support:take-over\"]").await;
    let asked = dialog_text(&c).await;
    assert!(
        asked.starts_with(
            "Mailbox support is synchronized by deployment deployment-a on other-host (since "
        ) && asked.contains("Take it over here?"),
        "{asked}"
    );
    c.dismiss_alert().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(text(&c, "#job").await, "", "a declined take-over ran a job");
    assert_eq!(
        Marker::from_json(&std::fs::read_to_string(&marker_path).unwrap()),
        Some(theirs.clone())
    );
    assert!(mailbox_cells(&c, "support").await[8].starts_with("disabled"));

    // Yes: a forced Test & Enable claims it here, it is enabled and syncs.
    click(&c, "[data-key=\"mb:support:take-over\"]").await;
    dialog_text(&c).await;
    c.accept_alert().await.unwrap();
    let done = eventually!(&c, "the take-over job done", {
        let t = text(&c, "#job").await;
        t.starts_with("Test & Enable support done: ").then_some(t)
    });
    assert!(
        done.contains("support: incoming success") && done.contains(", enabled"),
        "{done}"
    );
    let cells = eventually!(&c, "the mailbox enabled and synced", {
        let cells = mailbox_cells(&c, "support").await;
        (cells.len() == 10 && cells[8] == "enabled" && cells[1] == "waiting").then_some(cells)
    });
    // The job's incoming line says it took the mailbox over; the row then
    // shows the mailbox's own start, which finds the marker its own.
    let said = text(&c, "#status").await;
    let job = said
        .strip_prefix("support: Test & Enable started (job ")
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or_else(|| panic!("status: {said}"));
    let job = common::get_json(port, &format!("/api/v1/jobs/{job}"));
    let detail = job["results"][0]["incoming"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(
        detail.contains("taken over from deployment deployment-a on other-host"),
        "{job}"
    );
    assert!(cells[4].starts_with("success"), "incoming: {cells:?}");
    assert!(!cells[9].contains("Take over"), "actions: {cells:?}");
    let ours = Marker::from_json(&std::fs::read_to_string(&marker_path).unwrap()).unwrap();
    assert_eq!(ours.deployment, common::TEST_DEPLOYMENT_ID);
    eventually!(&c, "the demo's 7 activities", {
        (texts(&c, "#activities tbody th").await.len() == 7).then_some(())
    });
    c.close().await.unwrap();
}
