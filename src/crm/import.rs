//! `records import`: a records file (CSV or JSON lines) into the record
//! directory.
//!
//! * CSV (RFC 4180: quoted fields may hold commas, quotes and line breaks):
//!   a header row with at least `kind,id,email,name`, optionally `owner`,
//!   `email_enabled` (true/false, yes/no, 1/0; empty = true) and
//!   `user_number`. Several addresses in one field are separated by `;`.
//! * JSON lines: one [`Record`]-shaped object per line, with an `emails`
//!   array or an `email` string (`;`-separated like CSV).
//!
//! Every bad line is reported with its line number and why, all at once
//! ([`Parsed::errors`]); the caller decides whether anything is imported
//! then. [`import_records`] upserts in batches and resolves the parties
//! that the new records make resolvable ([`crate::crm::parties::resolve_pending`]).

use std::collections::BTreeSet;
use std::io::{BufRead, Read};
use std::path::Path;

use serde::Deserialize;

use crate::config::PartySettings;
use crate::model::{Record, UnixTime};
use crate::store::{RecordChanges, Store, StoreError};

/// Records per upsert batch: big enough to be quick, small enough that one
/// batch never holds the store lock for long.
pub const IMPORT_BATCH: usize = 2_000;

/// A records file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordsFormat {
    Csv,
    Jsonl,
}

impl RecordsFormat {
    /// From a file name: `.csv`, or `.jsonl` / `.ndjson`.
    pub fn of_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(RecordsFormat::Csv),
            "jsonl" | "ndjson" => Some(RecordsFormat::Jsonl),
            _ => None,
        }
    }
}

/// One bad line of a records file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number (for a CSV record spanning lines: where it starts).
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// What a records file holds: the valid records, in file order, and every
/// line that is not one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub records: Vec<Record>,
    pub errors: Vec<LineError>,
}

/// What an import changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub changes: RecordChanges,
    /// Activities whose parties the new records resolved.
    pub resolved_activities: usize,
}

/// Reads a records file of the given format.
pub fn parse_file(path: &Path, format: RecordsFormat) -> std::io::Result<Parsed> {
    let f = std::fs::File::open(path)?;
    let reader = std::io::BufReader::new(f);
    Ok(match format {
        RecordsFormat::Csv => parse_csv(reader),
        RecordsFormat::Jsonl => parse_jsonl(reader)?,
    })
}

const CSV_COLUMNS: [&str; 7] = [
    "kind",
    "id",
    "email",
    "name",
    "owner",
    "email_enabled",
    "user_number",
];
const REQUIRED_COLUMNS: [&str; 4] = ["kind", "id", "email", "name"];

