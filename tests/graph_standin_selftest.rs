//! The Graph stand-in against Graph's documented behaviour, with a plain
//! HTTP client: if these fail, the connector tests prove nothing.

#[path = "support/graph_standin/mod.rs"]
mod graph_standin;

use std::time::Duration;

use base64::Engine as _;
use graph_standin::{GraphStandIn, GRAPH_SCOPE};
use serde_json::{json, Value};

const CLIENT: &str = "c1";
const SECRET: &str = "s1";
const USER: &str = "crm@contoso.test";

struct Client {
    http: reqwest::Client,
    token: String,
    base: String,
}

impl Client {
    async fn new(si: &GraphStandIn) -> Client {
        let http = reqwest::Client::new();
        let v: Value = http
            .post(&si.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT),
                ("client_secret", SECRET),
                ("scope", GRAPH_SCOPE),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Client {
            http,
            token: v["access_token"].as_str().unwrap().to_string(),
            base: format!("{}/users/{USER}", si.graph_url),
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}/{path}", self.base)
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let r = rb
            .bearer_auth(&self.token)
            .header("Prefer", "IdType=\"ImmutableId\", odata.maxpagesize=10")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    /// Every entry of one delta round from `link`, and the delta link.
    async fn round(&self, link: &str) -> (Vec<Value>, String) {
        let mut out = Vec::new();
        let mut link = link.to_string();
        loop {
            let (status, page) = self.get(&link).await;
            assert_eq!(status, 200, "{page}");
            let values = page["value"].as_array().unwrap();
            assert!(values.len() <= 10, "maxpagesize honoured");
            out.extend(values.iter().cloned());
            if let Some(next) = page["@odata.nextLink"].as_str() {
                link = next.to_string();
            } else {
                return (out, page["@odata.deltaLink"].as_str().unwrap().to_string());
            }
        }
    }
}

fn eml(i: usize) -> Vec<u8> {
    format!("Message-ID: <m{i}@x.test>\r\nFrom: a@x.test\r\nTo: {USER}\r\nSubject: s{i}\r\nThread-Index: AQHZ1234567890abcdefghijklmn==\r\n\r\nbody {i}\r\n").into_bytes()
}

async fn standin() -> GraphStandIn {
    let si = GraphStandIn::start().await;
    si.add_client(CLIENT, SECRET);
    si.add_user(USER);
    si.add_user("buyer@fabrikam.test");
    si.add_folder(USER, "Inbox/Orders");
    si
}

#[tokio::test]
async fn delta_rounds_page_list_changes_moves_and_deletes_and_expire_with_410() {
    let si = standin().await;
    let ids: Vec<String> = (0..25)
        .map(|i| si.deliver(USER, "Inbox", &eml(i)))
        .collect();
    let c = Client::new(&si).await;
    let first = "mailFolders/inbox/messages/delta?$select=id,internetMessageId";
    let (all, delta) = c.round(first).await;
    assert_eq!(all.len(), 25);
    assert!(all.iter().all(|m| m.get("@removed").is_none()));
    assert_eq!(all[0]["internetMessageId"], "<m0@x.test>");
    assert!(
        all[0].get("subject").is_none(),
        "$select honoured: {}",
        all[0]
    );
    // Nothing changed: an empty round, and asking the same link again works.
    let (none, delta2) = c.round(&delta).await;
    assert!(none.is_empty());
    let (none_again, _) = c.round(&delta).await;
    assert!(none_again.is_empty());

    // A move out, a new message, a category PATCH.
    si.move_message(USER, &ids[3], "Inbox/Orders");
    let new_id = si.deliver(USER, "Inbox", &eml(99));
    let (code, _) = c
        .send(
            c.http
                .patch(c.url(&format!("messages/{}", ids[5])))
                .json(&json!({"categories": ["Tracked to CRM"]})),
        )
        .await;
    assert_eq!(code, 200);
    let (changes, _) = c.round(&delta2).await;
    let removed: Vec<&str> = changes
        .iter()
        .filter(|m| m.get("@removed").is_some())
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let listed: Vec<&str> = changes
        .iter()
        .filter(|m| m.get("@removed").is_none())
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(removed, vec![ids[3].as_str()]);
    assert_eq!(listed, vec![new_id.as_str(), ids[5].as_str()]);
    // In the destination the moved message keeps its (immutable) id.
    let (_, orders) = c.get("mailFolders/inbox/childFolders").await;
    assert_eq!(orders["value"][0]["displayName"], "Orders");
    let orders_id = orders["value"][0]["id"].as_str().unwrap().to_string();
    let (in_orders, _) = c
        .round(&format!(
            "mailFolders/{}/messages/delta",
            orders_id.replace('=', "%3D")
        ))
        .await;
    assert_eq!(in_orders.len(), 1);
    assert_eq!(in_orders[0]["id"], ids[3].as_str());

    // Graph forgets the sync state: 410.
    si.expire_sync_states();
    let (code, body) = c.get(&delta2).await;
    assert_eq!(code, 410, "{body}");
    assert_eq!(body["error"]["code"], "SyncStateNotFound");
    // Only receivedDateTime may be filtered.
    let (code, body) = c
        .get("mailFolders/inbox/messages/delta?$filter=subject eq 'x'")
        .await;
    assert_eq!(code, 400, "{body}");
}

#[tokio::test]
async fn send_mail_mime_keeps_our_headers_json_works_and_bad_input_is_refused() {
    let si = standin().await;
    si.set_sent_delay(Duration::from_millis(200));
    let c = Client::new(&si).await;
    let mime = format!("Message-ID: <ours-1@contoso.test>\r\nFrom: {USER}\r\nTo: buyer@fabrikam.test\r\nSubject: Offer CRM:0001\r\n\r\nHi\r\n");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&mime);
    let send = |body: String, ct: &'static str| {
        c.send(
            c.http
                .post(c.url("sendMail"))
                .header("Content-Type", ct)
                .body(body),
        )
    };
    let (code, _) = send(b64.clone(), "text/plain").await;
    assert_eq!(code, 202);
    // 202 is not the Sent copy: it comes a moment later.
    assert_eq!(si.count(USER, "Sent Items"), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let filter = "mailFolders/sentitems/messages?$filter=internetMessageId%20eq%20'%3Cours-1%40contoso.test%3E'&$select=id,internetMessageId";
    let (code, found) = c.get(filter).await;
    assert_eq!(code, 200, "{found}");
    assert_eq!(
        found["value"][0]["internetMessageId"],
        "<ours-1@contoso.test>"
    );
    let inbox = si.messages("buyer@fabrikam.test", "Inbox");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].subject, "Offer CRM:0001");

    let (code, body) = send("not base64 at all!".into(), "text/plain").await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("ErrorMimeContentInvalidBase64String"))
    );
    let other = base64::engine::general_purpose::STANDARD
        .encode("From: boss@contoso.test\r\nTo: buyer@fabrikam.test\r\nSubject: x\r\n\r\nx\r\n");
    let (code, body) = send(other, "text/plain").await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("ErrorSendAsDenied"))
    );
    let (code, _) = c
        .post(
            "sendMail",
            json!({"message": {"subject": "JSON form", "body": {"contentType": "Text", "content": "hi"},
                   "toRecipients": [{"emailAddress": {"address": "buyer@fabrikam.test"}}]}}),
        )
        .await;
    assert_eq!(code, 202);
    assert_eq!(si.count("buyer@fabrikam.test", "Inbox"), 2);
}

