//! The deployment marker of an Exchange Online mailbox (see
//! [`crate::deployment`]): a single-value extended property (a MAPI named
//! property, which no mail client shows) on the mailbox's root folder,
//! `msgfolderroot` ("Top of Information Store"), whose value is the
//! marker's JSON. Read with `$expand=singleValueExtendedProperties($filter=id
//! eq '…')`, written with a PATCH of the folder; both need nothing beyond
//! the `Mail.ReadWrite` the connector already has.

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{query_encode, Body, GraphMailbox, Request};
use super::error::{GraphError, Target};
use crate::deployment::{Marker, MarkerSlot};

/// The folder holding the marker: the root of the mailbox, present in
/// every mailbox whatever its language, never synced, and not shown as a
/// folder by clients.
pub const MARKER_FOLDER: &str = "msgfolderroot";

/// The extended property's id: type, namespace GUID and name. The GUID is
/// crm-mailsync's own, fixed (generated once): a named property is mapped
/// to a property id once per mailbox, and new GUIDs or names per write
/// would use up the mailbox's named-property quota.
pub const MARKER_PROPERTY: &str =
    "String {1ba39feb-a463-46db-8af2-08f0abec1c92} Name CrmMailsyncDeployment";

/// What a read or a write is, in errors (a 403 names the permission).
const READING: &str = "reading the deployment marker (an extended property of the mailbox's root folder, msgfolderroot)";
const WRITING: &str = "writing the deployment marker (an extended property of the mailbox's root folder, msgfolderroot; needs Mail.ReadWrite)";

/// `GET mailFolders/msgfolderroot?$select=id&$expand=…`: one request.
pub(super) async fn read(mb: &GraphMailbox) -> Result<MarkerSlot, GraphError> {
    let expand = format!("singleValueExtendedProperties($filter=id eq '{MARKER_PROPERTY}')");
    let path = format!(
        "mailFolders/{MARKER_FOLDER}?$select=id&$expand={}",
        query_encode(&expand)
    );
    let folder = mb.get_json(&path, None, Target::Mailbox, READING).await?;
    Ok(slot(&folder))
}

/// `PATCH mailFolders/msgfolderroot` with the property: one request
/// (Graph creates or replaces it; the folder's other properties stay).
pub(super) async fn write(mb: &GraphMailbox, marker: &Marker) -> Result<(), GraphError> {
    let body = json!({
        "singleValueExtendedProperties": [
            { "id": MARKER_PROPERTY, "value": marker.to_json() }
        ]
    });
    mb.request(Request {
        method: Method::PATCH,
        path: &format!("mailFolders/{MARKER_FOLDER}"),
        body: Body::Json(body),
        prefer: None,
        target: Target::Mailbox,
        what: WRITING,
        max_body: None,
    })
    .await?;
    Ok(())
}

/// The marker in a folder as Graph answers the expanded GET. Graph leaves
/// `singleValueExtendedProperties` out when the folder has no such
/// property; a value that is not a marker (someone else's) counts as none.
fn slot(folder: &Value) -> MarkerSlot {
    let props = folder
        .get("singleValueExtendedProperties")
        .and_then(Value::as_array);
    // Only the property asked for comes back; its id is compared anyway
    // (case-insensitively: Graph may write the GUID in capitals).
    let value = props.into_iter().flatten().find_map(|p| {
        let id = p.get("id").and_then(Value::as_str)?;
        id.eq_ignore_ascii_case(MARKER_PROPERTY)
            .then(|| p.get("value").and_then(Value::as_str))
            .flatten()
    });
    value
        .and_then(Marker::from_json)
        .map_or(MarkerSlot::Empty, MarkerSlot::Held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_read_from_the_expanded_folder_as_graph_answers_it() {
        let m = Marker {
            deployment: "crm-prod-eu".into(),
            host: "crm1".into(),
            claimed_at: 1_800_000_000,
        };
        let folder = |props: Value| {
            let mut v = json!({"@odata.context": "…/$metadata#users('x')/mailFolders/$entity", "id": "AAMkAD…root"});
            if !props.is_null() {
                v["singleValueExtendedProperties"] = props;
            }
            v
        };
        // None matched: Graph leaves the collection out (or empty).
        assert_eq!(slot(&folder(Value::Null)), MarkerSlot::Empty);
        assert_eq!(slot(&folder(json!([]))), MarkerSlot::Empty);
        let held = folder(json!([{ "id": MARKER_PROPERTY, "value": m.to_json() }]));
        assert_eq!(slot(&held), MarkerSlot::Held(m.clone()));
        let upper = MARKER_PROPERTY.replace(
            "1ba39feb-a463-46db-8af2-08f0abec1c92",
            "1BA39FEB-A463-46DB-8AF2-08F0ABEC1C92",
        );
        let held = folder(json!([{ "id": upper, "value": m.to_json() }]));
        assert_eq!(slot(&held), MarkerSlot::Held(m.clone()));
        // Another property, or a value that is no marker: no marker.
        let other = folder(
            json!([{ "id": "String {66f5a359-4659-4830-9070-00047ec6ac6e} Name Color", "value": m.to_json() }]),
        );
        assert_eq!(slot(&other), MarkerSlot::Empty);
        let junk = folder(json!([{ "id": MARKER_PROPERTY, "value": "Green" }]));
        assert_eq!(slot(&junk), MarkerSlot::Empty);
    }
}
