//! Parse-only (mail-parser) versus parse + correlate per incoming message,
//! against 10k and 1M tracked emails.
//!
//! A generator builds realistic synthetic threads: bodies are sentences
//! re-combined from the words of the repository's fixtures, replies quote
//! their parent, a third keep In-Reply-To/References, a third lose them but
//! carry a tracking token (mangled), a third lose both and rely on scored
//! smart matching. The tracked emails are indexed in memory ([`MemIndex`],
//! the same structure the pipeline overlays on the store) once, outside the
//! timed loop.
//!
//! Run: `cargo bench --bench correlate` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crm_mailsync::correlate::{
    correlate, index_entry, lookup_keys, CorrelationSettings, MemIndex, MessageFeatures,
};
use crm_mailsync::model::RecordRef;

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

impl Gen {
    fn sentence(&self, rng: &mut fastrand::Rng, n: usize) -> String {
        let mut s: Vec<&str> = (0..n)
            .map(|_| self.words[rng.usize(..self.words.len())].as_str())
            .collect();
        s.push(".");
        s.join(" ")
    }

    /// Deterministic body of tracked email `i`.
    fn body(&self, i: usize) -> String {
        let mut rng = fastrand::Rng::with_seed(i as u64);
        (0..4)
            .map(|_| self.sentence(&mut rng, 12))
            .collect::<Vec<_>>()
            .join("\n")
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

    /// Raw incoming reply to tracked email `parent`.
    fn reply(&self, k: usize, parent: usize, n: usize) -> Vec<u8> {
        let quoted: String = self
            .body(parent)
            .lines()
            .map(|l| format!("> {l}\r\n"))
            .collect();
        let mut rng = fastrand::Rng::with_seed(k as u64);
        let mut h = format!(
            "Message-ID: <r{k}@c.example>\r\nFrom: Customer <customer{}@c{}.example>\r\nTo: support@us.example\r\nDate: Tue, 2 Mar 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n",
            parent % 5000,
            parent % 700
        );
        let subject = self.subject(parent);
        match k % 3 {
            0 => h.push_str(&format!(
                "Subject: RE: {subject}\r\nIn-Reply-To: <t{parent}@crm.example>\r\nReferences: <x{k}@elsewhere.example> <t{parent}@crm.example>\r\n"
            )),
            // Headers stripped; the token (if any) survives, mangled.
            1 => h.push_str(&format!(
                "Subject: AW: [EXTERNAL] {}\r\n",
                subject.replace("CRM:", "crm : ")
            )),
            _ => h.push_str(&format!("Subject: Re: {subject}\r\n")),
        }
        let _ = n;
        format!(
            "{h}\r\n{}\r\n\r\nOn Mon, 1 Mar 2026, Support wrote:\r\n{quoted}",
            self.sentence(&mut rng, 20)
        )
        .into_bytes()
    }
}

fn token(i: usize) -> String {
    format!("CRM:0{:03}{:03}", (i / 1000) % 1000, i % 1000)
}

fn build_index(g: &Gen, n: usize, s: &CorrelationSettings) -> MemIndex {
    let mut idx = MemIndex::default();
    for i in 0..n {
        let f = g.tracked(i, n);
        let r: RecordRef = format!("case:{}", i / 4)
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let id = i as u64 + 1;
        idx.insert_message_ids(&f.message_ids, id, Some(r.clone()));
        idx.insert_entry(&index_entry(&f, id, s), Some(r));
    }
    idx
}

fn parse_and_correlate(raw: &[u8], idx: &MemIndex, s: &CorrelationSettings) -> bool {
    let Ok(mut p) = crm_mailsync::parse::parse(raw, "INBOX", 50 << 20) else {
        return false;
    };
    if s.wants_body_features() {
        p.features.add_body_features(&p.body_text);
    }
    let keys = lookup_keys(&p.features, s);
    let d = correlate(&p.features, &idx.lookup(&keys), s);
    d.regarding.is_some()
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
                black_box(crm_mailsync::parse::parse(black_box(r), "INBOX", 50 << 20).is_ok());
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
        .unwrap_or_else(|| vec![10_000, 1_000_000]);
    for n in sizes {
        let idx = build_index(&g, n, &s);
        let mut rng = fastrand::Rng::with_seed(7);
        let raws: Vec<Vec<u8>> = (0..MEASURED)
            .map(|k| g.reply(k, rng.usize(..n), n))
            .collect();
        let matched = raws
            .iter()
            .filter(|r| parse_and_correlate(r, &idx, &s))
            .count();
        println!("{n} tracked: {matched}/{MEASURED} generated replies correlate");
        let mut group = c.benchmark_group(format!("tracked_{n}"));
        group.throughput(Throughput::Elements(MEASURED as u64));
        group.bench_function("parse_only", |b| {
            b.iter(|| {
                for r in &raws {
                    black_box(mail_parser::MessageParser::default().parse(black_box(r)));
                }
            })
        });
        if std::env::var_os("CORRELATE_BENCH_STAGES").is_some() {
            stages(&mut group, &raws, &idx, &s);
        }
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
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