#[tokio::test]
async fn tokens_scopes_users_and_limits_answer_as_graph_does() {
    let si = standin().await;
    let http = reqwest::Client::new();
    let bad: Value = http
        .post(&si.token_url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", "nope"),
            ("scope", GRAPH_SCOPE),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bad["error"], "invalid_client");
    assert!(bad["error_description"]
        .as_str()
        .unwrap()
        .starts_with("AADSTS7000215"));
    let c = Client::new(&si).await;
    let (code, body) = c
        .get(&format!(
            "{}/users/nobody@contoso.test/mailFolders",
            si.graph_url
        ))
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("ErrorInvalidUser"))
    );
    si.set_scope(Some(&["buyer@fabrikam.test"]));
    let (code, body) = c.get("mailFolders/inbox").await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("ErrorAccessDenied"))
    );
    si.set_scope(None);
    si.expire_tokens();
    let (code, body) = c.get("mailFolders/inbox").await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (401, Some("InvalidAuthenticationToken"))
    );

    // A fifth request in flight is refused and counted.
    let c = Client::new(&si).await;
    si.set_delay(Duration::from_millis(300));
    let all = futures::future::join_all((0..6).map(|_| c.get("mailFolders/inbox"))).await;
    let refused = all.iter().filter(|(code, _)| *code == 429).count();
    assert_eq!(refused, 2, "{all:?}");
    assert_eq!(si.stats().concurrency_violations, 2);
    si.set_delay(Duration::ZERO);
    // Injected throttling says how long to wait, and notices an early retry.
    si.throttle_next(1, "0.5");
    let r = c
        .http
        .get(c.url("mailFolders/inbox"))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "0.5");
    let (code, _) = c.get("mailFolders/inbox").await;
    assert_eq!(code, 200);
    assert_eq!(si.stats().early_retries, 1);
    assert_eq!(si.stats().without_immutable_ids, 1);
}

