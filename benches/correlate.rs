//! Parse-only (mail-parser) versus parse + correlate per incoming message,
//! against 10k and 1M tracked emails.
//!
//! A generator builds realistic synthetic threads: bodies are sentences
//! re-combined from the words of the repository's fixtures, sized like the
//! shared corpus generator (`testservers/mailgen.py`: median ~2–3 KB raw,
//! 3 % long bodies, 10 % multipart/alternative with quoted-printable HTML,
//! 3 % base64 attachments, Received/Return-Path headers); replies quote the
//! start of their parent; a third keep In-Reply-To/References, a third lose
//! them but carry a tracking token (mangled), a third lose both and rely on
//! scored smart matching. The tracked emails are indexed in memory
//! ([`MemIndex`], the same structure the pipeline overlays on the store)
//! once, outside the timed loop.
//!
//! Lines: `parse_only` is mail-parser alone; `parse_correlate` is what
//! correlation costs in the pipeline (our parse without the content hash,
//! staged keys and methods, the body fingerprint only when scored smart
//! matching must run); `parse_correlate_smart_off` the Dynamics default;
//! `parse_correlate_eager_body` the pre-staging behaviour (fingerprint for
//! every message). `dedupe_content_hash` is the SHA-256 content hash that
//! deduplication (filter stage, not correlation) computes per message; it is
//! measured alone and belongs to the per-message cost of the pipeline too.
//! Indexing a tracked email (fingerprint of its full body when scored smart
//! matching is on) is persist work and not in these lines;
//! `index_body_fingerprint` measures it alone. `parse_correlate_sled`
//! (10k only) is `parse_correlate` with the keys resolved in a real
//! [`SledStore`] holding the same tracked emails, as the daemon does; its
//! caches are warm after the first iteration, as a running daemon's are for
//! replies to recent mail.
//!
//! Run: `cargo bench --bench correlate` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crm_mailsync::correlate::{
    correlate, correlate_staged, index_entry, lookup_keys, CorrelationSettings, MemIndex,
    MessageFeatures,
};
use crm_mailsync::model::{CorrelationMethod, Direction, EmailActivity, RecordRef, SourceKey};
use crm_mailsync::store::{CommitBatch, PendingItem, SledStore, Store};

const MEASURED: usize = 200;
const BASE_TIME: i64 = 1_767_000_000;
/// Tracked mail spans 60 days, inside the 90-day smart-matching window.
const SPAN: i64 = 60 * 86_400;

/// Words from the fixtures (bodies and subjects), for realistic text.
fn vocabulary() -> Vec<String> {
    let mut words = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                words.extend(
                    text.split_whitespace()
                        .filter(|w| w.chars().all(|c| c.is_alphabetic()) && w.len() > 2)
                        .map(|w| w.to_lowercase()),
                );
            }
        }
    }
    words.sort();
    words.dedup();
    assert!(words.len() > 100, "fixtures have too few words");
    words
}

struct Gen {
    words: Vec<String>,
}

/// Standard normal variate (Box–Muller), for log-normal body sizes.
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let (u, v) = (rng.f64().max(1e-12), rng.f64());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Wraps a paragraph at 72 columns, as mail clients do.
fn wrap(text: &str) -> String {
    let mut out = String::new();
    let mut col = 0;
    for w in text.split(' ') {
        if col > 0 && col + 1 + w.len() > 72 {
            out.push('\n');
            col = 0;
        } else if col > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(w);
        col += w.len();
    }
    out
}

/// Minimal quoted-printable encoder (soft breaks at 76 columns).
fn qp(text: &str) -> String {
    let mut out = String::new();
    for line in text.split('\n') {
        let mut col = 0;
        for b in line.bytes() {
            let enc = if b == b'=' || !(32..127).contains(&b) {
                format!("={b:02X}")
            } else {
                (b as char).to_string()
            };
            if col + enc.len() > 75 {
                out.push_str("=\n");
                col = 0;
            }
            col += enc.len();
            out.push_str(&enc);
        }
        out.push('\n');
    }
    out
}

