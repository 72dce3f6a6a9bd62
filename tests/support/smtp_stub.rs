//! A scripted SMTP server on loopback, for what the shared sink cannot do:
//! answer 451/550 (any code and text) at a chosen stage, drop the
//! connection, or go silent. Plaintext only; it accepts any AUTH PLAIN,
//! LOGIN or XOAUTH2 login unless scripted otherwise, and records every
//! command line and every message it accepted.
//!
//! Used by the unit tests of `src/outgoing/smtp.rs` (via `#[path]`) and by
//! `tests/smtp.rs`, so it depends on tokio and std only.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpListener;

/// Where in the dialogue the scripted fault happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Instead of the 220 greeting.
    Greeting,
    /// Answer to EHLO.
    Ehlo,
    /// Answer to AUTH (after the whole SASL exchange).
    Auth,
    /// Answer to MAIL FROM.
    Mail,
    /// Answer to RCPT TO (every recipient).
    Rcpt,
    /// Answer to the DATA command (no message is read).
    Data,
    /// Answer after the message's final `.`.
    Dot,
}

/// What happens at the scripted stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Reply this code and text (`550`, `5.1.1 user unknown`).
    Reply(u16, String),
    /// Close the connection without a word.
    Drop,
    /// Say nothing, keep the connection open.
    Hang,
}

/// The behaviour of the stand-in.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// The one fault (applies to every transaction on every connection).
    pub fault: Option<(Stage, Action)>,
    /// Offer STARTTLS in EHLO (and refuse it when asked: there is no TLS here).
    pub offer_starttls: bool,
    /// Offer no AUTH at all.
    pub no_auth: bool,
    /// With a fault at `Stage::Rcpt`: only recipients whose RCPT line
    /// contains this (so the rest of the transaction, and other mail, pass).
    pub rcpt_matching: Option<String>,
}

impl Script {
    /// A script with one fault.
    pub fn fault(stage: Stage, action: Action) -> Self {
        Script {
            fault: Some((stage, action)),
            ..Script::default()
        }
    }

    /// A script replying `code text` at `stage`.
    pub fn reply(stage: Stage, code: u16, text: &str) -> Self {
        Self::fault(stage, Action::Reply(code, text.to_string()))
    }
}

#[derive(Debug, Default)]
struct State {
    commands: Vec<String>,
    messages: Vec<Vec<u8>>,
    connections: usize,
    open: usize,
    max_open: usize,
}

/// A running stand-in; stops when dropped.
pub struct SmtpStub {
    /// Port on 127.0.0.1.
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpStub {
    /// Binds 127.0.0.1 on a free port and serves `script`.
    pub async fn start(script: Script) -> SmtpStub {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let port = listener.local_addr().expect("stub address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                {
                    let mut s = lock(&st);
                    s.connections += 1;
                    s.open += 1;
                    s.max_open = s.max_open.max(s.open);
                }
                tokio::spawn(serve(sock, script.clone(), Arc::clone(&st)));
            }
        });
        SmtpStub { port, state, task }
    }

    /// Every command line received, in order (AUTH data included: test
    /// credentials only).
    pub fn commands(&self) -> Vec<String> {
        lock(&self.state).commands.clone()
    }

    /// Messages accepted (DATA bytes, dot-unstuffed, CRLF kept).
    pub fn messages(&self) -> Vec<Vec<u8>> {
        lock(&self.state).messages.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    /// Most connections that were open at the same time.
    pub fn max_open(&self) -> usize {
        lock(&self.state).max_open
    }
}

impl Drop for SmtpStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Does the scripted thing at `stage`; `Ok(true)` = it replied (skip the
/// normal answer), `Err` = the connection is over.
async fn act(script: &Script, stage: Stage, w: &mut OwnedWriteHalf) -> Result<bool, ()> {
    match &script.fault {
        Some((s, action)) if *s == stage => match action {
            Action::Reply(code, text) => {
                send(w, &format!("{code} {text}\r\n")).await?;
                Ok(true)
            }
            Action::Drop => Err(()),
            Action::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(())
            }
        },
        _ => Ok(false),
    }
}

async fn send(w: &mut OwnedWriteHalf, text: &str) -> Result<(), ()> {
    w.write_all(text.as_bytes()).await.map_err(|_| ())?;
    w.flush().await.map_err(|_| ())
}

