//! The backend's own promises ([`crate::store::kv`]), below any rule of
//! the semantic layer.

use std::sync::atomic::{AtomicBool, Ordering};

use super::Fixture;
use crate::store::kv::{KeyRange, KvBackend, ScanOrder, WriteBatch};

fn put_all(kv: &impl KvBackend, entries: &[(&[u8], &[u8])]) {
    let mut b = WriteBatch::default();
    for (k, v) in entries {
        b.put(k.to_vec(), v.to_vec());
    }
    kv.apply(b).unwrap();
}

/// A reader never sees part of a batch: a writer moves two keys to the
/// same value in each batch (`a` sorts, and in sled is written, first)
/// while a reader reads `a` then `b`; `b` read after `a` can never be older
/// than `a`. Within one batch the last write to a key wins, and puts and
/// deletes apply together.
pub fn backend_batch_is_all_or_nothing<F: Fixture>(f: &F) {
    let kv = f.open();
    let mut b = WriteBatch::default();
    b.put(b"k/1".to_vec(), b"x".to_vec());
    b.put(b"k/2".to_vec(), b"gone".to_vec());
    b.delete(b"k/2".to_vec());
    b.put(b"k/1".to_vec(), b"y".to_vec());
    kv.apply(b).unwrap();
    assert_eq!(kv.get(b"k/1").unwrap(), Some(b"y".to_vec()));
    assert_eq!(kv.get(b"k/2").unwrap(), None);
    let mut b = WriteBatch::default();
    b.delete(b"k/1".to_vec());
    b.put(b"k/3".to_vec(), b"z".to_vec());
    kv.apply(b).unwrap();
    assert!(!kv.contains(b"k/1").unwrap() && kv.contains(b"k/3").unwrap());
    kv.apply(WriteBatch::default()).unwrap();

    let n = |v: Option<Vec<u8>>| u64::from_be_bytes(v.unwrap().try_into().unwrap());
    put_all(
        &kv,
        &[(b"p/a", &0u64.to_be_bytes()), (b"p/b", &0u64.to_be_bytes())],
    );
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 1..=2_000u64 {
                let mut b = WriteBatch::default();
                b.put(b"p/a".to_vec(), i.to_be_bytes());
                b.put(b"p/b".to_vec(), i.to_be_bytes());
                kv.apply(b).unwrap();
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut reads = 0;
        while !done.load(Ordering::SeqCst) || reads == 0 {
            let a = n(kv.get(b"p/a").unwrap());
            let b = n(kv.get(b"p/b").unwrap());
            assert!(b >= a, "read a={a} then b={b}: half a batch was visible");
            let both = kv
                .scan(&KeyRange::prefix(b"p/"), ScanOrder::Descending, 0)
                .unwrap();
            assert_eq!(both.len(), 2);
            reads += 1;
        }
    });
    assert_eq!(n(kv.get(b"p/a").unwrap()), 2_000);
    assert_eq!(n(kv.get(b"p/b").unwrap()), 2_000);
}