impl Gen {
    fn sentence(&self, rng: &mut fastrand::Rng, n: usize) -> String {
        let mut s: Vec<&str> = (0..n)
            .map(|_| self.words[rng.usize(..self.words.len())].as_str())
            .collect();
        s.push(".");
        s.join(" ")
    }

    /// Paragraphs of message `i`'s own text, shaped like the shared corpus
    /// generator (`testservers/mailgen.py`): log-normal size around 1.75 KB
    /// (150 B – 19 KB), 3 % long ones of 20–100 KB, greeting and closing.
    fn own_paragraphs(&self, i: usize) -> Vec<String> {
        let mut rng = fastrand::Rng::with_seed(i as u64);
        let target = if rng.f64() < 0.03 {
            20_000 + rng.usize(..80_000)
        } else {
            ((1750f64.ln() + 0.75 * normal(&mut rng)).exp() as usize).clamp(150, 19_000)
        };
        let mut pars = vec![format!("Hi customer{},", i % 5000)];
        let mut size = 0;
        while size < target {
            let n = 1 + rng.usize(..5);
            let par: Vec<String> = (0..n)
                .map(|_| {
                    let k = 6 + rng.usize(..10);
                    self.sentence(&mut rng, k)
                })
                .collect();
            let par = wrap(&par.join(" "));
            size += par.len() + 2;
            pars.push(par);
        }
        pars.push(format!("Best regards,\nAgent {}", i % 40));
        pars
    }

    /// Deterministic body of tracked email `i`.
    fn body(&self, i: usize) -> String {
        self.own_paragraphs(i).join("\n\n") + "\n"
    }
    /// Subject of tracked email `i`: a tenth share generic subjects (big
    /// smart-matching buckets), the rest are specific; a third carry a token.
    fn subject(&self, i: usize) -> String {
        let mut rng = fastrand::Rng::with_seed(i as u64 ^ 0x5eed);
        let base = if i.is_multiple_of(10) {
            ["Question", "Invoice", "Hello", "Order status"][i % 4].to_string()
        } else {
            format!(
                "{} {} {i}",
                self.sentence(&mut rng, 3).trim_end_matches(" ."),
                "ref"
            )
        };
        if i % 3 == 1 {
            format!("{base} {}", token(i))
        } else {
            base
        }
    }

    fn tracked(&self, i: usize, n: usize) -> MessageFeatures {
        let mut f = MessageFeatures {
            message_ids: vec![format!("t{i}@crm.example")],
            subject: self.subject(i),
            from: vec!["support@us.example".into()],
            to: vec![format!("customer{}@c{}.example", i % 5000, i % 700)],
            sent_at: Some(BASE_TIME + (i as i64) * SPAN / n as i64),
            ..Default::default()
        };
        f.add_body_features(&self.body(i));
        f
    }

