//! Record delta sync: users, queues, contacts, accounts and leads from their
//! Dataverse tables, one page per call.
//!
//! Each table is read with `$select` (only the columns the directory keeps)
//! and, after the first full read, `$filter=modifiedon ge <high-water>`;
//! pages are followed by `@odata.nextLink` with `Prefer:
//! odata.maxpagesize=<page_size>`. The high-water mark of a table moves only
//! when its last page was read (pages are not in `modifiedon` order), and
//! the filter is `ge`, not `gt`: `modifiedon` has whole seconds, so a row
//! changed in the same second as the last one seen would otherwise be lost.
//! The price is that the rows of that one second come again (an unchanged
//! upsert writes nothing).
//!
//! A `modifiedon` filter cannot see deletions (that needs Dataverse change
//! tracking); deleted rows stay in the directory until removed by the API or
//! an import.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::{query_encode, DataverseAdapter};
use crate::crm::{CrmError, RecordPage};
use crate::model::{record_kind, Record};

/// One table the directory reads.
struct Table {
    set: &'static str,
    kind: &'static str,
    id: &'static str,
    name: &'static str,
    emails: &'static [&'static str],
    /// Has `_ownerid_value` (user- or team-owned tables).
    owned: bool,
    /// The column that switches email off: `donotemail` (true: no email)
    /// or, for users, `isdisabled`.
    no_email: Option<&'static str>,
}

/// Read in this order: users and queues first, they decide approval and
/// the mailboxes' owners.
const TABLES: [Table; 5] = [
    Table {
        set: "systemusers",
        kind: record_kind::USER,
        id: "systemuserid",
        name: "fullname",
        emails: &["internalemailaddress"],
        owned: false,
        no_email: Some("isdisabled"),
    },
    Table {
        set: "queues",
        kind: record_kind::QUEUE,
        id: "queueid",
        name: "name",
        emails: &["emailaddress"],
        owned: true,
        no_email: None,
    },
    Table {
        set: "contacts",
        kind: record_kind::CONTACT,
        id: "contactid",
        name: "fullname",
        emails: &["emailaddress1", "emailaddress2", "emailaddress3"],
        owned: true,
        no_email: Some("donotemail"),
    },
    Table {
        set: "accounts",
        kind: record_kind::ACCOUNT,
        id: "accountid",
        name: "name",
        emails: &["emailaddress1", "emailaddress2", "emailaddress3"],
        owned: true,
        no_email: Some("donotemail"),
    },
    Table {
        set: "leads",
        kind: record_kind::LEAD,
        id: "leadid",
        name: "fullname",
        emails: &["emailaddress1", "emailaddress2", "emailaddress3"],
        owned: true,
        no_email: Some("donotemail"),
    },
];

/// The delta cursor: a high-water `modifiedon` per entity set and, while a
/// pass is under way, where it stands. Stored by the store as one string
/// (JSON), together with the records of the page that produced it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Cursor {
    /// Entity set → highest `modifiedon` read in its last complete pass.
    #[serde(default)]
    since: BTreeMap<String, String>,
    /// The pass under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<Pass>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pass {
    /// The entity set being read.
    set: String,
    /// `@odata.nextLink` of the last page read; `None`: start the set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    /// Highest `modifiedon` seen in this set so far in this pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max: Option<String>,
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

fn later(a: Option<&str>, b: Option<&str>) -> Option<String> {
    match (a.and_then(parse_time), b.and_then(parse_time)) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (Some(x), None) => Some(x),
        (None, Some(y)) => Some(y),
        (None, None) => None,
    }
    .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// Reads the next page (see the module docs).
