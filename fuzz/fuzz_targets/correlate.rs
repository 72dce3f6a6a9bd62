//! The whole correlate path on arbitrary bytes: parse → features (with the
//! body fingerprint) → lookup keys → a small in-memory index (the input is
//! also indexed as a tracked email, so the next run of every method sees
//! candidates) → correlate, in both smart-matching modes. Must never panic.
#![no_main]

use crm_mailsync::correlate::{
    correlate, index_entry, lookup_keys, CorrelationSettings, MemIndex, SmartMode,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = crm_mailsync::parse::parse(data, "INBOX", 1 << 20) else {
        return;
    };
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
        }
    }
});