/// Parses CSV (see the module docs).
pub fn parse_csv(input: impl Read) -> Parsed {
    let mut out = Parsed::default();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let mut rows = reader.records();
    let header = match rows.next() {
        None => {
            out.errors.push(LineError {
                line: 1,
                message: "the file is empty; expected a header row kind,id,email,name".into(),
            });
            return out;
        }
        Some(Err(e)) => {
            out.errors.push(csv_error(&e, 1));
            return out;
        }
        Some(Ok(h)) => h,
    };
    // Column index per known name.
    let mut index: [Option<usize>; 7] = [None; 7];
    let mut header_ok = true;
    for (i, name) in header.iter().enumerate() {
        let name = name.trim_start_matches('\u{feff}').to_ascii_lowercase();
        let name = if name == "emails" {
            "email".into()
        } else {
            name
        };
        match CSV_COLUMNS.iter().position(|c| *c == name) {
            Some(k) if index[k].is_some() => {
                header_ok = false;
                out.errors.push(LineError {
                    line: 1,
                    message: format!("column {name:?} appears twice"),
                });
            }
            Some(k) => index[k] = Some(i),
            None => {
                header_ok = false;
                out.errors.push(LineError {
                    line: 1,
                    message: format!(
                        "unknown column {name:?}; known columns: {}",
                        CSV_COLUMNS.join(", ")
                    ),
                });
            }
        }
    }
    for required in REQUIRED_COLUMNS {
        let k = CSV_COLUMNS.iter().position(|c| *c == required);
        if k.is_some_and(|k| index[k].is_none()) {
            header_ok = false;
            out.errors.push(LineError {
                line: 1,
                message: format!(
                    "the header row lacks the {required:?} column (at least kind,id,email,name)"
                ),
            });
        }
    }
    if !header_ok {
        return out;
    }
    let columns = header.len();
    for row in rows {
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                out.errors.push(csv_error(&e, line));
                continue;
            }
        };
        let line = row.position().map_or(0, |p| p.line());
        if row.iter().all(str::is_empty) {
            continue;
        }
        if row.len() != columns {
            out.errors.push(LineError {
                line,
                message: format!("has {} fields, the header row has {columns}", row.len()),
            });
            continue;
        }
        let field = |name: &str| -> &str {
            CSV_COLUMNS
                .iter()
                .position(|c| *c == name)
                .and_then(|k| index[k])
                .and_then(|i| row.get(i))
                .unwrap_or("")
        };
        let email_enabled = match parse_bool(field("email_enabled")) {
            Ok(b) => b,
            Err(m) => {
                out.errors.push(LineError { line, message: m });
                continue;
            }
        };
        let user_number = match field("user_number") {
            "" => None,
            n => match n.parse::<u32>() {
                Ok(v) => Some(v),
                Err(_) => {
                    out.errors.push(LineError {
                        line,
                        message: format!(
                            "user_number {n:?} is not a whole number from 0 to {}",
                            u32::MAX
                        ),
                    });
                    continue;
                }
            },
        };
        let owner = Some(field("owner").to_string()).filter(|o| !o.is_empty());
        let raw = RawRecord {
            kind: field("kind").to_string(),
            id: field("id").to_string(),
            name: field("name").to_string(),
            emails: split_addresses(field("email")),
            owner,
            email_enabled,
            user_number,
        };
        match validate(raw) {
            Ok(r) => out.records.push(r),
            Err(message) => out.errors.push(LineError { line, message }),
        }
    }
    out
}

fn csv_error(e: &csv::Error, line: u64) -> LineError {
    let message = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "is not valid UTF-8".to_string(),
        _ => format!("cannot be read as CSV: {e}"),
    };
    LineError { line, message }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "" | "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        other => Err(format!(
            "email_enabled {other:?} is not true or false (yes/no, 1/0 also work)"
        )),
    }
}

/// Addresses separated by `;` (blank ones dropped).
fn split_addresses(s: &str) -> Vec<String> {
    s.split(';')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

/// A JSON line: a [`Record`] with `email` accepted for `emails`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    kind: String,
    id: IdValue,
    #[serde(default)]
    name: String,
    #[serde(default)]
    emails: Vec<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default = "yes")]
    email_enabled: bool,
    #[serde(default)]
    user_number: Option<u32>,
    /// Written by the store; accepted (and ignored) so an export re-imports.
    #[serde(default)]
    #[allow(dead_code)]
    updated_at: Option<serde_json::Value>,
}

/// Ids are strings; a number is accepted as its decimal text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IdValue {
    Text(String),
    Number(u64),
}

fn yes() -> bool {
    true
}

/// Parses JSON lines (see the module docs); blank lines are skipped.
pub fn parse_jsonl(input: impl BufRead) -> std::io::Result<Parsed> {
    let mut out = Parsed::default();
    for (i, line) in input.split(b'\n').enumerate() {
        let line_no = i as u64 + 1;
        let bytes = line?;
        let Ok(text) = std::str::from_utf8(&bytes) else {
            out.errors.push(LineError {
                line: line_no,
                message: "is not valid UTF-8".into(),
            });
            continue;
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let j: JsonRecord = match serde_json::from_str(text) {
            Ok(j) => j,
            Err(e) => {
                out.errors.push(LineError {
                    line: line_no,
                    message: format!("is not a record object: {e}"),
                });
                continue;
            }
        };
        let mut emails: Vec<String> = j.emails.iter().map(|e| e.trim().to_string()).collect();
        emails.retain(|e| !e.is_empty());
        if let Some(e) = &j.email {
            emails.extend(split_addresses(e));
        }
        let raw = RawRecord {
            kind: j.kind.trim().to_string(),
            id: match j.id {
                IdValue::Text(s) => s.trim().to_string(),
                IdValue::Number(n) => n.to_string(),
            },
            name: j.name.trim().to_string(),
            emails,
            owner: j
                .owner
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty()),
            email_enabled: j.email_enabled,
            user_number: j.user_number,
        };
        match validate(raw) {
            Ok(r) => out.records.push(r),
            Err(message) => out.errors.push(LineError {
                line: line_no,
                message,
            }),
        }
    }
    Ok(out)
}

