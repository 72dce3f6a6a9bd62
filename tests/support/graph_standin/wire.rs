//! The stand-in's mailbox model: folders by path, filing and moving
//! messages, JSON as Graph shows a message or a folder, delta rounds.

use std::sync::Arc;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use super::{DeltaState, FolderRec, Inner, Mailbox, Msg, Tombstone};

pub(crate) fn find_top(mb: &Mailbox, name: &str) -> Option<String> {
    let root = &mb.folders[0].id;
    find_child(mb, root, name)
}

pub(crate) fn find_child(mb: &Mailbox, parent: &str, name: &str) -> Option<String> {
    mb.folders
        .iter()
        .find(|f| f.parent.as_deref() == Some(parent) && f.name.eq_ignore_ascii_case(name))
        .map(|f| f.id.clone())
}

/// A display path → folder id (`Inbox` matches the well-known inbox).
pub(crate) fn resolve_path(mb: &Mailbox, path: &str) -> Option<String> {
    let mut id: Option<String> = None;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        id = Some(match &id {
            None => find_top(mb, seg)?,
            Some(p) => find_child(mb, p, seg)?,
        });
    }
    id
}

/// A folder reference in a URL or a body: an id or a well-known name.
pub(crate) fn resolve_ref<'a>(mb: &'a Mailbox, r: &str) -> Option<&'a FolderRec> {
    mb.folders.iter().find(|f| f.id == r).or_else(|| {
        mb.folders
            .iter()
            .find(|f| f.well_known.is_some_and(|w| w.eq_ignore_ascii_case(r)))
    })
}

