//! Server bytes through the IMAP response codec (imap-proto, as async-imap
//! decodes its stream, response after response) and every decoder of ours
//! that reads what the server sent: greeting, status text, untagged events,
//! COPYUID, LIST names (modified UTF-7) and attributes, INTERNALDATE (its
//! zone once panicked on a non-ASCII byte), header Message-IDs. Must never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // libfuzzer-sys aborts on every panic, even a caught one. imap-proto
        // 0.17 panics on `* OK [CODE]\xff text` (found here; upstream's,
        // caught inside `fuzz_server_bytes`); every other panic still aborts.
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_imap_proto = info
                .location()
                .is_some_and(|l| l.file().contains("imap-proto"));
            if !in_imap_proto {
                abort_hook(info);
            }
        }));
    },
    |data: &[u8]| {
        crm_mailsync::connector::imap::fuzz_server_bytes(data);
    }
);
