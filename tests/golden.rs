//! Golden correlation tests: every scenario under `fixtures/correlation/` is
//! replayed through the real pipeline and sled store, and the decisions are
//! compared with `expected.jsonl` in that scenario.
//!
//! A scenario directory holds `scenario.json` (settings, seeds, folder rules),
//! `seeds/` (tracked first) and `mail/` (.eml files or a Maildir, name order).
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test --test golden`
//! and review the diff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crm_mailsync::config::{FolderRule, TrackFilter};
use crm_mailsync::correlate::token::SigningKey;
use crm_mailsync::correlate::{CorrelationSettings, SmartMode};
use crm_mailsync::filter::FilterPolicy;
use crm_mailsync::model::RecordRef;
use crm_mailsync::pipeline::PipelineContext;
use crm_mailsync::replay::{self, ReplayRecord};
use crm_mailsync::store::SledStore;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Scenario {
    /// Seed file name (under `seeds/`) → record.
    seeds: BTreeMap<String, String>,
    /// "dynamics" | "scored"; absent: smart matching off (the default).
    smart: Option<String>,
    signing_key: Option<String>,
    require_signature: bool,
    prefix: Option<String>,
    previous_prefixes: Vec<String>,
    /// Folder → record.
    folders: BTreeMap<String, String>,
    own_address: Option<String>,
}

fn context(s: &Scenario, dir: &Path) -> PipelineContext {
    let mut settings = CorrelationSettings::default();
    if let Some(mode) = &s.smart {
        settings.smart_matching = true;
        settings.smart.mode = match mode.as_str() {
            "dynamics" => SmartMode::Dynamics,
            "scored" => SmartMode::Scored,
            other => panic!("unknown smart mode {other}"),
        };
    }
    if let Some(p) = &s.prefix {
        settings.token.prefix = p.clone();
    }
    settings.token.previous_prefixes = s.previous_prefixes.clone();
    settings.token.signing = s.signing_key.as_ref().map(|k| SigningKey {
        current: k.as_bytes().to_vec(),
        previous: vec![],
    });
    settings.require_signature = s.require_signature;
    let own = vec![s
        .own_address
        .clone()
        .unwrap_or_else(|| "support@us.test".into())];
    PipelineContext {
        mailbox: "golden".into(),
        own_addresses: own.clone(),
        folder_rules: s
            .folders
            .iter()
            .map(|(f, r)| FolderRule {
                folder: f.clone(),
                regarding: r.parse().unwrap(),
            })
            .collect(),
        settings,
        policy: FilterPolicy {
            own_addresses: own,
            automatic: Default::default(),
            track: TrackFilter::All,
        },
        max_message_size: 1 << 20,
        quarantine_dir: dir.join("q"),
        forward_mailbox: false,
        parties: crm_mailsync::config::CrmSettings::default().parties,
    }
}

fn run_scenario(dir: &Path) -> Vec<ReplayRecord> {
    let s: Scenario = match std::fs::read_to_string(dir.join("scenario.json")) {
        Ok(text) => serde_json::from_str(&text).unwrap(),
        Err(_) => Scenario::default(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = SledStore::open(&tmp.path().join("store")).unwrap();
    let ctx = context(&s, tmp.path());
    let mut seeds = Vec::new();
    for (file, record) in &s.seeds {
        let record: RecordRef = record.parse().unwrap();
        for m in replay::collect_inputs(&[dir.join("seeds").join(file)]).unwrap() {
            seeds.push((m, record.clone()));
        }
    }
    let inputs = replay::collect_inputs(&[dir.join("mail")]).unwrap();
    assert!(!inputs.is_empty(), "{} has no mail", dir.display());
    let mut out = Vec::new();
    replay::run(
        &store,
        &ctx,
        &seeds,
        &inputs,
        1_767_600_000,
        &mut |mut r| {
            r.file = Path::new(&r.file)
                .strip_prefix(dir)
                .map(|p| p.display().to_string())
                .unwrap_or(r.file);
            out.push(r);
            Ok(())
        },
        &mut || {},
    )
    .unwrap();
    out
}

fn scenarios() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/correlation");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

#[test]
fn golden_decisions() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    let all = scenarios();
    assert!(all.len() >= 8, "scenarios missing: {all:?}");
    for dir in all {
        let got = run_scenario(&dir);
        let text: String = got
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        let expected_path = dir.join("expected.jsonl");
        if update {
            std::fs::write(&expected_path, &text).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != text {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- got\n{text}",
                dir.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatch (UPDATE_GOLDEN=1 to regenerate):\n{}",
        failures.join("\n")
    );
}