pub(crate) fn folder_json(mb: &Mailbox, f: &FolderRec) -> Value {
    let total = mb.messages.values().filter(|m| m.folder == f.id).count();
    let unread = mb
        .messages
        .values()
        .filter(|m| m.folder == f.id && !m.is_read)
        .count();
    let children = mb
        .folders
        .iter()
        .filter(|x| x.parent.as_deref() == Some(f.id.as_str()))
        .count();
    json!({
        "id": f.id,
        "displayName": f.name,
        "parentFolderId": f.parent.clone().unwrap_or_default(),
        "childFolderCount": children,
        "unreadItemCount": unread,
        "totalItemCount": total,
        "sizeInBytes": 0,
        "isHidden": false,
    })
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn address(a: &str) -> Value {
    json!({"emailAddress": {"name": a, "address": a}})
}

/// The message as Graph shows it, `$select`ed (the id always).
pub(crate) fn message_json(m: &Msg, select: Option<&[String]>) -> Value {
    let mut all = Map::new();
    all.insert("@odata.type".into(), json!("#microsoft.graph.message"));
    all.insert(
        "@odata.etag".into(),
        json!(format!("W/\"CQAAABYAAAA{:08x}\"", m.seq)),
    );
    all.insert("id".into(), json!(m.id));
    all.insert("receivedDateTime".into(), json!(rfc3339(m.received)));
    all.insert("sentDateTime".into(), json!(rfc3339(m.received)));
    all.insert("createdDateTime".into(), json!(rfc3339(m.received)));
    all.insert("lastModifiedDateTime".into(), json!(rfc3339(m.received)));
    all.insert("subject".into(), json!(m.subject));
    all.insert("internetMessageId".into(), json!(m.internet_message_id));
    all.insert("conversationId".into(), json!(m.conversation_id));
    all.insert("conversationIndex".into(), json!(m.conversation_index));
    all.insert("categories".into(), json!(m.categories));
    all.insert("isRead".into(), json!(m.is_read));
    all.insert("parentFolderId".into(), json!(m.folder));
    all.insert(
        "from".into(),
        m.from.as_deref().map(address).unwrap_or(Value::Null),
    );
    all.insert(
        "toRecipients".into(),
        Value::Array(m.to.iter().map(|a| address(a)).collect()),
    );
    all.insert("hasAttachments".into(), json!(false));
    let Some(select) = select else {
        return Value::Object(all);
    };
    let mut out = Map::new();
    for (k, v) in all {
        if k.starts_with('@') || k == "id" || select.iter().any(|s| s.eq_ignore_ascii_case(&k)) {
            out.insert(k, v);
        }
    }
    Value::Object(out)
}

/// Header values the stand-in reads from a MIME message.
struct Headers {
    message_id: Option<String>,
    subject: String,
    from: Option<String>,
    to: Vec<String>,
    thread_index: Option<String>,
    thread_topic: Option<String>,
}

fn read_headers(mime: &[u8]) -> Headers {
    let parsed = mail_parser::MessageParser::default().parse(mime);
    let Some(p) = parsed else {
        return Headers {
            message_id: None,
            subject: String::new(),
            from: None,
            to: Vec::new(),
            thread_index: None,
            thread_topic: None,
        };
    };
    let addrs = |a: Option<&mail_parser::Address>| -> Vec<String> {
        a.map(|a| {
            a.iter()
                .filter_map(|x| x.address().map(|s| s.to_string()))
                .collect()
        })
        .unwrap_or_default()
    };
    let mut to = addrs(p.to());
    to.extend(addrs(p.cc()));
    to.extend(addrs(p.bcc()));
    let text = |name: &str| {
        p.header_raw(name)
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    Headers {
        message_id: p.message_id().map(|m| format!("<{m}>")),
        subject: p.subject().unwrap_or_default().to_string(),
        from: addrs(p.from()).into_iter().next(),
        to,
        thread_index: text("Thread-Index"),
        thread_topic: text("Thread-Topic"),
    }
}

/// Files a new message into `folder` of mailbox `key`; returns its id.
pub(crate) fn file_message(
    inner: &mut Inner,
    key: &str,
    folder: &str,
    mime: Arc<Vec<u8>>,
    received: DateTime<Utc>,
) -> String {
    let h = read_headers(&mime);
    let id = inner.new_id("Mm");
    let mb = inner.users.get_mut(key).unwrap();
    mb.seq += 1;
    // Exchange keys a conversation on its topic; the index's first 22
    // bytes name the conversation when there is one.
    let conversation_id = match &h.thread_index {
        Some(ti) => base64::engine::general_purpose::STANDARD
            .decode(ti)
            .ok()
            .map(|b| {
                b.iter()
                    .take(22)
                    .map(|x| format!("{x:02X}"))
                    .collect::<String>()
            })
            .unwrap_or_else(|| ti.clone()),
        // No index: the topic names the conversation (the hex of its
        // first 22 bytes, not just their count).
        None => format!(
            "AAQkAD{}",
            h.thread_topic
                .as_deref()
                .unwrap_or(h.subject.trim_start_matches("Re: "))
                .bytes()
                .take(22)
                .map(|b| format!("{b:02X}"))
                .collect::<String>()
        ),
    };
    let msg = Msg {
        id: id.clone(),
        folder: folder.to_string(),
        mime,
        internet_message_id: h.message_id,
        subject: h.subject,
        from: h.from,
        to: h.to,
        conversation_index: h.thread_index,
        conversation_id,
        received,
        categories: Vec::new(),
        is_read: false,
        seq: mb.seq,
    };
    mb.messages.insert(id.clone(), msg);
    id
}

/// Moves a message (same immutable id); false if it does not exist.
pub(crate) fn move_msg(mb: &mut Mailbox, id: &str, folder: &str) -> bool {
    mb.seq += 1;
    let seq = mb.seq;
    let Some(m) = mb.messages.get_mut(id) else {
        return false;
    };
    if m.folder != folder {
        mb.tombstones.push(Tombstone {
            folder: m.folder.clone(),
            id: id.to_string(),
            seq,
        });
        m.folder = folder.to_string();
    }
    m.seq = seq;
    true
}

/// Marks a message changed (a PATCH).
pub(crate) fn touch(mb: &mut Mailbox, id: &str) {
    mb.seq += 1;
    if let Some(m) = mb.messages.get_mut(id) {
        m.seq = mb.seq;
    }
}

/// Deletes a message for good (it leaves `@removed` behind).
pub(crate) fn remove_msg(mb: &mut Mailbox, id: &str) -> bool {
    let Some(m) = mb.messages.remove(id) else {
        return false;
    };
    mb.seq += 1;
    mb.tombstones.push(Tombstone {
        folder: m.folder,
        id: id.to_string(),
        seq: mb.seq,
    });
    true
}

/// Files the sent copies whose time has come.
pub(crate) fn file_due_sent(mb: &mut Mailbox) {
    let now = std::time::Instant::now();
    let due: Vec<Msg> = {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut mb.pending_sent)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        mb.pending_sent = later;
        due.into_iter().map(|(_, m)| m).collect()
    };
    for mut m in due {
        mb.seq += 1;
        m.seq = mb.seq;
        mb.messages.insert(m.id.clone(), m);
    }
}

/// One delta page: the listed entries and the state after them (`true`:
/// the round is complete, the state is the next round's).
pub(crate) fn delta_page(
    mb: &Mailbox,
    st: &DeltaState,
    page_size: usize,
) -> (Vec<Value>, DeltaState, bool) {
    let snapshot = st.snapshot.unwrap_or(mb.seq);
    let in_round = |seq: u64| seq > st.since && seq <= snapshot && seq > st.after;
    let mut entries: Vec<(u64, Value)> = mb
        .messages
        .values()
        .filter(|m| m.folder == st.folder && in_round(m.seq))
        .filter(|m| match st.received_from {
            Some((t, inclusive)) => m.received > t || (inclusive && m.received == t),
            None => true,
        })
        .map(|m| (m.seq, message_json(m, st.select.as_deref())))
        .collect();
    if st.since > 0 {
        for t in &mb.tombstones {
            let still_here = mb
                .messages
                .get(&t.id)
                .is_some_and(|m| m.folder == st.folder && m.seq <= snapshot);
            if t.folder == st.folder && in_round(t.seq) && !still_here {
                entries.push((
                    t.seq,
                    json!({"@odata.type": "#microsoft.graph.message", "id": t.id, "@removed": {"reason": "deleted"}}),
                ));
            }
        }
    }
    entries.sort_by_key(|(seq, _)| *seq);
    // A message moved out and back within the round is listed once.
    let mut seen = std::collections::HashSet::new();
    entries.retain(|(_, v)| seen.insert(v["id"].as_str().unwrap_or_default().to_string()));
    let more = entries.len() > page_size;
    entries.truncate(page_size);
    let last = entries.last().map(|(s, _)| *s);
    let values = entries.into_iter().map(|(_, v)| v).collect();
    if more {
        let next = DeltaState {
            snapshot: Some(snapshot),
            after: last.unwrap_or(st.after),
            ..st.clone()
        };
        (values, next, false)
    } else {
        let next = DeltaState {
            since: snapshot,
            snapshot: None,
            after: 0,
            received_from: None,
            ..st.clone()
        };
        (values, next, true)
    }
}