    /// Raw incoming reply to tracked email `parent`: own text, then (65 %,
    /// top-posting) or inside it the parent's first paragraphs quoted with an
    /// attribution line; 10 % multipart/alternative with a quoted-printable
    /// HTML part, 3 % multipart/mixed with a base64 attachment of 0.5–24 KB.
    fn reply(&self, k: usize, parent: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(k as u64 ^ 0xa11ce);
        let parent_pars = self.own_paragraphs(parent);
        let quote_n = (2 + rng.usize(..3)).min(parent_pars.len());
        let quoted: Vec<String> = parent_pars[..quote_n]
            .iter()
            .map(|p| {
                p.lines()
                    .map(|l| format!("> {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        let quote = format!(
            "On Mon, 1 Mar 2026 at 09:{:02}, Agent {} <support@us.example> wrote:\n{}",
            k % 60,
            parent % 40,
            quoted.join("\n>\n")
        );
        let own = self.own_paragraphs(1_000_000_000 + k);
        let text = if rng.f64() < 0.65 {
            format!("{}\n\n{quote}\n", own.join("\n\n"))
        } else {
            format!("{}\n\n{quote}\n\n{}\n", own[0], own[1..].join("\n\n"))
        };
        let mut h = format!(
            "Return-Path: <customer{c}@c{d}.example>\nReceived: from mail.c{d}.example (mail.c{d}.example [198.51.100.{r}])\n\tby mx.us.example (Postfix) with ESMTPS id {k:010X}\n\tfor <support@us.example>; Tue, 2 Mar 2026 10:00:03 +0000\nMessage-ID: <r{k}@c.example>\nFrom: Customer <customer{c}@c{d}.example>\nTo: support@us.example\nDate: Tue, 2 Mar 2026 10:00:00 +0000\nMIME-Version: 1.0\n",
            c = parent % 5000,
            d = parent % 700,
            r = 1 + k % 254,
        );
        let subject = self.subject(parent);
        match k % 3 {
            0 => h.push_str(&format!(
                "Subject: RE: {subject}\nIn-Reply-To: <t{parent}@crm.example>\nReferences: <x{k}@elsewhere.example> <t{parent}@crm.example>\n"
            )),
            // Headers stripped; the token (if any) survives, mangled.
            1 => h.push_str(&format!(
                "Subject: AW: [EXTERNAL] {}\n",
                subject.replace("CRM:", "crm : ")
            )),
            _ => h.push_str(&format!("Subject: Re: {subject}\n")),
        }
        let plain = format!("Content-Type: text/plain; charset=\"utf-8\"\nContent-Transfer-Encoding: 7bit\n\n{text}");
        let kind = rng.f64();
        let body = if kind < 0.10 {
            let html: String = text
                .split("\n\n")
                .map(|p| format!("<p>{}</p>\n", p.replace('\n', "<br>\n")))
                .collect();
            format!(
                "Content-Type: multipart/alternative; boundary=\"=_alt_{k}\"\n\n--=_alt_{k}\n{plain}\n--=_alt_{k}\nContent-Type: text/html; charset=\"utf-8\"\nContent-Transfer-Encoding: quoted-printable\n\n{}\n--=_alt_{k}--\n",
                qp(&format!("<html><body style=\"font-family: sans-serif\">\n{html}</body></html>"))
            )
        } else if kind < 0.13 {
            {
                let size = (500.0 * (rng.f64() * 48f64.ln()).exp()) as usize;
                let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(data);
                let lines: Vec<&str> = b64
                    .as_bytes()
                    .chunks(76)
                    .map(|c| std::str::from_utf8(c).unwrap_or_default())
                    .collect();
                format!(
                    "Content-Type: multipart/mixed; boundary=\"=_{k}\"\n\nThis is a multi-part message in MIME format.\n\n--=_{k}\n{plain}\n--=_{k}\nContent-Type: application/pdf; name=\"doc{k}.pdf\"\nContent-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=\"doc{k}.pdf\"\n\n{}\n--=_{k}--\n",
                    lines.join("\n")
                )
            }
        } else {
            plain
        };
        format!("{h}{body}").into_bytes()
    }
}

fn token(i: usize) -> String {
    format!("CRM:0{:03}{:03}", (i / 1000) % 1000, i % 1000)
}

/// Tracked emails come four to a case.
fn record_of(i: usize) -> RecordRef {
    format!("case:{}", i / 4)
        .parse()
        .unwrap_or_else(|_| unreachable!())
}

fn build_index(g: &Gen, n: usize, s: &CorrelationSettings) -> MemIndex {
    let mut idx = MemIndex::default();
    for i in 0..n {
        let f = g.tracked(i, n);
        let (id, r) = (i as u64 + 1, record_of(i));
        idx.insert_message_ids(&f.message_ids, id, Some(r.clone()));
        idx.insert_entry(&index_entry(&f, id, s), Some(r));
    }
    idx
}

/// The same tracked emails committed to a real [`SledStore`] (activity,
/// regarding record and index entries, as the pipeline writes them), in
/// batches of 1,000.
fn build_sled(g: &Gen, n: usize, s: &CorrelationSettings, dir: &Path) -> SledStore {
    let store = SledStore::open(dir).unwrap_or_else(|e| panic!("open sled store: {e}"));
    let mut batch = CommitBatch::default();
    for i in 0..n {
        let f = g.tracked(i, n);
        let (id, r) = (i as u64 + 1, record_of(i));
        batch.index.push(index_entry(&f, id, s));
        batch
            .items
            .push(PendingItem::Activity(Box::new(EmailActivity {
                id,
                mailbox: "bench".into(),
                source: SourceKey {
                    mailbox: "bench".into(),
                    folder: "Sent".into(),
                    uidvalidity: 1,
                    uid: id.to_string(),
                },
                message_ids: f.message_ids,
                in_reply_to: f.in_reply_to,
                references: f.references,
                direction: Direction::Outgoing,
                subject: f.subject,
                from: f.from,
                to: f.to,
                cc: f.cc,
                sent_at: f.sent_at,
                received_at: f.sent_at.unwrap_or(BASE_TIME),
                regarding: Some(r),
                method: CorrelationMethod::Custom,
                score: 1.0,
                reasons: Vec::new(),
                correlated_with: None,
                content_hash: format!("h{id}"),
                size: 1,
                also_seen_as: Vec::new(),
                forwarded_by: None,
                automatic: None,
                no_reply: false,
                parties: vec![],
                send: None,
            })));
        if batch.items.len() == 1_000 || i + 1 == n {
            store
                .commit(std::mem::take(&mut batch))
                .unwrap_or_else(|e| panic!("commit: {e}"));
        }
    }
    store
}

/// [`parse_and_correlate`] resolving its keys in the sled store, as the
/// pipeline does (the staged overlay of a batch is empty here).
#[inline(never)]
fn parse_and_correlate_store(raw: &[u8], store: &SledStore, s: &CorrelationSettings) -> bool {
    let parsed = crm_mailsync::parse::parse_for(raw, "INBOX", 50 << 20, s.wants_body_features());
    let Ok(mut p) = parsed else {
        return false;
    };
    let d = correlate_staged(&mut p.features, &p.body_text, s, |k, slice| {
        store.lookup_into(k, slice)
    });
    d.is_ok_and(|d| d.regarding.is_some())
}

/// The baseline: mail-parser alone, as an application would call it.
///
/// Every measured path is a named function that is never inlined, so a
/// profiler, and `benches/instructions.sh` (callgrind's `--toggle-collect`),
/// can count each one alone.
#[inline(never)]
fn mail_parser_parse(raw: &[u8]) -> Option<mail_parser::Message<'_>> {
    mail_parser::MessageParser::default().parse(raw)
}

/// What the pipeline does per message for correlation: parse (without the
/// dedupe content hash, measured on its own line), cheap keys and methods,
/// and only when those do not decide (scored smart matching on and no
/// header, token or Thread-Index match) the body fingerprint, its keys and
/// the full method run.
#[inline(never)]
fn parse_and_correlate(raw: &[u8], idx: &MemIndex, s: &CorrelationSettings) -> bool {
    // As the pipeline: the text body is decoded only for scored smart matching.
    let parsed = crm_mailsync::parse::parse_for(raw, "INBOX", 50 << 20, s.wants_body_features());
    let Ok(mut p) = parsed else {
        return false;
    };
    let d = correlate_staged(&mut p.features, &p.body_text, s, |k, slice| {
        idx.fill(k, slice);
        Ok::<_, std::convert::Infallible>(())
    });
    d.is_ok_and(|d| d.regarding.is_some())
}

/// The same without staging: body fingerprint for every message (the
/// behaviour before staged correlation), for comparison.
#[inline(never)]
fn parse_and_correlate_eager(raw: &[u8], idx: &MemIndex, s: &CorrelationSettings) -> bool {
    let Ok(mut p) = crm_mailsync::parse::parse_without_hash(raw, "INBOX", 50 << 20) else {
        return false;
    };
    if s.wants_body_features() {
        p.features.add_body_features(&p.body_text);
    }
    let keys = lookup_keys(&p.features, s);
    correlate(&p.features, &idx.lookup(&keys), s)
        .regarding
        .is_some()
}

/// Cumulative stages, to see where parse + correlate spends its time.
fn stages(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    raws: &[Vec<u8>],
    idx: &MemIndex,
    s: &CorrelationSettings,
) {
    let parsed: Vec<_> = raws
        .iter()
        .filter_map(|r| crm_mailsync::parse::parse(r, "INBOX", 50 << 20).ok())
        .collect();
    group.bench_function("stage_crate_parse", |b| {
        b.iter(|| {
            for r in raws {
                black_box(
                    crm_mailsync::parse::parse_without_hash(black_box(r), "INBOX", 50 << 20)
                        .is_ok(),
                );
            }
        })
    });
    group.bench_function("stage_crate_parse_no_body", |b| {
        b.iter(|| {
            for r in raws {
                black_box(
                    crm_mailsync::parse::parse_for(black_box(r), "INBOX", 50 << 20, false).is_ok(),
                );
            }
        })
    });
    group.bench_function("stage_body_features", |b| {
        b.iter(|| {
            for p in &parsed {
                let mut f = p.features.clone();
                f.add_body_features(black_box(&p.body_text));
                black_box(f);
            }
        })
    });
    let featured: Vec<MessageFeatures> = parsed
        .iter()
        .map(|p| {
            let mut f = p.features.clone();
            f.add_body_features(&p.body_text);
            f
        })
        .collect();
    group.bench_function("stage_lookup_keys", |b| {
        b.iter(|| {
            for f in &featured {
                black_box(lookup_keys(black_box(f), s));
            }
        })
    });
    let keys: Vec<_> = featured.iter().map(|f| lookup_keys(f, s)).collect();
    group.bench_function("stage_index_lookup", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(idx.lookup(black_box(k)));
            }
        })
    });
    let slices: Vec<_> = keys.iter().map(|k| idx.lookup(k)).collect();
    group.bench_function("stage_correlate", |b| {
        b.iter(|| {
            for (f, i) in featured.iter().zip(&slices) {
                black_box(correlate(black_box(f), i, s));
            }
        })
    });
}

