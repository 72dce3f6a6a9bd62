//! The IMAP connector against a small scripted IMAP server, for server
//! behaviour the private Dovecot cannot show: a `.` hierarchy separator
//! (Courier, Cyrus, older Dovecot setups), a tagged `NO` to one message of a
//! FETCH, a UID that SEARCH lists but FETCH leaves out, and server
//! annotations (RFC 5464 METADATA), which holds the deployment marker.
//!
//! The server keeps a tiny folder model (UIDs and bytes per folder) and
//! answers only what the connector sends: CAPABILITY, LOGIN, LIST, SELECT,
//! UID SEARCH, UID FETCH, UID STORE, GETMETADATA, SETMETADATA, LOGOUT.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crm_mailsync::connector::imap::{ImapConnector, ImapSettings};
use crm_mailsync::connector::{Connector, FetchBatch};
use crm_mailsync::model::AlertLevel;
use crm_mailsync::pipeline::{self, ItemResult, PipelineContext};
use crm_mailsync::store::{SledStore, Store};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// What the scripted server holds and how it misbehaves.
#[derive(Default)]
struct Model {
    delimiter: char,
    /// folder (server name) → UID → message bytes.
    folders: BTreeMap<String, BTreeMap<u32, Vec<u8>>>,
    /// A body FETCH that includes one of these UIDs ends in a tagged NO
    /// (after the FETCH responses of the others, as servers do).
    refuse: HashSet<u32>,
    /// Left out of body FETCH responses (the FETCH still ends OK).
    omit: HashSet<u32>,
    /// UIDs that `UID SEARCH UID 1:*` lists although they are gone (expunged
    /// between that SEARCH and the FETCH): `UID SEARCH UID n` does not.
    ghosts: HashSet<u32>,
    /// Server annotations (entry → value); `Some` offers METADATA.
    metadata: Option<BTreeMap<String, String>>,
    /// Every command line received, for assertions.
    seen: Vec<String>,
}

/// The first IMAP quoted string of `s` (backslash escapes undone) and
/// what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let start = s.find('"')?;
    let mut out = String::new();
    let mut chars = s[start + 1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?.1),
            '"' => return Some((out, &s[start + 1 + i + 1..])),
            c => out.push(c),
        }
    }
    None
}

/// `s` as an IMAP quoted string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

type Shared = Arc<Mutex<Model>>;

fn message(tag: &str) -> Vec<u8> {
    format!(
        "From: Customer <c@customer.example>\r\nTo: mb@example.test\r\nSubject: {tag}\r\nDate: Thu, 01 Jan 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@scripted.example>\r\n\r\nHello {tag}.\r\n"
    )
    .into_bytes()
}

/// `1:3,5,7:*` → UIDs (`*` = the highest UID of the folder).
fn uid_set(set: &str, max: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for part in set.split(',') {
        let num = |s: &str| {
            if s == "*" {
                max
            } else {
                s.parse().unwrap()
            }
        };
        match part.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (num(a), num(b));
                out.extend(a.min(b)..=a.max(b));
            }
            None => out.push(num(part)),
        }
    }
    out
}