/// A record as read, before validation.
struct RawRecord {
    kind: String,
    id: String,
    name: String,
    emails: Vec<String>,
    owner: Option<String>,
    email_enabled: bool,
    user_number: Option<u32>,
}

/// Whether an address is plausible: one `@` with a local part and a domain
/// on each side, no white space, nothing of a display name (`<>`, `,`, `"`).
pub fn plausible_address(a: &str) -> bool {
    match a.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !a
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "<>,;\"()[]".contains(c))
        }
        None => false,
    }
}

fn validate(r: RawRecord) -> Result<Record, String> {
    let mut problems = Vec::new();
    if r.kind.is_empty() {
        problems.push("kind is empty".to_string());
    } else if !r
        .kind
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        problems.push(format!(
            "kind {:?} is not a record kind (lower case letters, digits and _ only, e.g. contact)",
            r.kind
        ));
    }
    if r.id.is_empty() {
        problems.push("id is empty".into());
    } else if r.id.chars().any(|c| c.is_control()) {
        problems.push(format!("id {:?} holds control characters", r.id));
    }
    for a in &r.emails {
        if !plausible_address(a) {
            problems.push(format!("{a:?} is not an email address"));
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(Record {
        kind: r.kind,
        id: r.id,
        name: r.name,
        emails: r.emails,
        owner: r.owner,
        email_enabled: r.email_enabled,
        user_number: r.user_number,
        updated_at: 0,
    })
}

/// Upserts `records` in batches of [`IMPORT_BATCH`], then resolves the
/// pending parties their addresses make resolvable.
pub fn import_records(
    store: &dyn Store,
    records: Vec<Record>,
    settings: &PartySettings,
    at: UnixTime,
) -> Result<ImportSummary, StoreError> {
    let mut summary = ImportSummary::default();
    let mut addresses = BTreeSet::new();
    for r in &records {
        for e in &r.emails {
            addresses.insert(crate::crm::parties::normalize_address(e));
        }
    }
    let mut records = records;
    while !records.is_empty() {
        let rest = records.split_off(records.len().min(IMPORT_BATCH));
        let c = store.upsert_records(std::mem::replace(&mut records, rest), &[], None, at)?;
        summary.changes.inserted += c.inserted;
        summary.changes.updated += c.updated;
        summary.changes.unchanged += c.unchanged;
    }
    let addresses: Vec<String> = addresses.into_iter().collect();
    summary.resolved_activities =
        crate::crm::parties::resolve_pending(store, &addresses, settings, at)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Parsed {
        parse_csv(text.as_bytes())
    }

    #[test]
    fn csv_with_quotes_several_addresses_and_optional_columns() {
        let p = csv("kind,id,email,name,owner,email_enabled,user_number\n\
contact,1,a@x.test; B@x.test ,\"Doe, Jane \"\"JD\"\"\",u1,false,\n\
user,u1,u1@us.test,\"Multi\nline\",,,42\n\
\n\
account,acc,,Contoso,,yes,\n");
        assert_eq!(p.errors, vec![]);
        assert_eq!(p.records.len(), 3);
        let c = &p.records[0];
        assert_eq!(c.emails, vec!["a@x.test", "B@x.test"]);
        assert_eq!(c.name, "Doe, Jane \"JD\"");
        assert_eq!(c.owner.as_deref(), Some("u1"));
        assert!(!c.email_enabled);
        assert_eq!(p.records[1].name, "Multi\nline");
        assert_eq!(p.records[1].user_number, Some(42));
        assert!(p.records[2].emails.is_empty() && p.records[2].email_enabled);
    }

    #[test]
    fn every_bad_csv_line_is_reported_with_its_number() {
        let p = csv("kind,id,email,name\n\
contact,1,a@x.test,A\n\
Contact,2,b@x.test,B\n\
contact,,c@x.test,C\n\
contact,4,not-an-address,D\n\
contact,5,e@x.test\n\
\"contact\",\"6\",\"multi\nline@x.test\",F\n\
lead,7,ok@x.test;also bad,G\n\
contact,8,h@x.test,H\n");
        let lines: Vec<u64> = p.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4, 5, 6, 7, 9], "{:?}", p.errors);
        assert!(
            p.errors[0].message.contains("lower case"),
            "{}",
            p.errors[0]
        );
        assert!(p.errors[1].message.contains("id is empty"));
        assert!(p.errors[2].message.contains("\"not-an-address\""));
        assert!(p.errors[3].message.contains("has 3 fields"));
        assert!(p.errors[4].message.contains("multi\\nline@x.test"));
        assert!(p.errors[5].message.contains("\"also bad\""));
        let ids: Vec<&str> = p.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, vec!["1", "8"]);
    }

    #[test]
    fn csv_header_problems_are_reported_once_each() {
        let p = csv("kind,id,mail,name\ncontact,1,a@x.test,A\n");
        assert_eq!(p.records, vec![]);
        assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
        assert!(p.errors.iter().all(|e| e.line == 1));
        assert!(p.errors[0].message.contains("unknown column \"mail\""));
        assert!(p.errors[1].message.contains("lacks the \"email\" column"));
        assert_eq!(csv("").errors[0].line, 1);
    }

    #[test]
    fn jsonl_records_and_errors() {
        let text = "{\"kind\":\"contact\",\"id\":\"1\",\"emails\":[\"a@x.test\"],\"name\":\"A\"}\n\
\n\
{\"kind\":\"lead\",\"id\":7,\"email\":\"b@x.test;c@x.test\",\"email_enabled\":false}\n\
not json\n\
{\"kind\":\"contact\",\"id\":\"2\",\"emial\":\"x@x.test\"}\n\
{\"kind\":\"user\",\"id\":\"u\",\"emails\":[\"a b@x\"],\"user_number\":5}\n";
        let p = parse_jsonl(text.as_bytes()).unwrap();
        let lines: Vec<u64> = p.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 5, 6], "{:?}", p.errors);
        assert!(p.errors[1].message.contains("emial"), "{}", p.errors[1]);
        assert_eq!(p.records.len(), 2);
        assert_eq!(p.records[1].id, "7");
        assert_eq!(p.records[1].emails, vec!["b@x.test", "c@x.test"]);
        assert!(!p.records[1].email_enabled);
    }

    #[test]
    fn import_upserts_in_batches_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(&dir.path().join("s")).unwrap();
        let settings = crate::config::CrmSettings::default().parties;
        let mut text = String::from("kind,id,email,name\n");
        for i in 0..(IMPORT_BATCH + 5) {
            text.push_str(&format!("contact,{i},c{i}@x.test,C {i}\n"));
        }
        let p = csv(&text);
        let s = import_records(&store, p.records.clone(), &settings, 1).unwrap();
        assert_eq!(s.changes.inserted, (IMPORT_BATCH + 5) as u64);
        let mut again = p.records;
        again[0].name = "changed".into();
        let s = import_records(&store, again, &settings, 2).unwrap();
        assert_eq!(
            (s.changes.inserted, s.changes.updated, s.changes.unchanged),
            (0, 1, (IMPORT_BATCH + 4) as u64)
        );
        assert_eq!(store.records_by_address("C7@X.test").unwrap()[0].id, "7");
    }
}
