//! Correlation precision and recall on real mailing-list threads, read in
//! place from `../shared/corpora/` (never copied into the repository):
//! notmuch `default/` and `lkml/`, and fedora-devel January 2010.
//!
//! Ground truth: threads are the connected components of In-Reply-To and
//! References links between messages present in the set. Messages are
//! replayed in date order; every message is tracked after its decision, the
//! first of a thread to a new record `thread:N`, later ones to their thread's
//! record (as if earlier decisions had been right, so each decision is
//! measured on its own). A message should attach when an earlier message of
//! its thread exists; it attaches correctly when `regarding` is its thread's
//! record. Run twice: headers intact, and with In-Reply-To, References and
//! Thread-Index stripped (only tokens and smart matching can work then).
//!
//! Run with `cargo test --release --test corpus_quality -- --nocapture` to see
//! the figures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crm_mailsync::correlate::{
    correlate, index_entry, lookup_keys, CorrelationSettings, MemIndex, MessageFeatures, SmartMode,
};
use crm_mailsync::model::RecordRef;
use crm_mailsync::parse;
use crm_mailsync::replay::split_mbox;

/// Overrides where the corpora are (the test below points it at a missing
/// directory); default `../shared/corpora`.
const CORPORA_ENV: &str = "CRM_MAILSYNC_CORPORA_DIR";

/// The corpora directory when `sub` exists in it. When it does not, a local
/// run skips (the corpora live outside the repository), but under `CI=true`
/// the test fails: a CI run that silently measured nothing would look green.
fn corpora_or_skip(sub: &str) -> Option<PathBuf> {
    let corpora = std::env::var_os(CORPORA_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpora"));
    if corpora.join(sub).is_dir() {
        return Some(corpora);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "corpus_quality: {} is absent and CI=true: the corpora are required in CI",
        corpora.join(sub).display()
    );
    println!(
        "corpus_quality: skipped, {} is absent",
        corpora.join(sub).display()
    );
    None
}

/// Runs one test of this file in a child process with the corpora missing.
fn run_without_corpora(test: &str, ci: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CORPORA_ENV, "/nonexistent/crm-mailsync-corpora")
        .env_remove("CI");
    if let Some(v) = ci {
        cmd.env("CI", v);
    }
    cmd.output().unwrap()
}

