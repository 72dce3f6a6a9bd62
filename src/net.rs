//! Shared transport for the mail protocols: TCP with read/write time-outs, TLS on
//! rustls (ring provider, system roots plus an optional extra CA), STARTTLS upgrade.
//!
//! The protocol crates we use have no time-outs of their own, so every socket goes
//! through [`TimeoutStream`] before anything else touches it.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::error::{Classify, Disposition};

/// How the connection is secured.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// TLS from the first byte (IMAPS 993, POP3S 995, SMTPS 465).
    Implicit,
    /// Plain connect, then STARTTLS/STLS before authenticating (the default).
    StartTls,
    /// No TLS at all. Only allowed with `allow_insecure = true`.
    Plain,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Name checked against the server certificate; defaults to `host`.
    pub tls_server_name: Option<String>,
    /// Extra PEM CA bundle trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
}

/// Transport-level failure.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("connect to {addr} timed out after {secs}s")]
    ConnectTimeout { addr: String, secs: u64 },
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("TLS handshake with {server} failed: certificate problem: {detail}")]
    Certificate { server: String, detail: String },
    #[error("TLS handshake with {server} failed: {source}")]
    Handshake { server: String, source: io::Error },
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("cannot load CA file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("TLS setup failed: {0}")]
    TlsSetup(String),
}

impl Classify for NetError {
    fn disposition(&self) -> Disposition {
        match self {
            NetError::ConnectTimeout { .. }
            | NetError::Connect { .. }
            | NetError::Handshake { .. } => Disposition::Transient,
            NetError::Certificate { .. }
            | NetError::ServerName(_)
            | NetError::CaFile { .. }
            | NetError::TlsSetup(_) => Disposition::Permanent,
        }
    }
}

/// A TCP stream with read and write time-outs.
pub type TimedTcp = Pin<Box<TimeoutStream<TcpStream>>>;

/// Either side of a connection that may or may not have been upgraded to TLS.
pub enum MaybeTls {
    Plain(TimedTcp),
    Tls(Box<tokio_rustls::client::TlsStream<TimedTcp>>),
}

impl std::fmt::Debug for MaybeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaybeTls::Plain(_) => "MaybeTls::Plain",
            MaybeTls::Tls(_) => "MaybeTls::Tls",
        })
    }
}

impl MaybeTls {
    /// True once the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => s.as_mut().poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => s.as_mut().poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => s.as_mut().poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => s.as_mut().poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Whether `url` is plaintext `http://` to a host other than loopback
/// (`localhost`, 127.0.0.0/8, `::1`): what `allow_insecure` must permit.
pub fn plaintext_off_loopback(url: &reqwest::Url) -> bool {
    if url.scheme() != "http" {
        return false;
    }
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    !(host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()))
}

