//! One folder's `messages/delta` round: the first link, page parsing, and
//! what the connector keeps between fetches.

use std::collections::VecDeque;

use serde_json::Value;

use super::client::path_segment;
use super::error::GraphError;
use crate::model::UnixTime;

/// The properties asked for: the id to download, the receive time, and the
/// categories (the processed category is then added without reading them
/// first: one request per message less against Graph's per-mailbox limit).
const SELECT: &str = "id,receivedDateTime,internetMessageId,categories";

/// A message listed by a delta page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Item {
    /// Immutable message id.
    pub id: String,
    pub received_at: Option<UnixTime>,
    /// Its categories when listed (`None`: the page did not say).
    pub categories: Option<Vec<String>>,
}

/// Where a round goes after a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Next {
    /// `@odata.nextLink`: the round goes on.
    Page(String),
    /// `@odata.deltaLink`: the round is complete; the next one starts here.
    Done(String),
}

impl Next {
    pub(super) fn link(&self) -> &str {
        match self {
            Next::Page(l) | Next::Done(l) => l,
        }
    }
}

/// A delta page.
#[derive(Debug)]
pub(super) struct Page {
    pub items: Vec<Item>,
    pub next: Next,
}

/// A page in hand, partly handed out.
#[derive(Debug)]
pub(super) struct Round {
    /// The link that fetched this page: asked again if a batch ends inside it.
    pub page_link: String,
    /// Listed messages not handed out yet.
    pub items: VecDeque<Item>,
    pub next: Next,
}

/// The first request of a full round of `folder_id` (relative to the user).
pub(super) fn initial_link(folder_id: &str, from: Option<chrono::NaiveDate>) -> String {
    let mut link = format!(
        "mailFolders/{}/messages/delta?$select={SELECT}",
        path_segment(folder_id)
    );
    if let Some(d) = from {
        // The one filter message delta supports: receivedDateTime ge/gt.
        link.push_str(&format!(
            "&$filter=receivedDateTime%20ge%20{}T00:00:00Z",
            d.format("%Y-%m-%d")
        ));
    }
    link
}

/// Parses a delta page. `@removed` entries (deleted, moved out, or no
/// longer matching) are dropped: incoming sync never deletes anything.
pub(super) fn parse_page(v: &Value, what: &str) -> Result<Page, GraphError> {
    let bad = |detail: &str| GraphError::BadAnswer {
        what: what.to_string(),
        detail: detail.to_string(),
    };
    let values = v
        .get("value")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("a delta page without \"value\""))?;
    let mut items = Vec::with_capacity(values.len());
    for m in values {
        if m.get("@removed").is_some() {
            continue;
        }
        let Some(id) = m.get("id").and_then(Value::as_str) else {
            continue;
        };
        let received_at = m
            .get("receivedDateTime")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp());
        let categories = m.get("categories").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(String::from))
                .collect()
        });
        items.push(Item {
            id: id.to_string(),
            received_at,
            categories,
        });
    }
    let next = if let Some(l) = v.get("@odata.nextLink").and_then(Value::as_str) {
        Next::Page(l.to_string())
    } else if let Some(l) = v.get("@odata.deltaLink").and_then(Value::as_str) {
        Next::Done(l.to_string())
    } else {
        return Err(bad(
            "a delta page with neither @odata.nextLink nor @odata.deltaLink",
        ));
    };
    Ok(Page { items, next })
}

/// A stable `uidvalidity` for a folder id: a new folder under the same path
/// (deleted and recreated) gets new source keys.
pub(super) fn folder_hash(id: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    // Kept below 2^63 (and nonzero) for stores and JSON readers that use i64.
    (u64::from_be_bytes(b) >> 1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pages_drop_removed_and_find_links() {
        let v = json!({
            "@odata.context": "x",
            "@odata.nextLink": "https://g/v1.0/users/u/mailFolders/f/messages/delta?$skiptoken=a",
            "value": [
                {"id": "m1", "receivedDateTime": "2026-01-02T03:04:05Z"},
                {"id": "m2", "@removed": {"reason": "deleted"}},
                {"id": "m3"}
            ]
        });
        let p = parse_page(&v, "w").unwrap();
        assert_eq!(p.items.len(), 2);
        assert_eq!(p.items[0].received_at, Some(1_767_323_045));
        assert_eq!(p.items[0].categories, None);
        assert!(matches!(p.next, Next::Page(_)));
        let v = json!({"@odata.deltaLink": "d", "value": []});
        assert_eq!(parse_page(&v, "w").unwrap().next, Next::Done("d".into()));
        assert!(parse_page(&json!({"value": []}), "w").is_err());
    }

    #[test]
    fn initial_link_filters_by_date() {
        let l = initial_link("AAM=", chrono::NaiveDate::from_ymd_opt(2026, 1, 31));
        assert_eq!(
            l,
            "mailFolders/AAM%3D/messages/delta?$select=id,receivedDateTime,internetMessageId,categories&$filter=receivedDateTime%20ge%202026-01-31T00:00:00Z"
        );
        assert_ne!(folder_hash("a"), folder_hash("b"));
        assert_eq!(folder_hash("a"), folder_hash("a"));
    }

    #[test]
    fn positions_without_a_delta_link_load_and_stay_unchanged() {
        let old = r#"{"uidvalidity":1,"next_uid":2,"highest_modseq":null,"seen_count":3}"#;
        let p: crate::model::FolderPosition = serde_json::from_str(old).unwrap();
        assert_eq!(p.delta_link, None);
        assert!(!serde_json::to_string(&p).unwrap().contains("delta_link"));
        let p = crate::model::FolderPosition {
            delta_link: Some("https://g/x?$deltatoken=1".into()),
            ..p
        };
        let back: crate::model::FolderPosition =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