/// The docs' example property ("Create single-value extended property",
/// request 2; "Get singleValueLegacyExtendedProperty", request 1).
const COLOR: &str = "String {66f5a359-4659-4830-9070-00047ec6ac6e} Name Color";

#[tokio::test]
async fn folders_keep_single_value_extended_properties_as_the_docs_show() {
    let si = standin().await;
    let c = Client::new(&si).await;
    // The docs' GET, URL-encoded as there: no such property yet, so the
    // folder comes without the collection.
    let expand_color = "$expand=singleValueExtendedProperties($filter=id%20eq%20'String%20{66f5a359-4659-4830-9070-00047ec6ac6e}%20Name%20Color')";
    let (code, inbox) = c.get(&format!("mailFolders/inbox?{expand_color}")).await;
    assert_eq!(code, 200, "{inbox}");
    assert_eq!(inbox["displayName"], "Inbox");
    assert!(
        inbox.get("singleValueExtendedProperties").is_none(),
        "{inbox}"
    );
    // The docs' PATCH body: 200 with the folder, not the property.
    let patch = |folder: &str, body: Value| {
        c.send(
            c.http
                .patch(c.url(&format!("mailFolders/{folder}")))
                .json(&body),
        )
    };
    let (code, patched) = patch(
        "inbox",
        json!({"singleValueExtendedProperties": [{"id": COLOR, "value": "Green"}]}),
    )
    .await;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["displayName"], "Inbox");
    assert!(patched.get("singleValueExtendedProperties").is_none());
    let (code, inbox) = c.get(&format!("mailFolders/inbox?{expand_color}")).await;
    assert_eq!(code, 200, "{inbox}");
    assert_eq!(
        inbox["singleValueExtendedProperties"],
        json!([{"id": COLOR, "value": "Green"}]),
        "{inbox}"
    );
    assert!(inbox["singleValueExtendedProperties@odata.context"]
        .as_str()
        .unwrap()
        .ends_with("/singleValueExtendedProperties"));
    // Per folder: the root (by its well-known name) has none; `$select`
    // leaves the id.
    let (code, root) = c
        .get(&format!(
            "mailFolders/msgfolderroot?$select=id&{expand_color}"
        ))
        .await;
    assert_eq!(code, 200, "{root}");
    assert!(
        root.get("singleValueExtendedProperties").is_none(),
        "{root}"
    );
    assert!(
        root["id"].is_string() && root.get("displayName").is_none(),
        "{root}"
    );
    // PATCH merges: a second property joins, the first is replaced.
    let size = "Integer {66f5a359-4659-4830-9070-00047ec6ac6e} Id 0x8012";
    let (code, _) = patch(
        "inbox",
        json!({"singleValueExtendedProperties": [{"id": size, "value": "12"}]}),
    )
    .await;
    assert_eq!(code, 200);
    let (code, _) = patch(
        "inbox",
        json!({"singleValueExtendedProperties": [{"id": COLOR, "value": "Light green"}]}),
    )
    .await;
    assert_eq!(code, 200);
    let expand = |id: &str| {
        format!(
            "mailFolders/inbox?$expand={}",
            urlencode(&format!(
                "singleValueExtendedProperties($filter=id eq '{id}')"
            ))
        )
    };
    let (_, v) = c.get(&expand(size)).await;
    assert_eq!(v["singleValueExtendedProperties"][0]["value"], "12", "{v}");
    let (_, v) = c.get(&expand(COLOR)).await;
    assert_eq!(
        v["singleValueExtendedProperties"][0]["value"], "Light green",
        "{v}"
    );
    // The GUID's case does not matter, the name's does.
    let (_, v) = c
        .get(&expand(
            &COLOR.to_uppercase().replace("NAME COLOR", "Name Color"),
        ))
        .await;
    assert_eq!(
        v["singleValueExtendedProperties"][0]["value"], "Light green",
        "{v}"
    );
    let (_, v) = c.get(&expand(&COLOR.replace("Color", "color"))).await;
    assert!(v.get("singleValueExtendedProperties").is_none(), "{v}");
    assert_eq!(
        si.extended_property(USER, "inbox", COLOR).as_deref(),
        Some("Light green")
    );
    assert_eq!(si.extended_property(USER, "msgfolderroot", COLOR), None);
    // An id in none of the three formats: 400 ErrorInvalidProperty, on
    // PATCH and on GET alike.
    let (code, body) = patch(
        "inbox",
        json!({"singleValueExtendedProperties": [{"id": "Color", "value": "Red"}]}),
    )
    .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("ErrorInvalidProperty")),
        "{body}"
    );
    let (code, body) = c.get(&expand("Color")).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("ErrorInvalidProperty")),
        "{body}"
    );
    // The overview's three formats are ids; near misses are not.
    for (id, want) in [
        (
            "String {8ECCC264-6880-4EBE-992F-8888D2EEAA1D} Name TestProperty",
            200,
        ),
        (
            "Integer {8ECCC264-6880-4EBE-992F-8888D2EEAA1D} Id 0x8012",
            200,
        ),
        ("String 0x4001001E", 200),
        (
            "String {8ECCC264-6880-4EBE-992F-8888D2EEAA1D} Name Test Property",
            200,
        ),
        ("Text {8ECCC264-6880-4EBE-992F-8888D2EEAA1D} Name X", 400),
        ("String 8ECCC264-6880-4EBE-992F-8888D2EEAA1D Name X", 400),
        ("String {8ECCC264-6880-4EBE-992F} Name X", 400),
        (
            "String {8ECCC264-6880-4EBE-992F-8888D2EEAA1D} Id twelve",
            400,
        ),
        ("String {8ECCC264-6880-4EBE-992F-8888D2EEAA1D} Name", 400),
    ] {
        let (code, body) = patch(
            "drafts",
            json!({"singleValueExtendedProperties": [{"id": id, "value": "v"}]}),
        )
        .await;
        assert_eq!(code, want, "{id}: {body}");
    }
    // The request log saw each of them, decoded.
    let log = si.requests();
    let patches: Vec<_> = log.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 4 + 9);
    assert!(patches[..4].iter().all(|r| r.path == "mailFolders/inbox"));
    assert_eq!(
        patches.iter().filter(|r| r.status == 200).count() as u64,
        si.stats().folder_patches
    );
    let first = &log[0];
    assert_eq!((first.method.as_str(), first.status), ("GET", 200));
    assert_eq!(
        first.param("$expand"),
        Some(format!("singleValueExtendedProperties($filter=id eq '{COLOR}')").as_str())
    );
}

/// Percent-encodes a query value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