/// Builds a rustls client configuration with the ring provider chosen explicitly
/// (with two providers linked, `ClientConfig::builder()` would panic), the system
/// roots, and `extra_ca` if given.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, NetError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A broken system certificate must not take the others down with it.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        use rustls_pki_types::pem::PemObject;
        let ca_err = |detail: String| NetError::CaFile {
            path: path.display().to_string(),
            detail,
        };
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(e.to_string()))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| ca_err(e.to_string()))?;
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(ca_err("no certificate in file".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NetError::TlsSetup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens a TCP connection with time-outs applied; does not start TLS.
pub async fn connect_tcp(ep: &Endpoint) -> Result<TimedTcp, NetError> {
    let addr = format!("{}:{}", ep.host, ep.port);
    let tcp = match tokio::time::timeout(ep.connect_timeout, TcpStream::connect(&addr)).await {
        Err(_) => {
            return Err(NetError::ConnectTimeout {
                addr,
                secs: ep.connect_timeout.as_secs(),
            })
        }
        Ok(Err(source)) => return Err(NetError::Connect { addr, source }),
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    let mut timed = TimeoutStream::new(tcp);
    timed.set_read_timeout(Some(ep.io_timeout));
    timed.set_write_timeout(Some(ep.io_timeout));
    Ok(Box::pin(timed))
}

/// Runs the TLS handshake over an already connected stream (implicit TLS or after STARTTLS).
pub async fn start_tls(ep: &Endpoint, tcp: TimedTcp) -> Result<MaybeTls, NetError> {
    let name = ep
        .tls_server_name
        .clone()
        .unwrap_or_else(|| ep.host.clone());
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| NetError::ServerName(name.clone()))?;
    let connector = TlsConnector::from(client_config(ep.ca_file.as_deref())?);
    match tokio::time::timeout(ep.connect_timeout, connector.connect(server_name, tcp)).await {
        Err(_) => Err(NetError::Handshake {
            server: name,
            source: io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
        }),
        Ok(Ok(tls)) => Ok(MaybeTls::Tls(Box::new(tls))),
        Ok(Err(e)) => Err(classify_tls_io_error(name, e)),
    }
}

/// Connects and, for implicit TLS, handshakes. STARTTLS is the protocol's business:
/// it reads the greeting, sends its command, then calls [`start_tls`].
pub async fn connect(ep: &Endpoint) -> Result<MaybeTls, NetError> {
    let tcp = connect_tcp(ep).await?;
    match ep.tls {
        TlsMode::Implicit => start_tls(ep, tcp).await,
        TlsMode::StartTls | TlsMode::Plain => Ok(MaybeTls::Plain(tcp)),
    }
}

/// Separates certificate problems (permanent: the operator must fix trust) from
/// network trouble during the handshake (transient).
fn classify_tls_io_error(server: String, e: io::Error) -> NetError {
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        match inner {
            rustls::Error::InvalidCertificate(cert) => {
                return NetError::Certificate {
                    detail: certificate_problem(cert, &server),
                    server,
                }
            }
            rustls::Error::NoCertificatesPresented => {
                return NetError::Certificate {
                    server,
                    detail: "server presented no certificate".into(),
                }
            }
            // Alerts and garbled records are usually a flaky network or middlebox:
            // worth a retry, unlike a certificate the operator must fix.
            other => {
                return NetError::Handshake {
                    server,
                    source: io::Error::other(other.to_string()),
                }
            }
        }
    }
    NetError::Handshake { server, source: e }
}

/// What an operator should read for a rejected server certificate: the
/// problem in words and what to change, never a Rust debug dump.
pub(crate) fn certificate_problem(cert: &rustls::CertificateError, server: &str) -> String {
    use rustls::CertificateError as C;
    let when = |t: &rustls_pki_types::UnixTime| {
        i64::try_from(t.as_secs())
            .map_or_else(|_| t.as_secs().to_string(), crate::model::format_time)
    };
    match cert {
        C::UnknownIssuer => format!(
            "the certificate of {server} is not signed by a trusted CA (unknown issuer); if the server uses a private or self-signed CA, set ca_file to that CA's PEM file"
        ),
        C::NotValidForNameContext { expected, presented } => {
            let names = if presented.is_empty() {
                "no names".to_string()
            } else {
                presented
                    .iter()
                    .map(|n| presented_name(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "the certificate is not valid for the name {:?} we connected by; it is for {names}: connect by one of those names (host), or set tls_server_name to one of them",
                server_name_text(expected)
            )
        }
        C::NotValidForName => format!(
            "the certificate is not valid for the name {server:?} we connected by: connect by a name the certificate lists (host), or set tls_server_name"
        ),
        C::ExpiredContext { time, not_after } => format!(
            "the certificate expired at {} (it is now {}): the server's certificate must be renewed",
            when(not_after),
            when(time)
        ),
        C::Expired => {
            "the certificate has expired: the server's certificate must be renewed".to_string()
        }
        C::NotValidYetContext { time, not_before } => format!(
            "the certificate is not valid before {} (it is now {}): check the clock of this machine and of the server",
            when(not_before),
            when(time)
        ),
        C::NotValidYet => "the certificate is not valid yet: check the clock of this machine and of the server".to_string(),
        C::Revoked => "the certificate has been revoked by its CA".to_string(),
        C::BadSignature => "the certificate's signature is invalid".to_string(),
        C::BadEncoding => "the certificate could not be decoded".to_string(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "the certificate is not meant for a TLS server (extended key usage)".to_string()
        }
        // Rarer problems: rustls' own wording is readable enough.
        other => other.to_string(),
    }
}

/// A name from the certificate as webpki reports it (`DnsName("localhost")`,
/// `IpAddress(127.0.0.1)`), without the wrapper.
fn presented_name(name: &str) -> String {
    let inner = ["DnsName(", "IpAddress(", "UniformResourceIdentifier("]
        .iter()
        .find_map(|p| name.strip_prefix(p)?.strip_suffix(')'));
    match inner {
        Some(n) => n.trim_matches('"').to_string(),
        None => name.to_string(),
    }
}

/// A TLS server name as the operator wrote it (DNS name or IP address).
fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_insecure_only_off_loopback() {
        let insecure = |u: &str| plaintext_off_loopback(&reqwest::Url::parse(u).unwrap());
        assert!(!insecure("https://crm.example.com/hook"));
        assert!(!insecure("http://127.0.0.1:8080/hook"));
        assert!(!insecure("http://localhost/hook"));
        assert!(!insecure("http://[::1]:9/x"));
        assert!(insecure("http://crm.example.com/hook"));
        assert!(insecure("http://10.0.0.1:80/"));
        assert!(insecure("http://user@crm.example.com:8080/x?y#z"));
    }
    use rustls::CertificateError as C;
    use rustls_pki_types::UnixTime;

    fn shown(cert: C) -> String {
        let err = io::Error::other(rustls::Error::InvalidCertificate(cert));
        let e = classify_tls_io_error("mail.example.test".into(), err);
        assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
        e.to_string()
    }

    #[test]
    fn certificate_errors_are_explained_not_dumped() {
        let t = |s| UnixTime::since_unix_epoch(Duration::from_secs(s));
        let text = shown(C::UnknownIssuer);
        assert!(
            text.contains("not signed by a trusted CA") && text.contains("ca_file"),
            "{text}"
        );
        let text = shown(C::NotValidForNameContext {
            expected: ServerName::try_from("mail.example.test")
                .unwrap()
                .to_owned(),
            presented: vec![
                "DnsName(\"localhost\")".into(),
                "IpAddress(127.0.0.1)".into(),
            ],
        });
        assert!(!text.contains("NotValidForNameContext"), "{text}");
        assert!(
            text.contains("\"mail.example.test\"")
                && text.contains("it is for localhost, 127.0.0.1:"),
            "{text}"
        );
        let text = shown(C::ExpiredContext {
            time: t(1_767_225_600),
            not_after: t(1_735_689_600),
        });
        assert!(text.contains("expired at 2025-01-01T00:00:00Z"), "{text}");
        let text = shown(C::NotValidYetContext {
            time: t(1_735_689_600),
            not_before: t(1_767_225_600),
        });
        assert!(
            text.contains("not valid before 2026-01-01T00:00:00Z") && text.contains("clock"),
            "{text}"
        );
        for dump in ["Context", "{", "UnixTime"] {
            assert!(!text.contains(dump), "{text}");
        }
    }
}
