//! Server bytes through the IMAP response codec (imap-proto, as async-imap
//! decodes its stream, response after response) and every decoder of ours
//! that reads what the server sent: greeting, status text, untagged events,
//! COPYUID, LIST names (modified UTF-7) and attributes, INTERNALDATE (its
//! zone once panicked on a non-ASCII byte), header Message-IDs. Must never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    crm_mailsync::connector::imap::fuzz_server_bytes(data);
});
