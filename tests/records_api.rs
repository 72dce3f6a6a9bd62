//! The record directory over the admin API, against the real daemon:
//! create, read, replace, delete, address lookup, paging, bulk upsert in
//! one batch, validation errors as JSON, and the bearer token.
//! Also the parameter checks of the events feed and the outbox views.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// A blocking client for the admin API: (status, JSON body or null).
struct Api {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    port: u16,
}

impl Api {
    fn new(port: u16) -> Self {
        Api {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            // No pooled connections: the daemon restarts in between.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            port,
        }
    }

    fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> (u16, Value) {
        self.rt.block_on(async {
            let mut req = self
                .http
                .request(method, format!("http://127.0.0.1:{}{path}", self.port));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some((content_type, bytes)) = body {
                req = req.header("content-type", content_type).body(bytes);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            let value = if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
            };
            (status, value)
        })
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.send(Method::GET, path, Some(TOKEN), None)
    }

    fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.put_raw(path, body.to_string().into_bytes())
    }

    fn put_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        self.send(
            Method::PUT,
            path,
            Some(TOKEN),
            Some(("application/json", body)),
        )
    }

    fn post(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        self.send(Method::POST, path, Some(TOKEN), Some((content_type, body)))
    }

    fn delete(&self, path: &str) -> (u16, Value) {
        self.send(Method::DELETE, path, Some(TOKEN), None)
    }
}

/// Asserts a JSON error answer with this status whose message contains `needle`.
fn assert_error(answer: &(u16, Value), status: u16, needle: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    let msg = answer.1["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {}", answer.1));
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

fn start_daemon(dir: &std::path::Path) -> (std::process::Child, u16, std::path::PathBuf) {
    let maildir = dir.join("Maildir");
    make_maildir(&maildir);
    let port = free_port();
    let cfg = maildir_config(dir, &maildir, port, 50, "");
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "daemon ready", || {
        get(port, "/readyz", None).filter(|(s, _)| *s == 200)
    });
    (child, port, cfg)
}