/// Scans run in unsigned byte order, forward and reverse, within a range
/// (start inclusive, end exclusive), up to a limit; a prefix covers every
/// key that starts with it, `0xff` bytes included, and nothing else.
pub fn backend_scans_run_in_key_order_within_their_bounds<F: Fixture>(f: &F) {
    let kv = f.open();
    let keys: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"a/".to_vec(),
        vec![b'a', b'/', 0],
        vec![b'a', b'/', 0, 0xff],
        vec![b'a', b'/', 1],
        vec![b'a', b'/', 0x7f],
        vec![b'a', b'/', 0x80],
        vec![b'a', b'/', 0xff],
        vec![b'a', b'/', 0xff, 0xff],
        b"a0".to_vec(),
        b"b".to_vec(),
        vec![0xff],
        vec![0xff, 0xff],
    ];
    // Written out of order, in two batches.
    let mut shuffled = keys.clone();
    shuffled.reverse();
    shuffled.swap(0, 5);
    for chunk in shuffled.chunks(7) {
        let mut b = WriteBatch::default();
        for k in chunk {
            b.put(k.clone(), k.clone());
        }
        kv.apply(b).unwrap();
    }
    let all = KeyRange {
        start: Vec::new(),
        end: None,
    };
    let forward = kv.scan_keys(&all, ScanOrder::Ascending, 0).unwrap();
    assert_eq!(forward, keys, "unsigned byte order");
    let mut reverse = kv.scan_keys(&all, ScanOrder::Descending, 0).unwrap();
    reverse.reverse();
    assert_eq!(reverse, keys);
    // Values come with their keys.
    for (k, v) in kv.scan(&all, ScanOrder::Ascending, 0).unwrap() {
        assert_eq!(k, v);
    }
    let under =
        |p: &[u8]| -> Vec<Vec<u8>> { keys.iter().filter(|k| k.starts_with(p)).cloned().collect() };
    for prefix in [
        &b"a/"[..],
        &[b'a', b'/', 0xff],
        &[0xff],
        &b"a"[..],
        &b"c"[..],
    ] {
        let r = KeyRange::prefix(prefix);
        assert_eq!(
            kv.scan_keys(&r, ScanOrder::Ascending, 0).unwrap(),
            under(prefix),
            "prefix {prefix:?}"
        );
        let mut rev = kv.scan_keys(&r, ScanOrder::Descending, 0).unwrap();
        rev.reverse();
        assert_eq!(rev, under(prefix), "prefix {prefix:?} reversed");
        assert_eq!(kv.count(&r).unwrap(), under(prefix).len() as u64);
    }
    let p = KeyRange::prefix(b"a/");
    assert_eq!(
        kv.scan_keys(&p, ScanOrder::Ascending, 2).unwrap(),
        under(b"a/")[..2].to_vec()
    );
    assert_eq!(
        kv.scan_keys(&p, ScanOrder::Descending, 2).unwrap(),
        vec![vec![b'a', b'/', 0xff, 0xff], vec![b'a', b'/', 0xff]]
    );
    // Start inclusive, end exclusive; from a start within a prefix.
    let r = KeyRange::between(vec![b'a', b'/', 1], vec![b'a', b'/', 0xff]);
    assert_eq!(
        kv.scan_keys(&r, ScanOrder::Ascending, 0).unwrap(),
        vec![
            vec![b'a', b'/', 1],
            vec![b'a', b'/', 0x7f],
            vec![b'a', b'/', 0x80]
        ]
    );
    let r = KeyRange::prefix_from(b"a/", vec![b'a', b'/', 0x80]);
    assert_eq!(kv.count(&r).unwrap(), 3);
    // An empty or inverted range holds nothing.
    for r in [
        KeyRange::between(b"b".to_vec(), b"a".to_vec()),
        KeyRange::between(b"a".to_vec(), b"a".to_vec()),
    ] {
        assert!(kv.scan(&r, ScanOrder::Ascending, 0).unwrap().is_empty());
        assert!(kv.scan(&r, ScanOrder::Descending, 0).unwrap().is_empty());
        assert_eq!(kv.count(&r).unwrap(), 0);
    }
    assert_eq!(kv.get(b"a/").unwrap(), Some(b"a/".to_vec()));
    assert_eq!(kv.get(b"a/x").unwrap(), None);
}

/// What was applied and flushed is there after a reopen, and ids handed out
/// after it are fresh: larger than every id before (which were strictly
/// increasing).
pub fn backend_data_and_ids_survive_a_reopen<F: Fixture>(f: &F) {
    let before: Vec<u64> = {
        let kv = f.open();
        put_all(&kv, &[(b"d/1", b"one"), (b"d/2", b"two")]);
        let mut b = WriteBatch::default();
        b.delete(b"d/1".to_vec());
        kv.apply(b).unwrap();
        kv.flush().unwrap();
        (0..100).map(|_| kv.generate_id().unwrap()).collect()
    };
    assert!(before.windows(2).all(|w| w[0] < w[1]), "{before:?}");
    let kv = f.open();
    assert_eq!(kv.get(b"d/1").unwrap(), None);
    assert_eq!(kv.get(b"d/2").unwrap(), Some(b"two".to_vec()));
    let after = kv.generate_id().unwrap();
    assert!(after > *before.last().unwrap(), "{after} reused");
}