async fn read_line(r: &mut BufReader<OwnedReadHalf>) -> Result<String, ()> {
    let mut line = String::new();
    match r.read_line(&mut line).await {
        Ok(0) | Err(_) => Err(()),
        Ok(_) => Ok(line.trim_end_matches(['\r', '\n']).to_string()),
    }
}

async fn serve(sock: tokio::net::TcpStream, script: Script, state: Arc<Mutex<State>>) {
    let _ = dialogue(sock, &script, &state).await;
    lock(&state).open -= 1;
}

async fn dialogue(
    sock: tokio::net::TcpStream,
    script: &Script,
    state: &Mutex<State>,
) -> Result<(), ()> {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    if !act(script, Stage::Greeting, &mut w).await? {
        send(&mut w, "220 stub.test ESMTP scripted stand-in\r\n").await?;
    }
    loop {
        let line = read_line(&mut r).await?;
        lock(state).commands.push(line.clone());
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" | "HELO" => {
                if act(script, Stage::Ehlo, &mut w).await? {
                    continue;
                }
                let mut text = String::from("250-stub.test\r\n");
                if script.offer_starttls {
                    text.push_str("250-STARTTLS\r\n");
                }
                if !script.no_auth {
                    text.push_str("250-AUTH PLAIN LOGIN XOAUTH2\r\n");
                }
                text.push_str("250 8BITMIME\r\n");
                send(&mut w, &text).await?;
            }
            "STARTTLS" => send(&mut w, "454 4.7.0 TLS not available here\r\n").await?,
            "AUTH" => {
                let mut words = line.split_whitespace().skip(1);
                let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
                let initial = words.next().is_some();
                match mechanism.as_str() {
                    "LOGIN" => {
                        if !initial {
                            send(&mut w, "334 VXNlcm5hbWU6\r\n").await?;
                            let l = read_line(&mut r).await?;
                            lock(state).commands.push(l);
                        }
                        send(&mut w, "334 UGFzc3dvcmQ6\r\n").await?;
                        let l = read_line(&mut r).await?;
                        lock(state).commands.push(l);
                    }
                    _ if !initial => {
                        send(&mut w, "334 \r\n").await?;
                        let l = read_line(&mut r).await?;
                        lock(state).commands.push(l);
                    }
                    _ => {}
                }
                if !act(script, Stage::Auth, &mut w).await? {
                    send(&mut w, "235 2.7.0 Authentication successful\r\n").await?;
                }
            }
            "MAIL" => {
                if !act(script, Stage::Mail, &mut w).await? {
                    send(&mut w, "250 2.1.0 OK\r\n").await?;
                }
            }
            "RCPT" => {
                let matches = script
                    .rcpt_matching
                    .as_deref()
                    .is_none_or(|m| line.contains(m));
                if !matches || !act(script, Stage::Rcpt, &mut w).await? {
                    send(&mut w, "250 2.1.5 OK\r\n").await?;
                }
            }
            "DATA" => {
                if act(script, Stage::Data, &mut w).await? {
                    continue;
                }
                send(&mut w, "354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                let mut message = Vec::new();
                loop {
                    let mut raw = Vec::new();
                    match r.read_until(b'\n', &mut raw).await {
                        Ok(0) | Err(_) => return Err(()),
                        Ok(_) => {}
                    }
                    if raw == b".\r\n" || raw == b".\n" {
                        break;
                    }
                    let unstuffed = if raw.starts_with(b"..") {
                        &raw[1..]
                    } else {
                        &raw[..]
                    };
                    message.extend_from_slice(unstuffed);
                }
                if act(script, Stage::Dot, &mut w).await? {
                    continue;
                }
                let n = {
                    let mut st = lock(state);
                    st.messages.push(message);
                    st.messages.len()
                };
                send(&mut w, &format!("250 2.0.0 Ok: queued as STUB{n}\r\n")).await?;
            }
            "RSET" | "NOOP" => send(&mut w, "250 2.0.0 OK\r\n").await?,
            "QUIT" => {
                let _ = send(&mut w, "221 2.0.0 Bye\r\n").await;
                return Ok(());
            }
            _ => send(&mut w, "502 5.5.2 Command not recognized\r\n").await?,
        }
    }
}