#[test]
fn records_crud_lookup_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let (child, port, cfg) = start_daemon(dir.path());
    let api = Api::new(port);

    // Bearer token required on every records, events and outbox route.
    for (method, path) in [
        (Method::GET, "/api/v1/records"),
        (Method::GET, "/api/v1/records/contact/c1"),
        (Method::PUT, "/api/v1/records/contact/c1"),
        (Method::DELETE, "/api/v1/records/contact/c1"),
        (Method::POST, "/api/v1/records"),
        (Method::GET, "/api/v1/events"),
        (Method::GET, "/api/v1/events/1"),
        (Method::GET, "/api/v1/outbox"),
        (Method::GET, "/api/v1/outbox/webhook/dead-letters"),
    ] {
        for token in [None, Some("not-the-token")] {
            let a = api.send(
                method.clone(),
                path,
                token,
                Some(("application/json", b"{}".to_vec())),
            );
            assert_error(&a, 401, "bearer token");
        }
    }

    // Create, read, unchanged, update.
    let ann = json!({"name": "Ann Example", "emails": ["Ann@Example.com", "ann.e@example.org"], "owner": "u1"});
    let created = api.put("/api/v1/records/contact/c1", ann.clone());
    assert_eq!(created.0, 201, "{}", created.1);
    assert_eq!(created.1["result"], "created");
    assert_eq!(created.1["record"]["ref"], "contact:c1");
    let got = api.get("/api/v1/records/contact/c1");
    assert_eq!(got.0, 200);
    assert_eq!(
        (
            &got.1["kind"],
            &got.1["id"],
            &got.1["name"],
            &got.1["owner"],
            &got.1["email_enabled"]
        ),
        (
            &json!("contact"),
            &json!("c1"),
            &json!("Ann Example"),
            &json!("u1"),
            &json!(true)
        )
    );
    assert_eq!(
        got.1["emails"],
        json!(["Ann@Example.com", "ann.e@example.org"])
    );
    let again = api.put("/api/v1/records/contact/c1", ann);
    assert_eq!((again.0, &again.1["result"]), (200, &json!("unchanged")));
    // A record read back can be sent again as it is (kind, id, updated_at, ref
    // stripped or matching).
    let mut echoed = got.1.clone();
    echoed.as_object_mut().unwrap().remove("ref");
    echoed.as_object_mut().unwrap().remove("updated");
    let echo = api.put("/api/v1/records/contact/c1", echoed);
    assert_eq!((echo.0, &echo.1["result"]), (200, &json!("unchanged")));
    let updated = api.put(
        "/api/v1/records/contact/c1",
        json!({"name": "Ann Changed", "emails": ["ann@example.com"], "email_enabled": false}),
    );
    assert_eq!((updated.0, &updated.1["result"]), (200, &json!("updated")));
    let got = api.get("/api/v1/records/contact/c1");
    assert_eq!(got.1["name"], "Ann Changed");
    assert_eq!(got.1["email_enabled"], false);
    assert!(got.1.get("owner").is_none(), "PUT replaces: {}", got.1);
    let user = api.put(
        "/api/v1/records/user/u1",
        json!({"name": "Uma User", "emails": ["uma@crm.example"], "user_number": 4711}),
    );
    assert_eq!(user.0, 201, "{}", user.1);
    assert_eq!(user.1["record"]["user_number"], 4711);

    // Validation: malformed JSON 400, rule breaks 422, each with a message.
    assert_error(
        &api.put_raw("/api/v1/records/contact/c2", b"{\"name\": ".to_vec()),
        400,
        "not valid JSON",
    );
    assert_error(
        &api.put(
            "/api/v1/records/contact/c2",
            json!({"email": "a@b.example"}),
        ),
        400,
        "unknown field `email`",
    );
    assert_error(
        &api.put(
            "/api/v1/records/contact/c2",
            json!({"emails": "a@b.example"}),
        ),
        400,
        "not valid JSON for a record",
    );
    assert_error(
        &api.put("/api/v1/records/Contact/c2", json!({})),
        422,
        "must be lower case (did you mean \"contact\"?)",
    );
    assert_error(
        &api.put("/api/v1/records/con-tact/c2", json!({})),
        422,
        "may only contain a-z, 0-9 and _",
    );
    assert_error(
        &api.put("/api/v1/records/contact/%20", json!({})),
        422,
        "id is empty",
    );
    let bad = api.put(
        "/api/v1/records/contact/c2",
        json!({"emails": ["Bob <bob@example.com>", "bob@", "bob@example.com"], "kind": "lead", "user_number": 3}),
    );
    assert_error(&bad, 422, "the record is not valid");
    let problems = bad.1["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert_eq!(
        api.get("/api/v1/records/contact/c2").0,
        404,
        "nothing written"
    );

    // Address lookup, case-insensitive, through the index; kind narrows it.
    let acct = api.put(
        "/api/v1/records/account/a1",
        json!({"name": "Example Ltd", "emails": ["ANN@example.com", "info@example.com"]}),
    );
    assert_eq!(acct.0, 201);
    let both = api.get("/api/v1/records?email=ann%40EXAMPLE.com");
    assert_eq!(both.0, 200, "{}", both.1);
    let refs: Vec<&str> = both.1["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ref"].as_str().unwrap())
        .collect();
    assert_eq!(refs, ["account:a1", "contact:c1"]);
    let only = api.get("/api/v1/records?email=ann@example.com&kind=contact");
    assert_eq!(only.1["count"], 1);
    assert_eq!(
        api.get("/api/v1/records?email=nobody@example.com").1["count"],
        0
    );
    assert_error(
        &api.get("/api/v1/records?email=not-an-address"),
        400,
        "has no @",
    );
    assert_error(
        &api.get("/api/v1/records?email=a@b.example&limit=5"),
        400,
        "cannot be combined",
    );
    // The old address is gone from the index once the record dropped it.
    assert_eq!(
        api.get("/api/v1/records?email=ann.e@example.org").1["count"],
        0
    );

    // Delete: 204, then 404; the index forgets it.
    assert_eq!(api.delete("/api/v1/records/account/a1").0, 204);
    assert_error(
        &api.delete("/api/v1/records/account/a1"),
        404,
        "no record account:a1",
    );
    assert_error(
        &api.get("/api/v1/records/account/a1"),
        404,
        "no record account:a1",
    );
    assert_eq!(
        api.get("/api/v1/records?email=info@example.com").1["count"],
        0
    );

    // List parameters are checked.
    assert_error(&api.get("/api/v1/records?limit=0"), 400, "limit must be");
    assert_error(&api.get("/api/v1/records?limit=1001"), 400, "limit must be");
    assert_error(
        &api.get("/api/v1/records?after=nocolon"),
        400,
        "after must be",
    );
    assert_error(&api.get("/api/v1/records?kind=Bad"), 400, "lower case");
    assert_error(
        &api.get("/api/v1/records?cursor=1"),
        400,
        "unknown query parameter",
    );

    // The directory survives a restart.
    stop(child);
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "restart", || {
        get(port, "/readyz", None).filter(|(s, _)| *s == 200)
    });
    assert_eq!(
        api.get("/api/v1/records/contact/c1").1["name"],
        "Ann Changed"
    );
    stop(child);
}

