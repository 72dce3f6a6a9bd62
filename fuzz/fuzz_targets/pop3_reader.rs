//! The POP3 client reading an arbitrary server: the fuzz input is everything
//! the server sends, handed out in reads of a size the first byte picks (a
//! line or a dot-stuffed body split across reads is where readers go wrong).
//! The client greets, authenticates and runs every command whatever the
//! replies; each may fail, none may panic or hang.
#![no_main]

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use crm_mailsync::connector::pop3::Pop3Client;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The server: replays `data` (EOF at its end); swallows what is written.
struct Scripted {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest.len().min(self.chunk).min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, script)) = data.split_first() else {
        return;
    };
    let server = Scripted {
        data: script.to_vec(),
        pos: 0,
        chunk: usize::from(first % 64) + 1,
    };
    runtime().block_on(async {
        let Ok(mut c) = Pop3Client::from_stream(server).await else {
            return;
        };
        let _ = c.greeting();
        let _ = c.capabilities().names().count();
        // One after the other, whatever the earlier ones returned.
        match first % 3 {
            0 => drop(c.login_user_pass("user", "pass").await),
            1 => drop(c.auth_plain("user", "pass").await),
            _ => drop(c.auth_xoauth2("user", "token").await),
        }
        let _ = c.stat().await;
        let _ = c.uidl_all().await;
        let _ = c.list_all().await;
        let _ = c.top(1, 0).await;
        let _ = c.retr(1, 1 << 16).await;
        let _ = c.retr(2, 64).await;
        let _ = c.dele(1).await;
        let _ = c.rset().await;
        let _ = c.noop().await;
        let _ = c.quit().await;
    });
});
