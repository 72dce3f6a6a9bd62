//! The Microsoft Graph stand-in of the tests (`tests/support/graph_standin/`)
//! as a process, for `scripts/bench_graph.py`: it seeds `--mailboxes`
//! mailboxes (`bench0@contoso.test`…) with `--messages` generated messages
//! in all, prints what a config needs as one JSON line, and serves until its
//! stdin closes (then prints its counters).
//!
//! `--selfbench` instead measures the stand-in alone: the request mix of an
//! initial sync (delta pages listing the categories, `$value` and the
//! category PATCH of each message), four requests in flight, and prints
//! messages per second.
//!
//! usage: graph_standin [--messages N] [--mailboxes M] [--port P] [--page-size 100] [--selfbench]

#[path = "../tests/support/graph_standin/mod.rs"]
mod graph_standin;

use std::time::Instant;

use futures::StreamExt as _;
use graph_standin::{GraphStandIn, GRAPH_SCOPE};

const CLIENT: &str = "0b3c5e1a-bench-4000-8000-000000000001";
const SECRET: &str = "bench-standin-secret";

fn mailbox(k: usize) -> String {
    format!("bench{k}@contoso.test")
}

struct Args {
    messages: usize,
    mailboxes: usize,
    port: u16,
    page_size: usize,
    selfbench: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        messages: 10_000,
        mailboxes: 1,
        port: 0,
        page_size: 100,
        selfbench: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match k.as_str() {
            "--messages" => a.messages = value("--messages")?,
            "--mailboxes" => a.mailboxes = value("--mailboxes")?.max(1),
            "--port" => a.port = value("--port")? as u16,
            "--page-size" => a.page_size = value("--page-size")?,
            "--selfbench" => a.selfbench = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn message(i: usize, to: &str) -> Vec<u8> {
    format!(
        "Message-ID: <bench-{i}@fabrikam.test>\r\nDate: Tue, 06 Jan 2026 09:{:02}:{:02} +0000\r\nFrom: Customer {} <customer{}@fabrikam.test>\r\nTo: {to}\r\nSubject: {}Order {} question\r\n\r\nHello,\r\n\r\nthis is message {i}.\r\nLorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n",
        (i / 60) % 60,
        i % 60,
        i % 300,
        i % 300,
        if i.is_multiple_of(5) { "" } else { "Re: " },
        i / 5
    )
    .into_bytes()
}

/// The stand-in alone, with the daemon's request mix for an initial sync
/// of every mailbox at once (four requests in flight each).
async fn selfbench(si: &GraphStandIn, a: &Args) -> Result<f64, String> {
    let http = reqwest::Client::new();
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
        ("scope", GRAPH_SCOPE),
    ];
    let t0 = Instant::now();
    let tok: serde_json::Value = http
        .post(&si.token_url)
        .form(&form)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let token = tok["access_token"].as_str().unwrap_or_default().to_string();
    let page_size = a.page_size;
    let rounds = (0..a.mailboxes).map(|k| {
        let base = format!("{}/users/{}", si.graph_url, mailbox(k));
        sync_one(&http, &token, base, page_size)
    });
    let counts = futures::future::join_all(rounds).await;
    let mut done = 0;
    for c in counts {
        done += c?;
    }
    if done != a.messages {
        return Err(format!("selfbench saw {done} of {} messages", a.messages));
    }
    Ok(a.messages as f64 / t0.elapsed().as_secs_f64())
}

/// One mailbox's initial sync: delta pages, `$value`, the category PATCH.
async fn sync_one(
    http: &reqwest::Client,
    token: &str,
    base: String,
    page_size: usize,
) -> Result<usize, String> {
    let get = |url: String| {
        let http = http.clone();
        let token = token.to_string();
        async move {
            http.get(url)
                .bearer_auth(token)
                .header(
                    "Prefer",
                    format!("IdType=\"ImmutableId\", odata.maxpagesize={page_size}"),
                )
                .send()
                .await
                .map_err(|e| e.to_string())?
                .bytes()
                .await
                .map_err(|e| e.to_string())
        }
    };
    let mut link = format!(
        "{base}/mailFolders/inbox/messages/delta?$select=id,receivedDateTime,internetMessageId,categories"
    );
    let mut done = 0usize;
    loop {
        let page: serde_json::Value =
            serde_json::from_slice(&get(link.clone()).await?).map_err(|e| e.to_string())?;
        let ids: Vec<String> = page["value"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(String::from))
            .collect();
        let jobs = ids.iter().map(|id| {
            let enc = id.replace('=', "%3D");
            let value = get(format!("{base}/messages/{enc}/$value"));
            let patch = http
                .patch(format!("{base}/messages/{enc}"))
                .bearer_auth(token)
                .header("Prefer", "IdType=\"ImmutableId\"")
                .header("Content-Type", "application/json")
                .body(r#"{"categories":["Tracked to CRM"]}"#)
                .send();
            async move {
                value.await?;
                patch.await.map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            }
        });
        let results: Vec<Result<(), String>> = futures::stream::iter(jobs)
            .buffer_unordered(4)
            .collect()
            .await;
        for r in results {
            r?;
        }
        done += ids.len();
        match (
            page["@odata.nextLink"].as_str(),
            page["@odata.deltaLink"].as_str(),
        ) {
            (Some(next), _) => link = next.to_string(),
            _ => break,
        }
    }
    Ok(done)
}

#[tokio::main]
async fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("graph_standin: {e}");
            std::process::exit(64);
        }
    };
    let si = GraphStandIn::start_on(a.port).await;
    si.add_client(CLIENT, SECRET);
    for k in 0..a.mailboxes {
        si.add_user(&mailbox(k));
    }
    for i in 0..a.messages {
        let to = mailbox(i % a.mailboxes);
        si.deliver(&to, "Inbox", &message(i, &to));
    }
    if a.selfbench {
        match selfbench(&si, &a).await {
            Ok(rate) => {
                let st = si.stats();
                println!(
                    "{}",
                    serde_json::json!({"messages": a.messages, "messages_per_s": rate, "requests": st.requests})
                );
            }
            Err(e) => {
                eprintln!("graph_standin: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    println!(
        "{}",
        serde_json::json!({
            "graph_url": si.graph_url,
            "login_url": si.url,
            "tenant": si.tenant,
            "client_id": CLIENT,
            "client_secret": SECRET,
            "mailboxes": (0..a.mailboxes).map(mailbox).collect::<Vec<_>>(),
            "messages": a.messages,
        })
    );
    // Serve until killed; report the counters on stdin's end (the script
    // closes it when the run is over).
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    let st = si.stats();
    println!(
        "{}",
        serde_json::json!({"requests": st.requests, "downloads": st.downloads, "patches": st.patches, "peak_in_flight": st.peak_in_flight, "concurrency_violations": st.concurrency_violations, "over_mailbox_limit": st.over_mailbox_limit})
    );
}
