//! The whole correlate path on arbitrary bytes: parse → features (with the
//! body fingerprint) → lookup keys → a small in-memory index (the input is
//! also indexed as a tracked email, so the next run of every method sees
//! candidates) → correlate, and staged correlation as the pipeline runs it,
//! in both smart-matching modes. Must never panic.
//!
//! Also differential: where parse decodes the first text body alone (no
//! full mail-parser parse), it must be what a full parse decodes, and the
//! header-only parse must read what the parse with the body reads.
#![no_main]

use crm_mailsync::correlate::{
    correlate, correlate_staged, index_entry, lookup_keys, CorrelationSettings, MemIndex,
    SmartMode,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // libfuzzer-sys aborts on every panic, even a caught one. The parse
        // stage catches mail-parser's own debug assertions (they become a
        // quarantine reason); every other panic still aborts.
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_mail_parser = info
                .location()
                .is_some_and(|l| l.file().contains("mail-parser"));
            if !in_mail_parser {
                abort_hook(info);
            }
        }));
    },
    |data: &[u8]| {
    if let Some(alone) = crm_mailsync::parse::first_text_body_without_full_parse(data) {
        if let Ok(full) = crm_mailsync::parse::first_text_body_by_full_parse(data) {
            assert_eq!(alone, full, "first text body decoded alone");
        }
    }
    let Ok(p) = crm_mailsync::parse::parse(data, "INBOX", 1 << 20) else {
        return;
    };
    match crm_mailsync::parse::parse_for(data, "INBOX", 1 << 20, false) {
        Ok(headers_only) => {
            assert_eq!(headers_only.features, p.features, "header-only parse");
            assert_eq!(headers_only.auto, p.auto, "header-only parse");
        }
        Err(e) => panic!("header-only parse rejects what parse accepts: {e}"),
    }
    let mut f = p.features;
    f.add_body_features(&p.body_text);
    for mode in [SmartMode::Scored, SmartMode::Dynamics] {
        let mut s = CorrelationSettings {
            smart_matching: true,
            ..Default::default()
        };
        s.smart.mode = mode;
        let mut idx = MemIndex::default();
        // Index the message itself as tracked, then correlate it against
        // itself: exercises every method's match path, not only misses.
        let r = "case:1".parse().ok();
        idx.insert_message_ids(&f.message_ids, 1, r.clone());
        idx.insert_entry(&index_entry(&f, 1, &s), r);
        let mut reply = f.clone();
        reply.in_reply_to = f.message_ids.clone();
        reply.quoted_shingles = f.body_shingles.clone();
        for m in [&f, &reply] {
            let keys = lookup_keys(m, &s);
            let _ = correlate(m, &idx.lookup(&keys), &s);
            // The pipeline's way: keys and features stage by stage.
            let mut staged = m.clone();
            staged.quoted_shingles.clear();
            let _ = correlate_staged(&mut staged, &p.body_text, &s, |k, slice| {
                idx.fill(k, slice);
                Ok::<_, std::convert::Infallible>(())
            });
        }
    }
});