#[test]
fn missing_corpora_fail_under_ci_and_skip_locally() {
    for test in [
        "precision_and_recall_on_real_threads",
        "partial_parses_read_what_a_full_parse_reads_on_every_corpus_message",
    ] {
        let ci = run_without_corpora(test, Some("true"));
        let out =
            String::from_utf8_lossy(&ci.stdout).to_string() + &String::from_utf8_lossy(&ci.stderr);
        assert!(!ci.status.success(), "{test} passed under CI=true:\n{out}");
        assert!(out.contains("required in CI"), "{test}:\n{out}");
        let local = run_without_corpora(test, None);
        let out = String::from_utf8_lossy(&local.stdout);
        assert!(local.status.success(), "{test} failed locally:\n{out}");
        assert!(out.contains("corpus_quality: skipped"), "{test}:\n{out}");
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("README")
            || name.starts_with("COPYING")
            || name.starts_with("LICENSE")
            || name.ends_with(".md")
        {
            continue;
        }
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

struct Msg {
    features: MessageFeatures,
    body: String,
    /// 0-based position in the fedora mbox (the thread page's `msgNNNNN`).
    fedora_pos: Option<usize>,
}

/// The messages of notmuch `default/` and `lkml/` and fedora-devel; with
/// `with_perl` also the Perl Mail-Box and Mail-Thread mboxes (the latter
/// are awkward threading cases collected for a threading library's tests).
fn load(corpora: &Path, with_perl: bool) -> Vec<Msg> {
    let mut raws: Vec<(Vec<u8>, Option<usize>)> = Vec::new();
    for sub in ["notmuch/default", "notmuch/lkml"] {
        let mut files = Vec::new();
        files_under(&corpora.join(sub), &mut files);
        for f in files {
            raws.push((std::fs::read(f).unwrap(), None));
        }
    }
    if with_perl {
        let mut boxes = vec![corpora.join("perl-mail-box/mbox.src")];
        for e in std::fs::read_dir(corpora.join("perl-mail-thread")).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("testbox")
            {
                boxes.push(p);
            }
        }
        boxes.sort();
        for b in boxes {
            raws.extend(
                split_mbox(&std::fs::read(b).unwrap())
                    .into_iter()
                    .map(|r| (r, None)),
            );
        }
    }
    let mbox = std::fs::read(corpora.join("fedora-devel-2010-01/2010-January.txt")).unwrap();
    raws.extend(
        split_mbox(&mbox)
            .into_iter()
            .enumerate()
            .map(|(i, r)| (r, Some(i))),
    );
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (raw, fedora_pos) in raws {
        let Ok(p) = parse::parse(&raw, "INBOX", 50 << 20) else {
            continue;
        };
        let Some(id) = p.features.message_ids.first() else {
            continue;
        };
        // Duplicates (same Message-ID) count once, as the store dedupes them.
        if !seen.insert(id.to_ascii_lowercase()) {
            continue;
        }
        out.push(Msg {
            features: p.features,
            body: p.body_text.into_owned(),
            fedora_pos,
        });
    }
    out
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// Thread (component) of each message. Referenced ids that are absent from
/// the set ("ghosts", with an `@`) join the messages that reference them, as
/// in the corpora README's "threads with ghosts".
fn threads(msgs: &[Msg]) -> Vec<usize> {
    let mut node: HashMap<String, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (m.features.message_ids[0].to_ascii_lowercase(), i))
        .collect();
    let mut parent: Vec<usize> = (0..msgs.len()).collect();
    for (i, m) in msgs.iter().enumerate() {
        for r in m.features.in_reply_to.iter().chain(&m.features.references) {
            let r = r.to_ascii_lowercase();
            if !r.contains('@') {
                continue;
            }
            let j = *node.entry(r).or_insert_with(|| {
                parent.push(parent.len());
                parent.len() - 1
            });
            let (a, b) = (find(&mut parent, i), find(&mut parent, j));
            parent[a] = b;
        }
    }
    (0..msgs.len()).map(|i| find(&mut parent, i)).collect()
}

/// Thread of each message with the fedora messages grouped as the archive's
/// own MHonArc thread page groups them (a top-level `<li>` is a thread,
/// nested items, "possible follow-ups" included, belong to it); notmuch
/// messages keep their header threads. Independent of the headers.
fn threads_by_fedora_page(msgs: &[Msg], header_threads: &[usize], page: &str) -> Vec<usize> {
    let mut top_of_pos: HashMap<usize, usize> = HashMap::new();
    let (mut depth, mut top_depth, mut current) = (0usize, usize::MAX, 0usize);
    for line in page.lines() {
        depth += line.matches("<ul>").count();
        if let Some(rest) = line.split("<a name=\"").nth(1) {
            if let Ok(pos) = rest[..5.min(rest.len())].parse::<usize>() {
                top_depth = top_depth.min(depth);
                if depth == top_depth {
                    current = pos;
                }
                top_of_pos.insert(pos, current);
            }
        }
        depth = depth.saturating_sub(line.matches("</ul>").count());
    }
    // Page threads get ids past every header thread id.
    let offset = msgs.len() * 4;
    msgs.iter()
        .enumerate()
        .map(
            |(i, m)| match m.fedora_pos.and_then(|p| top_of_pos.get(&p)) {
                Some(top) => offset + top,
                None => header_threads[i],
            },
        )
        .collect()
}

#[derive(Debug, Default)]
struct Figures {
    should_attach: usize,
    attached: usize,
    correct: usize,
    non_replies: usize,
    false_attach_non_reply: usize,
}

impl Figures {
    fn precision(&self) -> f64 {
        if self.attached == 0 {
            1.0
        } else {
            self.correct as f64 / self.attached as f64
        }
    }
    fn recall(&self) -> f64 {
        self.correct as f64 / self.should_attach.max(1) as f64
    }
}

fn evaluate(msgs: &[Msg], thread: &[usize], strip_headers: bool) -> Figures {
    let settings = CorrelationSettings {
        smart_matching: true,
        ..Default::default()
    };
    assert_eq!(settings.smart.mode, SmartMode::Scored);
    let mut order: Vec<usize> = (0..msgs.len()).collect();
    order.sort_by_key(|&i| (msgs[i].features.sent_at.unwrap_or(i64::MAX), i));
    let mut index = MemIndex::default();
    let mut record_of_thread: HashMap<usize, RecordRef> = HashMap::new();
    let mut fig = Figures::default();
    for (n, &i) in order.iter().enumerate() {
        let mut f = msgs[i].features.clone();
        if strip_headers {
            f.in_reply_to.clear();
            f.references.clear();
            f.thread_index = None;
        }
        f.add_body_features(&msgs[i].body);
        let keys = lookup_keys(&f, &settings);
        let d = correlate(&f, &index.lookup(&keys), &settings);
        let truth = record_of_thread.get(&thread[i]).cloned();
        match &truth {
            Some(_) => fig.should_attach += 1,
            None => fig.non_replies += 1,
        }
        if std::env::var_os("CORPUS_DEBUG").is_some() && d.regarding != truth {
            println!(
                "MISS strip={strip_headers} truth={truth:?} got={:?} subj={:?} from={:?} to={:?} :: {}",
                d.regarding,
                f.subject,
                f.from,
                f.to,
                d.reasons.join(" | ")
            );
        }
        if d.regarding.is_some() {
            fig.attached += 1;
            if d.regarding == truth {
                fig.correct += 1;
            } else if truth.is_none() {
                fig.false_attach_non_reply += 1;
            }
        }
        let record = truth.unwrap_or_else(|| {
            let r: RecordRef = format!("thread:{n}").parse().unwrap();
            record_of_thread.insert(thread[i], r.clone());
            r
        });
        let id = n as u64 + 1;
        index.insert_message_ids(&f.message_ids, id, Some(record.clone()));
        index.insert_entry(&index_entry(&f, id, &settings), Some(record));
    }
    fig
}

#[test]
fn precision_and_recall_on_real_threads() {
    let Some(corpora) = corpora_or_skip("fedora-devel-2010-01") else {
        return;
    };
    let msgs = load(&corpora, false);
    let thread = threads(&msgs);
    assert!(msgs.len() > 450, "only {} messages loaded", msgs.len());
    let intact = evaluate(&msgs, &thread, false);
    let stripped = evaluate(&msgs, &thread, true);
    let page =
        std::fs::read_to_string(corpora.join("fedora-devel-2010-01/2010-January_thread.html"))
            .unwrap();
    let page_thread = threads_by_fedora_page(&msgs, &thread, &page);
    let page_intact = evaluate(&msgs, &page_thread, false);
    let page_stripped = evaluate(&msgs, &page_thread, true);
    // Every real-list set of the corpora README (Perl's sets added): shown,
    // not asserted (see the comment below the floors).
    let all = load(&corpora, true);
    let all_page = threads_by_fedora_page(&all, &threads(&all), &page);
    let all_intact = evaluate(&all, &all_page, false);
    let all_stripped = evaluate(&all, &all_page, true);
    for (name, f, n) in [
        ("headers intact", &intact, msgs.len()),
        ("headers stripped", &stripped, msgs.len()),
        (
            "headers intact, fedora truth from its thread page",
            &page_intact,
            msgs.len(),
        ),
        (
            "headers stripped, fedora truth from its thread page",
            &page_stripped,
            msgs.len(),
        ),
        (
            "all real-list sets with Perl's, headers intact, fedora page truth",
            &all_intact,
            all.len(),
        ),
        (
            "all real-list sets with Perl's, headers stripped, fedora page truth",
            &all_stripped,
            all.len(),
        ),
    ] {
        println!(
            "corpus_quality {name}: {n} messages, {} should attach, {} attached, {} correct; precision {:.4}, recall {:.4}; false attachments of non-replies {}/{}",
            f.should_attach,
            f.attached,
            f.correct,
            f.precision(),
            f.recall(),
            f.false_attach_non_reply,
            f.non_replies
        );
    }
    // Floors actually reached. The aims are precision 0.999 /
    // recall 0.995 intact and 0.99 / 0.90 stripped.
    //
    // Stripped: header truth 0.990 / 0.961, fedora page truth 0.995 / 0.964;
    // both meet the aim. The four wrong attachments under header truth are
    // two mails of David A. Wheeler (below) and two parts of the lkml cifs
    // series "[RFC][PATCH k/10]", sent with `In-Reply-To: <yes>` (a git
    // send-email prompt answered wrongly): the header truth makes every part
    // its own thread, the series rule (same sender, same `[PATCH vX k/N]`
    // marker, a shared recipient, within two hours) links two of them to
    // their series. Recall: patch-series mails that neither share a subject
    // nor quote anything are what the series rule is for (0.841 → 0.961).
    //
    // Intact: the fedora archive's own thread page (independent of our
    // header reading) gives 1.0 / 1.0. Header truth misses the 0.999 aim by
    // the two Wheeler mails: they quote the "Common Lisp apps in Fedora"
    // thread (one 75 % of a thread message) while their In-Reply-To names a
    // digest that is not in the set, so header truth calls them new
    // threads; the thread page files both under that thread, as we do. The
    // series rule stays out of the way with headers intact: it only looks
    // for siblings of a message that carries no In-Reply-To/References.
    assert!(intact.precision() >= 0.995, "{intact:?}");
    assert!(intact.recall() >= 0.995, "{intact:?}");
    assert!(stripped.precision() >= 0.99, "{stripped:?}");
    assert!(stripped.recall() >= 0.95, "{stripped:?}");
    assert!(page_intact.precision() >= 0.999, "{page_intact:?}");
    assert!(page_intact.recall() >= 0.995, "{page_intact:?}");
    assert!(page_stripped.precision() >= 0.995, "{page_stripped:?}");
    assert!(page_stripped.recall() >= 0.95, "{page_stripped:?}");
    // With Perl's sets (87 more messages) precision drops to about 0.989
    // intact and 0.984 stripped: Mail-Thread's boxes are awkward cases on
    // purpose, and most misses there are short generic subjects ("Re: your
    // mail" between the same two people, several threads) that subject +
    // prefix + participants + recency attach without quoted text. Not
    // asserted: shown so that a change to the scoring sees its effect.
    assert!(all.len() > msgs.len());
}

/// Parse never runs mail-parser's full parse when it does not have to:
/// without scored smart matching it parses only the header section
/// (`parse_for(.., false)`), with it the first text body is decoded alone
/// where the MIME structure allows. On every message of every corpus — the
/// malformed-MIME sets of CPython, mail-parser and mime4j included — both
/// must read what a full parse reads. The one allowed difference: a full
/// parse that panicked inside mail-parser's body code (debug assertions)
/// and was caught as `ParserFailed`.
#[test]
fn partial_parses_read_what_a_full_parse_reads_on_every_corpus_message() {
    let Some(corpora) = corpora_or_skip("") else {
        return;
    };
    let mut files = Vec::new();
    files_under(&corpora, &mut files);
    let (mut compared, mut parsed, mut parser_failed, mut body_alone) = (0, 0, 0, 0);
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        for raw in split_mbox(&bytes) {
            let full = parse::parse_for(&raw, "INBOX", 50 << 20, true);
            let full_body = parse::first_text_body_by_full_parse(&raw);
            if matches!(full, Err(parse::Malformed::ParserFailed(_)))
                || matches!(full_body, Err(parse::Malformed::ParserFailed(_)))
            {
                parser_failed += 1;
                continue;
            }
            if let Ok(p) = &full {
                assert_eq!(Ok(&*p.body_text), full_body.as_deref(), "{}", f.display());
            }
            if let Some(alone) = parse::first_text_body_without_full_parse(&raw) {
                assert_eq!(Ok(&*alone), full_body.as_deref(), "{}", f.display());
                body_alone += usize::from(full.is_ok());
            }
            let full = full.map(|p| parse::ParsedMessage {
                body_text: "".into(),
                ..p
            });
            let headers_only = parse::parse_for(&raw, "INBOX", 50 << 20, false);
            assert_eq!(full, headers_only, "{}", f.display());
            compared += 1;
            parsed += usize::from(full.is_ok());
        }
    }
    println!(
        "corpus_quality: headers-only parse agreed on {compared} messages ({parsed} parsed; the rest, non-mail files of the corpora among them, rejected alike); the first text body of {body_alone} was decoded alone, as a full parse decodes it; {parser_failed} full parses panicked"
    );
    assert!(body_alone > parsed / 2, "{body_alone} of {parsed}");
    assert!(compared > 1000, "only {compared} messages compared");
}