/// Starts the server; returns its port.
async fn serve(model: Shared) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let model = model.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"* OK scripted IMAP ready\r\n").await.unwrap();
                let mut selected: Option<String> = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    let out = answer(&model, &mut selected, &line);
                    if w.write_all(&out).await.is_err() {
                        return;
                    }
                    if line.contains(" LOGOUT") {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// The response to one command line.
fn answer(model: &Shared, selected: &mut Option<String>, line: &str) -> Vec<u8> {
    let mut m = model.lock().unwrap();
    m.seen.push(line.to_string());
    let (tag, rest) = line.split_once(' ').unwrap();
    let upper = rest.to_ascii_uppercase();
    let mut out = Vec::new();
    let ok = |out: &mut Vec<u8>, text: &str| {
        out.extend_from_slice(format!("{tag} OK {text}\r\n").as_bytes());
    };
    if upper.starts_with("CAPABILITY") {
        let metadata = if m.metadata.is_some() {
            " METADATA"
        } else {
            ""
        };
        out.extend_from_slice(format!("* CAPABILITY IMAP4rev1 UIDPLUS{metadata}\r\n").as_bytes());
        ok(&mut out, "done");
    } else if upper.starts_with("GETMETADATA") && m.metadata.is_some() {
        // GETMETADATA "" "entry": the server's own annotations.
        let (mailbox, rest) = quoted(rest).unwrap();
        assert_eq!(mailbox, "", "server annotations only");
        let (entry, _) = quoted(rest).unwrap();
        let value = m
            .metadata
            .as_ref()
            .unwrap()
            .get(&entry)
            .map_or("NIL".to_string(), |v| quote(v));
        out.extend_from_slice(
            format!("* METADATA \"\" ({} {value})\r\n", quote(&entry)).as_bytes(),
        );
        ok(&mut out, "got");
    } else if upper.starts_with("SETMETADATA") && m.metadata.is_some() {
        // SETMETADATA "" ("entry" "value")
        let (mailbox, rest) = quoted(rest).unwrap();
        assert_eq!(mailbox, "", "server annotations only");
        let (entry, rest) = quoted(rest).unwrap();
        let (value, _) = quoted(rest).unwrap();
        m.metadata.as_mut().unwrap().insert(entry, value);
        ok(&mut out, "set");
    } else if upper.starts_with("LOGIN") {
        ok(&mut out, "logged in");
    } else if upper.starts_with("LIST") {
        let d = m.delimiter;
        for name in m.folders.keys() {
            out.extend_from_slice(
                format!("* LIST (\\HasNoChildren) \"{d}\" \"{name}\"\r\n").as_bytes(),
            );
        }
        ok(&mut out, "done");
    } else if upper.starts_with("SELECT") || upper.starts_with("EXAMINE") {
        let name = rest.split('"').nth(1).unwrap_or("").to_string();
        match m.folders.get(&name) {
            Some(f) => {
                let next = f.keys().last().map_or(1, |u| u + 1);
                out.extend_from_slice(
                    format!(
                        "* {} EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT {next}] ok\r\n* FLAGS (\\Seen)\r\n* OK [PERMANENTFLAGS (\\Seen \\*)] ok\r\n",
                        f.len()
                    )
                    .as_bytes(),
                );
                *selected = Some(name);
                ok(&mut out, "[READ-WRITE] selected");
            }
            None => {
                *selected = None;
                out.extend_from_slice(format!("{tag} NO Mailbox doesn't exist\r\n").as_bytes());
            }
        }
    } else if let Some(args) = upper.strip_prefix("UID SEARCH UID ") {
        let folder = m.folders.get(selected.as_deref().unwrap()).unwrap();
        let max = folder.keys().last().copied().unwrap_or(0);
        let set = args.split_whitespace().next().unwrap();
        let open_range = set.contains('*');
        let mut hits: Vec<u32> = uid_set(set, max)
            .into_iter()
            .filter(|u| folder.contains_key(u) || (open_range && m.ghosts.contains(u)))
            .collect();
        hits.sort_unstable();
        hits.dedup();
        let list: Vec<String> = hits.iter().map(u32::to_string).collect();
        out.extend_from_slice(format!("* SEARCH {}\r\n", list.join(" ")).as_bytes());
        ok(&mut out, "searched");
    } else if let Some(args) = upper.strip_prefix("UID FETCH ") {
        let folder = m.folders.get(selected.as_deref().unwrap()).unwrap().clone();
        let (set, items) = args.split_once(' ').unwrap();
        let max = folder.keys().last().copied().unwrap_or(0);
        let body = items.contains("BODY.PEEK[]");
        let mut refused = false;
        for uid in uid_set(set, max) {
            let Some(bytes) = folder.get(&uid) else {
                continue;
            };
            let seq = folder.keys().position(|u| *u == uid).unwrap() + 1;
            if body && m.refuse.contains(&uid) {
                refused = true;
                continue;
            }
            if body && m.omit.contains(&uid) {
                continue;
            }
            if body {
                out.extend_from_slice(
                    format!(
                        "* {seq} FETCH (UID {uid} FLAGS () INTERNALDATE \"01-Jan-2026 10:00:00 +0000\" RFC822.SIZE {} BODY[] {{{}}}\r\n",
                        bytes.len(),
                        bytes.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(bytes);
                out.extend_from_slice(b")\r\n");
            } else {
                out.extend_from_slice(
                    format!("* {seq} FETCH (UID {uid} RFC822.SIZE {})\r\n", bytes.len()).as_bytes(),
                );
            }
        }
        if refused {
            out.extend_from_slice(
                format!("{tag} NO [SERVERBUG] Internal error occurred. Refer to server log for more information.\r\n").as_bytes(),
            );
        } else {
            ok(&mut out, "fetched");
        }
    } else if upper.starts_with("UID STORE") || upper.starts_with("NOOP") {
        ok(&mut out, "done");
    } else if upper.starts_with("LOGOUT") {
        out.extend_from_slice(b"* BYE bye\r\n");
        ok(&mut out, "done");
    } else {
        out.extend_from_slice(format!("{tag} BAD unknown command\r\n").as_bytes());
    }
    out
}

/// A config for one IMAP mailbox on the scripted server, loaded as the
/// daemon loads it: keys in `profile`/`mailbox` go to those tables.
fn config(dir: &Path, port: u16, profile: &str, mailbox: &str) -> crm_mailsync::config::Config {
    let text = format!(
        r#"
[daemon]
state_dir = "{state}"

[admin]
enabled = false

[[profiles]]
name = "srv"
type = "imap_smtp"
host = "127.0.0.1"
port = {port}
tls = "plain"
allow_insecure = true
idle = false
batch_size = 50
{profile}

[[mailboxes]]
name = "mb"
profile = "srv"
email = "mb@example.test"
approval = "approved"
username = "mb"
password = "secret"
{mailbox}
"#,
        state = dir.join("state").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    crm_mailsync::config::load(&path).unwrap()
}

struct Rig {
    connector: ImapConnector,
    store: Arc<SledStore>,
    ctx: PipelineContext,
    _dir: tempfile::TempDir,
}

fn rig(port: u16, profile: &str, mailbox: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), port, profile, mailbox);
    let mb = &cfg.mailboxes[0];
    let settings: ImapSettings =
        crm_mailsync::daemon::imap_settings(cfg.profile_of(mb).unwrap(), mb).unwrap();
    let store = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    Rig {
        connector: ImapConnector::new(settings, store.clone()),
        ctx: PipelineContext::for_mailbox(&cfg, mb),
        store,
        _dir: dir,
    }
}

/// What one sync cycle did.
#[derive(Debug, Default)]
struct Cycle {
    /// Recorded messages by source (folder/uid).
    recorded: Vec<String>,
    /// (folder/uid, reason) of quarantined messages.
    quarantined: Vec<(String, String)>,
    notices: Vec<crm_mailsync::connector::Notice>,
}

impl Rig {
    /// One cycle as the scheduler runs it: fetch, process, commit the batch
    /// with its positions, until the connector has nothing more.
    async fn cycle(&mut self) -> Cycle {
        let mut out = Cycle::default();
        loop {
            let batch: FetchBatch = self.connector.fetch().await.unwrap();
            out.notices.extend(batch.notices.clone());
            if batch.messages.is_empty() && batch.positions.is_empty() {
                return out;
            }
            let (mut commit, results) =
                pipeline::process(self.store.as_ref(), &self.ctx, &batch.messages, 0).unwrap();
            commit.positions = batch
                .positions
                .into_iter()
                .map(|(f, p)| ("mb".to_string(), f, p))
                .collect();
            self.store.commit(commit).unwrap();
            for (source, r) in results {
                let at = format!("{}/{}", source.folder, source.uid);
                match r {
                    ItemResult::Correlated { .. } => out.recorded.push(at),
                    ItemResult::Quarantined { reason, .. } => out.quarantined.push((at, reason)),
                    ItemResult::AlreadySeen => {}
                }
            }
            if !batch.more {
                return out;
            }
        }
    }

    fn retry_list(&self, folder: &str) -> Vec<(u64, u32)> {
        self.store
            .folder_positions("mb")
            .unwrap()
            .get(folder)
            .map(|p| p.retry.iter().map(|r| (r.uid, r.tries)).collect())
            .unwrap_or_default()
    }
}

fn inbox_with(uids: &[u32]) -> Shared {
    let mut m = Model {
        delimiter: '/',
        ..Default::default()
    };
    let inbox = m.folders.entry("INBOX".into()).or_default();
    for u in uids {
        inbox.insert(*u, message(&format!("m{u}")));
    }
    Arc::new(Mutex::new(m))
}

/// Regression (#17 §3): a tagged NO to a FETCH failed the whole cycle, every
/// cycle (one poison message stopped the mailbox). Now the message is
/// isolated, the rest is recorded, the position holds it for retry (stored,
/// so it survives restarts), and after `missing_message_retries` more cycles
/// it is quarantined with the server's reason.
#[tokio::test]
async fn fetch_no_for_one_message_quarantines_it_after_retries_and_the_rest_goes_on() {
    let model = inbox_with(&[1, 2, 3]);
    model.lock().unwrap().refuse.insert(2);
    let port = serve(model.clone()).await;
    let mut rig = rig(port, "missing_message_retries = 2", "");

    let c = rig.cycle().await;
    assert_eq!(c.recorded, vec!["INBOX/1", "INBOX/3"], "{c:?}");
    assert!(c.quarantined.is_empty(), "{c:?}");
    assert_eq!(rig.retry_list("INBOX"), vec![(2, 1)]);
    // A restart (a fresh connector on the same store) keeps the count.
    let settings_port = port;
    let store = rig.store.clone();
    let dir_cfg = config(
        rig._dir.path(),
        settings_port,
        "missing_message_retries = 2",
        "",
    );
    let mb = &dir_cfg.mailboxes[0];
    rig.connector = ImapConnector::new(
        crm_mailsync::daemon::imap_settings(dir_cfg.profile_of(mb).unwrap(), mb).unwrap(),
        store,
    );
    let c = rig.cycle().await;
    assert!(c.recorded.is_empty() && c.quarantined.is_empty(), "{c:?}");
    assert_eq!(rig.retry_list("INBOX"), vec![(2, 2)]);
    // New mail keeps flowing while the bad one waits.
    model
        .lock()
        .unwrap()
        .folders
        .get_mut("INBOX")
        .unwrap()
        .insert(4, message("m4"));
    let c = rig.cycle().await;
    assert_eq!(c.recorded, vec!["INBOX/4"], "{c:?}");
    assert_eq!(c.quarantined.len(), 1, "{c:?}");
    let (at, reason) = &c.quarantined[0];
    assert_eq!(at, "INBOX/2");
    assert!(
        reason.contains("failed 3 times")
            && reason.contains("SERVERBUG")
            && reason.contains("left on the server in INBOX"),
        "{reason}"
    );
    assert!(rig.retry_list("INBOX").is_empty());
    // Nothing more: the quarantined message is not fetched again.
    let c = rig.cycle().await;
    assert!(c.recorded.is_empty() && c.quarantined.is_empty(), "{c:?}");
    let quarantine = rig.store.quarantined(10).unwrap();
    assert_eq!(quarantine.len(), 1);
    assert_eq!(quarantine[0].saved_as, "", "never downloaded, no bytes");
}

/// Regression (#17 §3): a UID that SEARCH returned but FETCH did not (no
/// body, no error) advanced the position silently and was never seen again.
/// Now it is retried at the next cycle, and recorded once the server delivers.
#[tokio::test]
async fn uid_left_out_of_fetch_is_retried_next_cycle_not_skipped() {
    let model = inbox_with(&[1, 2, 3]);
    model.lock().unwrap().omit.insert(2);
    let port = serve(model.clone()).await;
    let mut rig = rig(port, "", "");
    let c = rig.cycle().await;
    assert_eq!(c.recorded, vec!["INBOX/1", "INBOX/3"], "{c:?}");
    assert_eq!(rig.retry_list("INBOX"), vec![(2, 1)]);
    let positions = rig.store.folder_positions("mb").unwrap();
    assert_eq!(positions["INBOX"].next_uid, 4);
    // The server delivers it now.
    model.lock().unwrap().omit.clear();
    let c = rig.cycle().await;
    assert_eq!(c.recorded, vec!["INBOX/2"], "{c:?}");
    assert!(rig.retry_list("INBOX").is_empty());
}

/// A message expunged between SEARCH and FETCH is simply gone: no retry, no
/// quarantine record.
#[tokio::test]
async fn uid_expunged_between_search_and_fetch_is_dropped() {
    let model = inbox_with(&[1, 3]);
    model.lock().unwrap().ghosts.insert(2);
    let port = serve(model.clone()).await;
    let mut rig = rig(port, "", "");
    let c = rig.cycle().await;
    assert_eq!(c.recorded, vec!["INBOX/1", "INBOX/3"], "{c:?}");
    assert!(c.quarantined.is_empty(), "{c:?}");
    assert!(rig.retry_list("INBOX").is_empty());
}

/// Regression (#17 §7): on a server whose hierarchy separator is `.`,
/// `tracked_folders = [{ folder = "INBOX/Customers" }]` disabled the whole
/// mailbox (`folder "INBOX/Customers" does not exist`). Now `/` in the
/// configuration maps to the server's separator from LIST, source keys and
/// folder rules keep the configured `INBOX/Customers`, and a folder that
/// really is missing only raises a Warning naming it and the nearest folders.
#[tokio::test]
async fn dot_separator_server_maps_configured_slash_names_and_a_missing_folder_only_warns() {
    let mut m = Model {
        delimiter: '.',
        ..Default::default()
    };
    m.folders
        .entry("INBOX".into())
        .or_default()
        .insert(1, message("inbox-1"));
    m.folders
        .entry("INBOX.Customers".into())
        .or_default()
        .insert(1, message("customers-1"));
    m.folders.entry("INBOX.Contoso".into()).or_default();
    let model: Shared = Arc::new(Mutex::new(m));
    let port = serve(model.clone()).await;
    let mut rig = rig(
        port,
        "",
        r#"tracked_folders = [
  { folder = "INBOX/Customers", regarding = "account:customers" },
  { folder = "INBOX/Custmers", regarding = "account:typo" },
]"#,
    );
    let line = rig.connector.test().await.unwrap();
    assert!(
        line.contains("1 missing on the server: INBOX/Custmers"),
        "{line}"
    );
    let c = rig.cycle().await;
    let mut recorded = c.recorded.clone();
    recorded.sort();
    assert_eq!(recorded, vec!["INBOX/1", "INBOX/Customers/1"], "{c:?}");
    let warnings: Vec<&String> = c
        .notices
        .iter()
        .filter(|n| n.level == AlertLevel::Warning)
        .map(|n| &n.text)
        .collect();
    assert_eq!(warnings.len(), 1, "{c:?}");
    let w = warnings[0];
    assert!(
        w.contains("folder \"INBOX/Custmers\" does not exist")
            && w.contains("looked for \"INBOX.Custmers\"")
            && w.contains("nearest existing: \"INBOX/Customers\"")
            && w.contains("keeps syncing"),
        "{w}"
    );
    assert!(
        model
            .lock()
            .unwrap()
            .seen
            .iter()
            .any(|l| l.ends_with("SELECT \"INBOX.Customers\"")),
        "the server's name is what is selected"
    );
    // The folder rule applies under the configured name.
    let all = rig
        .store
        .activities(&crm_mailsync::store::ActivityQuery {
            mailbox: None,
            before: None,
            limit: 10,
        })
        .unwrap();
    let filed = all
        .iter()
        .find(|a| a.source.folder == "INBOX/Customers")
        .expect("activity from INBOX/Customers");
    assert_eq!(
        filed.regarding.as_ref().map(|r| r.to_string()).as_deref(),
        Some("account:customers")
    );
    // The follow-up (keyword, default $CRMTracked) finds the folder too.
    rig.connector
        .acknowledge(vec![crm_mailsync::connector::Ack {
            source: filed.source.clone(),
            kind: crm_mailsync::connector::AckKind::Recorded,
        }])
        .await
        .unwrap();
    let seen = model.lock().unwrap().seen.clone();
    let store_at = seen
        .iter()
        .position(|l| l.contains("UID STORE 1 +FLAGS.SILENT ($CRMTracked)"))
        .unwrap_or_else(|| panic!("no keyword STORE in {seen:?}"));
    let selected_before = seen[..store_at]
        .iter()
        .rev()
        .find(|l| l.contains("SELECT"))
        .unwrap();
    assert!(
        selected_before.ends_with("SELECT \"INBOX.Customers\""),
        "{seen:?}"
    );
    // Still missing next cycle: no second Warning, the rest keeps syncing.
    model
        .lock()
        .unwrap()
        .folders
        .get_mut("INBOX")
        .unwrap()
        .insert(2, message("inbox-2"));
    let c = rig.cycle().await;
    assert_eq!(c.recorded, vec!["INBOX/2"], "{c:?}");
    assert!(c.notices.is_empty(), "{c:?}");
}

/// With METADATA (RFC 5464) the deployment marker is a server annotation:
/// claimed when there is none, ours left alone without a write, another
/// deployment's refused, taken over when forced; no folder is created.
#[tokio::test]
async fn the_deployment_marker_is_a_server_annotation_where_the_server_has_metadata() {
    use crm_mailsync::connector::ConnectorError;
    use crm_mailsync::deployment::{claim, Claim, Claiming, Deployment};
    const ENTRY: &str = "/private/vendor/crm-mailsync/deployment";

    let model = inbox_with(&[1]);
    model.lock().unwrap().metadata = Some(BTreeMap::new());
    let port = serve(model.clone()).await;
    let mut rig = rig(port, "", "");
    let a = Deployment {
        id: "deployment-a-0001".into(),
        host: "crm-a".into(),
    };
    let b = Deployment {
        id: "deployment-b-0002".into(),
        host: "crm-b".into(),
    };
    let claiming = |deployment: &'static Deployment, force| Claiming {
        mailbox: "mb",
        deployment,
        force,
        enabled: true,
    };
    let (a, b): (&'static Deployment, &'static Deployment) =
        (Box::leak(Box::new(a)), Box::leak(Box::new(b)));
    // The annotation as the server holds it, by field.
    let held = |model: &Shared| -> BTreeMap<String, String> {
        let m = model.lock().unwrap();
        let value = m.metadata.as_ref().unwrap().get(ENTRY).unwrap().clone();
        value
            .split("; ")
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    };
    let sets = |model: &Shared| {
        model
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|l| l.contains("SETMETADATA"))
            .count()
    };

    assert_eq!(
        claim(&mut rig.connector, claiming(a, false)).await.unwrap(),
        Claim::Claimed
    );
    assert_eq!(held(&model)["deployment"], "deployment-a-0001");
    assert_eq!(held(&model)["host"], "crm-a");
    assert_eq!(sets(&model), 1);

    // Ours: read, not written again.
    assert_eq!(
        claim(&mut rig.connector, claiming(a, false)).await.unwrap(),
        Claim::Ours
    );
    assert_eq!(sets(&model), 1);

    // Another deployment is refused and writes nothing.
    let refused = claim(&mut rig.connector, claiming(b, false))
        .await
        .unwrap_err();
    let ConnectorError::OtherDeployment(other) = &refused else {
        panic!("{refused:?}");
    };
    assert_eq!(other.marker.deployment, "deployment-a-0001");
    assert!(refused.to_string().contains("test?force=true"), "{refused}");
    assert_eq!(sets(&model), 1);
    assert_eq!(held(&model)["deployment"], "deployment-a-0001");

    // Forced, it takes the mailbox over.
    match claim(&mut rig.connector, claiming(b, true)).await.unwrap() {
        Claim::TakenOver(old) => assert_eq!(old.deployment, "deployment-a-0001"),
        other => panic!("{other:?}"),
    }
    assert_eq!(held(&model)["deployment"], "deployment-b-0002");
    let seen = model.lock().unwrap().seen.clone();
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("CREATE") || l.contains("APPEND")),
        "no marker folder with METADATA: {seen:?}"
    );
    // The mailbox still syncs on the same connection.
    assert_eq!(rig.cycle().await.recorded, vec!["INBOX/1".to_string()]);
}
