//! Single-value extended properties of mail folders, as the
//! microsoft-graph-docs pages "Create single-value extended property"
//! (`PATCH /users/{id}/mailFolders/{id}` with
//! `{"singleValueExtendedProperties": [{"id", "value"}]}`, `200 OK` with the
//! folder, not the property), "Get singleValueLegacyExtendedProperty"
//! (`GET …/mailFolders/{id}?$expand=singleValueExtendedProperties($filter=id
//! eq '…')`: the folder expanded with the matching property) and "Outlook
//! extended properties overview" (the three id formats) describe them.
//! A folder without the property is answered without the
//! `singleValueExtendedProperties` collection. An id in none of the formats
//! is `400 ErrorInvalidProperty` with the message Graph gives (quoted in
//! microsoftgraph/msgraph-sdk-powershell#2784).
// Handlers answer errors as ready responses (axum style).
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::handlers::{bad_request, json_response, not_found_item};
use super::wire::{folder_json, resolve_ref};
use super::{Inner, Mailbox};

/// MAPI property types an id may name (single-value).
const TYPES: &[&str] = &[
    "ApplicationTime",
    "Binary",
    "Boolean",
    "CLSID",
    "Currency",
    "Double",
    "Error",
    "Float",
    "Integer",
    "Long",
    "Null",
    "Object",
    "Short",
    "SystemTime",
    "String",
];

fn invalid_property() -> Response {
    bad_request(
        "ErrorInvalidProperty",
        "PropertyId values may only be in one of the following formats: 'MapiPropertyType namespaceGuid Name propertyName', 'MapiPropertyType namespaceGuid Id propertyId' or 'MapiPropertyType propertyTag'.",
    )
}