fn contact(i: usize) -> Value {
    json!({"kind": "contact", "id": format!("k{i:04}"), "name": format!("Contact {i}"), "emails": [format!("k{i}@bulk.example")]})
}

#[test]
fn bulk_upsert_counts_pages_and_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (child, port, _cfg) = start_daemon(dir.path());
    let api = Api::new(port);

    // 250 new contacts in one JSON array.
    let all: Vec<Value> = (0..250).map(contact).collect();
    let body = serde_json::to_vec(&all).unwrap();
    let first = api.post("/api/v1/records", "application/json", body.clone());
    assert_eq!(first.0, 200, "{}", first.1);
    assert_eq!(
        (
            &first.1["inserted"],
            &first.1["updated"],
            &first.1["unchanged"]
        ),
        (&json!(250), &json!(0), &json!(0))
    );
    let again = api.post("/api/v1/records", "application/json", body);
    assert_eq!(
        (
            &again.1["inserted"],
            &again.1["updated"],
            &again.1["unchanged"]
        ),
        (&json!(0), &json!(0), &json!(250))
    );

    // JSON lines: 3 changed, 2 new, 1 unchanged, blank lines ignored.
    let mut lines = String::new();
    for i in [10, 20, 30] {
        let mut c = contact(i);
        c["name"] = json!(format!("Renamed {i}"));
        lines.push_str(&format!("{c}\n"));
    }
    lines.push('\n');
    for i in [250, 251, 5] {
        lines.push_str(&format!("{}\n", contact(i)));
    }
    let nd = api.post(
        "/api/v1/records",
        "application/x-ndjson",
        lines.into_bytes(),
    );
    assert_eq!(nd.0, 200, "{}", nd.1);
    assert_eq!(
        (
            &nd.1["inserted"],
            &nd.1["updated"],
            &nd.1["unchanged"],
            &nd.1["count"]
        ),
        (&json!(2), &json!(3), &json!(1), &json!(6))
    );
    assert_eq!(
        api.get("/api/v1/records/contact/k0020").1["name"],
        "Renamed 20"
    );

    // Deletions in a batch (`"deleted": true`, as the webhook's record
    // lines have them); of one kind:id given twice, the later item wins.
    let mixed_ops = format!(
        "{}\n{}\n{}\n{}\n",
        json!({"kind": "contact", "id": "k0251", "deleted": true}),
        json!({"kind": "contact", "id": "k0252", "name": "short-lived"}),
        json!({"kind": "contact", "id": "k0252", "deleted": true}),
        json!({"kind": "contact", "id": "k9999", "deleted": true}),
    );
    let del = api.post(
        "/api/v1/records",
        "application/x-ndjson",
        mixed_ops.into_bytes(),
    );
    assert_eq!(del.0, 200, "{}", del.1);
    assert_eq!(
        (&del.1["inserted"], &del.1["deleted"], &del.1["count"]),
        (&json!(0), &json!(1), &json!(4))
    );
    assert_eq!(api.get("/api/v1/records/contact/k0251").0, 404);
    assert_eq!(api.get("/api/v1/records/contact/k0252").0, 404);
    assert_eq!(
        api.get("/api/v1/records?email=k251@bulk.example").1["count"],
        0
    );
    let back = api.post(
        "/api/v1/records",
        "application/json",
        serde_json::to_vec(&[contact(251)]).unwrap(),
    );
    assert_eq!(back.1["inserted"], 1, "{}", back.1);

    // Paging by kind with next cursors visits every record once, in order.
    let mut seen = Vec::new();
    let mut path = "/api/v1/records?kind=contact&limit=100".to_string();
    loop {
        let page = api.get(&path);
        assert_eq!(page.0, 200, "{}", page.1);
        for r in page.1["records"].as_array().unwrap() {
            seen.push(r["id"].as_str().unwrap().to_string());
        }
        match page.1["next"].as_str() {
            Some(next) => path = format!("/api/v1/records?kind=contact&limit=100&after={next}"),
            None => break,
        }
    }
    let expected: Vec<String> = (0..252).map(|i| format!("k{i:04}")).collect();
    assert_eq!(seen, expected);
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), 252);

    // One invalid item: nothing of the batch is written, every bad one named.
    let mut mixed: Vec<Value> = (300..305).map(contact).collect();
    mixed[1]["emails"] = json!(["not-an-address"]);
    mixed[3] = json!({"kind": "contact", "name": "no id"});
    mixed.push(json!({"kind": "contact", "id": "x", "emial": []}));
    let rejected = api.post(
        "/api/v1/records",
        "application/json",
        serde_json::to_vec(&mixed).unwrap(),
    );
    assert_error(
        &rejected,
        422,
        "3 of 6 records are invalid; nothing was written",
    );
    let invalid = rejected.1["invalid"].as_array().unwrap();
    let indexes: Vec<u64> = invalid
        .iter()
        .map(|i| i["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 3, 5]);
    assert!(
        invalid[0]["error"].as_str().unwrap().contains("has no @"),
        "{invalid:?}"
    );
    assert_eq!(invalid[0]["reference"], "contact:k0301");
    assert!(
        invalid[1]["error"]
            .as_str()
            .unwrap()
            .contains("id is missing"),
        "{invalid:?}"
    );
    assert!(
        invalid[2]["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `emial`"),
        "{invalid:?}"
    );
    for i in [300, 302, 304] {
        assert_eq!(api.get(&format!("/api/v1/records/contact/k{i:04}")).0, 404);
    }

    // JSON lines that do not parse are named by line.
    let nd_bad = api.post(
        "/api/v1/records",
        "application/x-ndjson",
        format!("{}\n{{oops\n", contact(400)).into_bytes(),
    );
    assert_error(&nd_bad, 422, "1 of 2 records are invalid");
    assert_eq!(nd_bad.1["invalid"][0]["line"], 2);
    assert_eq!(api.get("/api/v1/records/contact/k0400").0, 404);

    // Bodies that are not a batch at all.
    assert_error(
        &api.post(
            "/api/v1/records",
            "application/json",
            b"{\"kind\":\"contact\"}".to_vec(),
        ),
        400,
        "must be a JSON array",
    );
    assert_error(
        &api.post("/api/v1/records", "application/json", b"[".to_vec()),
        400,
        "not valid JSON",
    );
    assert_error(
        &api.post("/api/v1/records", "application/json", b"[]".to_vec()),
        400,
        "no records",
    );
    assert_error(
        &api.post("/api/v1/records", "text/csv", b"kind,id\n".to_vec()),
        415,
        "application/x-ndjson",
    );
    stop(child);
}

#[test]
fn events_and_outbox_parameters_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (child, port, _cfg) = start_daemon(dir.path());
    let api = Api::new(port);

    let empty = api.get("/api/v1/events");
    assert_eq!(empty.0, 200, "{}", empty.1);
    assert_eq!(empty.1, json!({"events": [], "next_cursor": 0}));
    // A short wait on an empty log ends with no events and the same cursor.
    let waited = api.get("/api/v1/events?after=0&wait=1s");
    assert_eq!(waited.1, json!({"events": [], "next_cursor": 0}));
    assert_error(
        &api.get("/api/v1/events?after=abc"),
        400,
        "after must be a cursor",
    );
    assert_error(
        &api.get("/api/v1/events?after=-1"),
        400,
        "after must be a cursor",
    );
    assert_error(&api.get("/api/v1/events?limit=0"), 400, "limit must be");
    assert_error(&api.get("/api/v1/events?limit=1001"), 400, "limit must be");
    assert_error(
        &api.get("/api/v1/events?wait=2m"),
        400,
        "longer than the longest long-poll",
    );
    assert_error(
        &api.get("/api/v1/events?wait=soon"),
        400,
        "wait must be a duration",
    );
    assert_error(
        &api.get("/api/v1/events?cursor=3"),
        400,
        "unknown query parameter \"cursor\"",
    );
    let ahead = api.get("/api/v1/events?after=999");
    assert_error(&ahead, 409, "past the newest event");
    assert_eq!(ahead.1["last_seq"], 0);
    assert_error(&api.get("/api/v1/events/1"), 404, "no event 1");
    assert_error(&api.get("/api/v1/events/evt_1"), 400, "whole number");

    // The builtin adapter has no outbox consumer.
    let outbox = api.get("/api/v1/outbox");
    assert_eq!(outbox.0, 200);
    assert_eq!(outbox.1["consumers"], json!([]));
    assert!(outbox.1["note"]
        .as_str()
        .unwrap()
        .contains("/api/v1/events"));
    assert_error(
        &api.get("/api/v1/outbox/webhook/dead-letters"),
        404,
        "no outbox consumer \"webhook\"",
    );
    stop(child);
}