pub(super) async fn pull(
    dv: &DataverseAdapter,
    cursor: Option<&str>,
) -> Result<RecordPage, CrmError> {
    let mut cur: Cursor = match cursor {
        None => Cursor::default(),
        Some(s) => serde_json::from_str(s).unwrap_or_else(|e| {
            tracing::warn!(
                adapter = "dataverse",
                error = %e,
                "stored record cursor is not readable; reading all records again"
            );
            Cursor::default()
        }),
    };
    let pass = cur.pass.take().unwrap_or(Pass {
        set: TABLES[0].set.to_string(),
        next: None,
        max: None,
    });
    let (index, table) = TABLES
        .iter()
        .enumerate()
        .find(|(_, t)| t.set == pass.set)
        .unwrap_or((0, &TABLES[0]));

    let prefer = [("Prefer", format!("odata.maxpagesize={}", dv.page_size))];
    let purpose = format!("reading {}", table.set);
    let page = match &pass.next {
        Some(link) => dv.get_json(link, &prefer, &purpose).await?,
        None => {
            let mut select: Vec<&str> = vec![table.id, table.name, "modifiedon"];
            select.extend(table.emails);
            if table.owned {
                select.push("_ownerid_value");
            }
            if let Some(c) = table.no_email {
                select.push(c);
            }
            let mut path = format!("{}?$select={}", table.set, select.join(","));
            if let Some(since) = cur.since.get(table.set) {
                path.push_str("&$filter=");
                path.push_str(&query_encode(&format!("modifiedon ge {since}")));
            }
            dv.get_json(&path, &prefer, &purpose).await?
        }
    };

    let rows = page
        .get("value")
        .and_then(|v| v.as_array())
        .ok_or_else(|| {
            CrmError::permanent(format!(
                "{purpose}: Dataverse answered without a \"value\" array"
            ))
        })?;
    let mut records = Vec::with_capacity(rows.len());
    let mut max = pass.max.clone();
    for row in rows {
        let Some(id) = row.get(table.id).and_then(|v| v.as_str()) else {
            continue;
        };
        let text = |col: &str| {
            row.get(col)
                .and_then(|v| v.as_str())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
        };
        let emails: Vec<String> = table.emails.iter().filter_map(|c| text(c)).collect();
        let no_email = table
            .no_email
            .and_then(|c| row.get(c))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        max = later(max.as_deref(), text("modifiedon").as_deref());
        records.push(Record {
            kind: table.kind.to_string(),
            id: id.to_ascii_lowercase(),
            name: text(table.name).unwrap_or_default(),
            emails,
            owner: if table.owned {
                text("_ownerid_value")
            } else {
                None
            },
            email_enabled: !no_email,
            // Dataverse exposes no column with the user number that
            // Dynamics puts into tracking tokens; it stays unset here (set
            // it by import or the records API).
            user_number: None,
            updated_at: 0,
        });
    }

    let next_link = page
        .get("@odata.nextLink")
        .and_then(|v| v.as_str())
        .map(String::from);
    let more = if let Some(link) = next_link {
        cur.pass = Some(Pass {
            set: pass.set,
            next: Some(link),
            max,
        });
        true
    } else {
        if let Some(m) = later(cur.since.get(table.set).map(String::as_str), max.as_deref()) {
            cur.since.insert(table.set.to_string(), m);
        }
        match TABLES.get(index + 1) {
            Some(t) => {
                cur.pass = Some(Pass {
                    set: t.set.to_string(),
                    next: None,
                    max: None,
                });
                true
            }
            None => false,
        }
    };
    let cursor = serde_json::to_string(&cur)
        .map_err(|e| CrmError::permanent(format!("cannot encode the record cursor: {e}")))?;
    Ok(RecordPage {
        records,
        deleted: Vec::new(),
        cursor: Some(cursor),
        more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_picks_the_newest_time() {
        assert_eq!(
            later(Some("2026-01-01T00:00:00Z"), Some("2026-01-02T00:00:00Z")).as_deref(),
            Some("2026-01-02T00:00:00Z")
        );
        assert_eq!(
            later(None, Some("2026-01-02T01:00:00+01:00")).as_deref(),
            Some("2026-01-02T00:00:00Z")
        );
        assert_eq!(later(None, None), None);
    }

    #[test]
    fn cursor_round_trips() {
        let mut c = Cursor::default();
        c.since
            .insert("contacts".into(), "2026-01-01T00:00:00Z".into());
        c.pass = Some(Pass {
            set: "leads".into(),
            next: Some("https://x/api/data/v9.2/leads?$skiptoken=1".into()),
            max: None,
        });
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&s).unwrap(), c);
    }
}