fn is_guid(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) else {
        return false;
    };
    let groups: Vec<&str> = inner.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_number(s: &str) -> bool {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// The key an extended property id is stored under: the type and the GUID
/// compared without case, a string name with its case (Graph: "Filtering
/// the string name (Name) in the id of an extended property is
/// case-sensitive"). `None`: not an id in one of the three formats.
pub(crate) fn property_key(id: &str) -> Option<String> {
    // A name may hold spaces: at most four parts.
    let parts: Vec<&str> = id.splitn(4, ' ').collect();
    let first = *parts.first()?;
    let ty = TYPES.iter().find(|t| t.eq_ignore_ascii_case(first))?;
    match parts.as_slice() {
        [_, guid, kind, name] if is_guid(guid) && kind.eq_ignore_ascii_case("Name") => {
            Some(format!("{ty} {} Name {name}", guid.to_ascii_lowercase()))
        }
        [_, guid, kind, n] if is_guid(guid) && kind.eq_ignore_ascii_case("Id") && is_number(n) => {
            Some(format!(
                "{ty} {} Id {}",
                guid.to_ascii_lowercase(),
                n.to_ascii_lowercase()
            ))
        }
        [_, tag] if is_number(tag) => Some(format!("{ty} {}", tag.to_ascii_lowercase())),
        _ => None,
    }
}

/// `singleValueExtendedProperties($filter=id eq '…')` → the property id.
fn expanded_id(expand: &str) -> Result<String, Response> {
    let unsupported = || {
        bad_request(
            "BadRequest",
            &format!("Parsing OData Select and Expand failed: could not expand '{expand}'."),
        )
    };
    let e = expand.trim();
    let nav = "singleValueExtendedProperties(";
    if e.len() <= nav.len() || !e[..nav.len()].eq_ignore_ascii_case(nav) || !e.ends_with(')') {
        return Err(unsupported());
    }
    let inner = e[nav.len()..e.len() - 1].trim();
    let filter = inner
        .strip_prefix("$filter=")
        .ok_or_else(unsupported)?
        .trim();
    let mut words = filter.splitn(3, ' ');
    let (Some(prop), Some(op), Some(value)) = (words.next(), words.next(), words.next()) else {
        return Err(unsupported());
    };
    if !prop.eq_ignore_ascii_case("id") || !op.eq_ignore_ascii_case("eq") {
        return Err(unsupported());
    }
    let id = value
        .trim()
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .ok_or_else(unsupported)?;
    Ok(id.replace("''", "'"))
}

/// `GET …/mailFolders/{f}` with `$select` and the extended-property
/// `$expand`.
pub(crate) fn get_folder(
    graph: &str,
    inner: &Inner,
    key: &str,
    f: &str,
    q: &[(String, String)],
) -> Result<Response, Response> {
    let mb = &inner.users[key];
    let folder = resolve_ref(mb, f).ok_or_else(not_found_item)?;
    let mut v = folder_json(mb, folder);
    if let Some(sel) = param(q, "$select") {
        let wanted: Vec<&str> = sel.split(',').map(str::trim).collect();
        let all = v.as_object().cloned().unwrap_or_default();
        let kept: Map<String, Value> = all
            .into_iter()
            .filter(|(k, _)| k == "id" || wanted.iter().any(|w| w.eq_ignore_ascii_case(k)))
            .collect();
        v = Value::Object(kept);
    }
    v["@odata.context"] = json!(format!(
        "{graph}/$metadata#users('{}')/mailFolders/$entity",
        mb.user_id
    ));
    if let Some(expand) = param(q, "$expand") {
        let id = expanded_id(expand)?;
        let key = property_key(&id).ok_or_else(invalid_property)?;
        if let Some((stored_id, value)) = folder.props.get(&key) {
            v["singleValueExtendedProperties@odata.context"] = json!(format!(
                "{graph}/$metadata#users('{}')/mailFolders('{}')/singleValueExtendedProperties",
                mb.user_id, folder.id
            ));
            v["singleValueExtendedProperties"] = json!([{ "id": stored_id, "value": value }]);
        }
    }
    Ok(json_response(StatusCode::OK, v))
}

/// `PATCH …/mailFolders/{f}`: `displayName` and extended properties
/// (created or replaced; the folder's others stay). `200 OK` with the
/// folder, without its extended properties.
pub(crate) fn patch_folder(
    inner: &mut Inner,
    key: &str,
    f: &str,
    body: &Bytes,
) -> Result<Response, Response> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| bad_request("RequestBodyRead", "Invalid JSON in the request body."))?;
    let Some(fields) = v.as_object() else {
        return Err(bad_request(
            "RequestBodyRead",
            "The body must be a JSON object.",
        ));
    };
    let mut props: Vec<(String, String, String)> = Vec::new();
    let mut rename: Option<String> = None;
    for (k, val) in fields {
        match k.as_str() {
            "singleValueExtendedProperties" => {
                let Some(list) = val.as_array() else {
                    return Err(bad_request(
                        "RequestBodyRead",
                        "singleValueExtendedProperties must be an array.",
                    ));
                };
                for p in list {
                    let id = p["id"].as_str().unwrap_or_default();
                    let key = property_key(id).ok_or_else(invalid_property)?;
                    let Some(value) = p["value"].as_str() else {
                        return Err(bad_request(
                            "RequestBodyRead",
                            "The value of a single-value extended property must be a string.",
                        ));
                    };
                    props.push((key, id.to_string(), value.to_string()));
                }
            }
            "displayName" => rename = val.as_str().map(String::from),
            other => {
                return Err(bad_request(
                    "RequestBodyRead",
                    &format!(
                    "The property '{other}' does not exist on type 'microsoft.graph.mailFolder'."
                ),
                ))
            }
        }
    }
    let mb: &mut Mailbox = inner.users.get_mut(key).unwrap();
    let id = resolve_ref(mb, f).ok_or_else(not_found_item)?.id.clone();
    let folder = mb.folders.iter_mut().find(|x| x.id == id).unwrap();
    for (key, id, value) in props {
        folder.props.insert(key, (id, value));
    }
    if let Some(name) = rename {
        folder.name = name;
    }
    inner.stats.folder_patches += 1;
    let mb = &inner.users[key];
    let folder = mb.folders.iter().find(|x| x.id == id).unwrap();
    Ok(json_response(StatusCode::OK, folder_json(mb, folder)))
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}