fn bench(c: &mut Criterion) {
    let g = Gen {
        words: vocabulary(),
    };
    let s = CorrelationSettings {
        smart_matching: true,
        ..Default::default()
    };
    let sizes: Vec<usize> = std::env::var("CORRELATE_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| {
            // `cargo test --all-targets` runs benches once as smoke tests: keep
            // that quick; the 1M index (≈2.6 GB, minutes) is for `cargo bench`.
            if std::env::args().any(|a| a == "--bench") {
                vec![10_000, 1_000_000]
            } else {
                vec![2_000]
            }
        });
    for n in sizes {
        let idx = build_index(&g, n, &s);
        let mut rng = fastrand::Rng::with_seed(7);
        // CORRELATE_BENCH_KIND=0|1|2 keeps only one kind of reply (headers
        // kept | token only | neither), to see what each costs.
        let kind: Option<usize> = std::env::var("CORRELATE_BENCH_KIND")
            .ok()
            .and_then(|v| v.parse().ok());
        let raws: Vec<Vec<u8>> = (0..)
            .map(|k| (k, rng.usize(..n)))
            .filter(|(k, _)| kind.is_none_or(|want| k % 3 == want))
            .take(MEASURED)
            .map(|(k, parent)| g.reply(k, parent))
            .collect();
        // Parse decodes the first text body alone where it can; it must be
        // what a full parse decodes (this is a bench, so only checked here).
        let alone = raws
            .iter()
            .filter_map(|r| {
                crm_mailsync::parse::first_text_body_without_full_parse(r).map(|b| (r, b))
            })
            .inspect(|(r, b)| {
                assert_eq!(
                    crm_mailsync::parse::first_text_body_by_full_parse(r).as_ref(),
                    Ok(b)
                )
            })
            .count();
        println!("{n} tracked: the first text body of {alone}/{MEASURED} replies is decoded alone");
        let matched = raws
            .iter()
            .filter(|r| parse_and_correlate(r, &idx, &s))
            .count();
        // How far staged correlation had to go for these replies.
        let mut fingerprinted = 0;
        let mut by_method: std::collections::BTreeMap<String, usize> = Default::default();
        for r in &raws {
            let Ok(mut p) = crm_mailsync::parse::parse_for(r, "INBOX", 50 << 20, true) else {
                continue;
            };
            let Ok(d) = correlate_staged(&mut p.features, &p.body_text, &s, |k, slice| {
                idx.fill(k, slice);
                Ok::<_, std::convert::Infallible>(())
            });
            fingerprinted += usize::from(!p.features.quoted_shingles.is_empty());
            *by_method.entry(format!("{:?}", d.method)).or_default() += 1;
        }
        println!("{n} tracked: decided by {by_method:?}; {fingerprinted} needed the quoted-text fingerprint");
        let bytes: usize = raws.iter().map(Vec::len).sum();
        let mut sizes: Vec<usize> = raws.iter().map(Vec::len).collect();
        sizes.sort_unstable();
        println!(
            "{n} tracked: {matched}/{MEASURED} generated replies correlate; raw size mean {} B, median {} B",
            bytes / MEASURED,
            sizes[MEASURED / 2]
        );
        let mut group = c.benchmark_group(format!("tracked_{n}"));
        group.throughput(Throughput::Elements(MEASURED as u64));
        let mail_parser_only = |b: &mut criterion::Bencher<'_>| {
            b.iter(|| {
                for r in &raws {
                    black_box(mail_parser_parse(black_box(r)));
                }
            })
        };
        group.bench_function("parse_only", mail_parser_only);
        if std::env::var_os("CORRELATE_BENCH_STAGES").is_some() {
            stages(&mut group, &raws, &idx, &s);
        }
        // Deduplication, not correlation: the pipeline hashes every message
        // to find copies of the same email (filter/dedupe stage).
        let features: Vec<MessageFeatures> = raws
            .iter()
            .filter_map(|r| crm_mailsync::parse::parse_without_hash(r, "INBOX", 50 << 20).ok())
            .map(|p| p.features)
            .collect();
        group.bench_function("dedupe_content_hash", |b| {
            b.iter(|| {
                for (r, f) in raws.iter().zip(&features) {
                    black_box(crm_mailsync::parse::dedupe_hash(black_box(r), f));
                }
            })
        });
        let bodies: Vec<String> = raws
            .iter()
            .filter_map(|r| crm_mailsync::parse::parse_without_hash(r, "INBOX", 50 << 20).ok())
            .map(|p| p.body_text.into_owned())
            .collect();
        group.bench_function("index_body_fingerprint", |b| {
            b.iter(|| {
                for t in &bodies {
                    black_box(crm_mailsync::correlate::fingerprint::body_shingles(
                        black_box(t),
                    ));
                }
            })
        });
        group.bench_function("parse_correlate_eager_body", |b| {
            b.iter(|| {
                for r in &raws {
                    black_box(parse_and_correlate_eager(black_box(r), &idx, &s));
                }
            })
        });
        group.bench_function("parse_correlate", |b| {
            b.iter(|| {
                for r in &raws {
                    black_box(parse_and_correlate(black_box(r), &idx, &s));
                }
            })
        });
        // Dynamics defaults: smart matching off, so no body fingerprint.
        let defaults = CorrelationSettings::default();
        group.bench_function("parse_correlate_smart_off", |b| {
            b.iter(|| {
                for r in &raws {
                    black_box(parse_and_correlate(black_box(r), &idx, &defaults));
                }
            })
        });
        // The production path: the same replies, keys resolved in a real
        // sled store holding the same tracked emails (10k only: building it
        // writes every activity to disk).
        if n <= 10_000 {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
            let store = build_sled(&g, n, &s, dir.path());
            let matched_store = raws
                .iter()
                .filter(|r| parse_and_correlate_store(r, &store, &s))
                .count();
            assert_eq!(
                matched_store, matched,
                "sled and in-memory index decide alike"
            );
            // Scored smart matching, then the Dynamics defaults (off).
            for (name, settings) in [
                ("parse_correlate_sled", &s),
                ("parse_correlate_sled_smart_off", &defaults),
            ] {
                group.bench_function(name, |b| {
                    b.iter(|| {
                        for r in &raws {
                            black_box(parse_and_correlate_store(black_box(r), &store, settings));
                        }
                    })
                });
            }
        }
        // mail-parser alone once more, last: its time moves with what ran
        // before it (heap state after building the index), so both the
        // first and the last measurement are shown.
        group.bench_function("parse_only_last", mail_parser_only);
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
