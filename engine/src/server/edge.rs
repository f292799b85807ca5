//! The network edge: every HTTP connection comes in through [`serve`]. It owns what a hostile
//! or broken client could otherwise use to stall or exhaust the server before a handler runs:
//!
//! 1. **Connections**: at most [`EdgeLimits::max_connections`] at once; past it, new ones wait in
//!    the kernel's accept queue (never refused by a crash, never served at the others' expense);
//!    at most [`EdgeLimits::max_connections_per_address`] from one client address (more are
//!    closed at once), so one host cannot hold every slot.
//! 2. **Headers**: read within [`EdgeLimits::header_read_timeout`] (also the idle time a
//!    keep-alive connection may sit between requests, the TLS handshake's time, and the longest
//!    a write to a client that stopped reading may stall), at most
//!    [`EdgeLimits::max_headers`] of them and [`EdgeLimits::max_header_bytes`] in all (hyper
//!    answers 431 past either; a timeout closes the connection).
//! 3. **TLS** ([`Tls`]): rustls with the ring provider, TLS 1.2 and 1.3 only, optionally requiring
//!    client certificates (mTLS; the verified subject goes into the request as a
//!    [`PeerCertificate`]). The certificate is reloaded by [`Tls::reload`] (SIGHUP): new
//!    connections get the new one, open ones keep theirs, a bad new one keeps the old.
//!
//! Bodies are the handlers' business (they read them as they arrive, see the HTTP source), as
//! are tokens ([`crate::connector::auth`]). Every refusal counts in `sluice_http_refused_total{reason}`.

use std::future::Future;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

pub use crate::connector::auth::{PeerCertificate, refused};
use crate::error::{EngineError, Result};

/// Default [`EdgeLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default [`EdgeLimits::max_connections_per_address`].
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
/// Default [`EdgeLimits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`EdgeLimits::max_headers`].
pub const DEFAULT_MAX_HEADERS: usize = 64;
/// Default [`EdgeLimits::max_header_bytes`].
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 << 10;
/// Longest wait at shutdown for open connections to finish their requests (a client trickling
/// a body must not hold the drain up); the rest are dropped.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (out of file descriptors): lets connections close meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);


/// Limits applied to every connection before any handler runs.
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Connections one client address may hold at once (0: no cap); more are closed at once,
    /// so one host cannot take every slot.
    pub max_connections_per_address: usize,
    /// Time to read a request's headers (and a TLS handshake, and a keep-alive pause).
    pub header_read_timeout: Duration,
    /// Headers per request.
    pub max_headers: usize,
    /// Bytes of the request line and headers together.
    pub max_header_bytes: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_headers: DEFAULT_MAX_HEADERS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}


/// The files TLS is configured from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to (PEM); when set, every client must
    /// present one.
    pub client_ca: Option<PathBuf>,
}

/// The listener's TLS configuration, swapped whole on [`Tls::reload`].
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads and checks the files; any problem is a configuration error naming the file.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>> {
        let config = server_config(&files)?;
        Ok(Arc::new(Tls {
            files,
            config: RwLock::new(Arc::new(config)),
        }))
    }

    /// Reads the files again: new connections use the new certificate, open ones keep theirs.
    /// On error the old configuration stays and the error says why.
    pub fn reload(&self) -> Result<()> {
        let config = server_config(&self.files)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn tls_error(path: &Path, what: impl std::fmt::Display) -> EngineError {
    EngineError::config(
        format!("TLS: {}: {what}", path.display()),
        Some("give PEM files: --tls-cert a certificate chain, --tls-key its private key, --tls-client-ca CA certificates".to_string()),
    )
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error(path, e))?;
    if certs.is_empty() {
        return Err(tls_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// A rustls server configuration from the files: TLS 1.2+, ring, HTTP/1.1.
fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| tls_error(&files.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_error(&files.cert, e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c).map_err(|e| tls_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_error(&files.key, format!("the key does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The subject of the first certificate a client presented (already verified by rustls).
fn peer_subject(conn: &rustls::ServerConnection) -> Option<PeerCertificate> {
    let der = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    // Control characters would break the lines it is recorded on (ingest log, dedup window).
    let subject: String = cert
        .subject()
        .to_string()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    Some(PeerCertificate { subject })
}

/// Serves `app` on `listener` within `limits` (over TLS when `tls` is given) until `stop`
/// turns true; then stops accepting and waits for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: EdgeLimits,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    let graceful = GracefulShutdown::new();
    let addresses: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p,
            _ = stop.wait_for(|v| *v) => break,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|v| *v) => break,
        };
        let (stream, remote) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(per_address) = PerAddress::take(&addresses, remote.ip(), limits.max_connections_per_address) else {
            refused("per_address");
            drop(stream);
            continue;
        };
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let (app, limits) = (app.clone(), limits.clone());
        tokio::spawn(async move {
            let (_permit, _per_address) = (permit, per_address);
            let _ = stream.set_nodelay(true);
            let stream = WriteDeadline::new(stream, limits.header_read_timeout);
            match acceptor {
                None => connection(TokioIo::new(stream), app, remote, None, &limits, watcher).await,
                Some(acceptor) => match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let peer = peer_subject(s.get_ref().1);
                        connection(TokioIo::new(s), app, remote, peer, &limits, watcher).await;
                    }
                    Ok(Err(e)) => {
                        refused("tls_handshake");
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    }
                    Err(_) => refused("tls_handshake_timeout"),
                },
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            seconds = SHUTDOWN_DRAIN.as_secs(),
            "connections still open after the drain period were dropped"
        );
    }
    Ok(())
}

/// One connection counted against its client address, until dropped.
struct PerAddress(Arc<Mutex<HashMap<IpAddr, usize>>>, IpAddr);

impl PerAddress {
    /// Counts a connection from `ip`, or `None` when it already holds `cap` (0: no cap).
    fn take(map: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, cap: usize) -> Option<PerAddress> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if cap > 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(PerAddress(map.clone(), ip))
    }
}

impl Drop for PerAddress {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// A connection whose writes may not stall longer than a limit: a client that sends requests
/// but never reads the answers would otherwise hold its connection (and a slot) forever, since
/// no read timer runs while the server waits to write.
struct WriteDeadline<I> {
    inner: I,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    fn new(inner: I, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After a pending write: the error once it has been pending longer than the limit.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                refused("write_stalled");
                Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client stopped reading",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Pending => match self.check(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            done => {
                self.stalled = None;
                done
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.progress(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection's requests.
async fn connection<I>(
    io: TokioIo<I>,
    app: Router,
    remote: SocketAddr,
    peer: Option<PeerCertificate>,
    limits: &EdgeLimits,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        if let Some(p) = &peer {
            request.extensions_mut().insert(p.clone());
        }
        let mut app = app.clone();
        async move { tower_service::Service::call(&mut app, request).await }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes);
    if let Err(e) = watcher.watch(builder.serve_connection(io, service)).await {
        if e.is_timeout() {
            refused("header_timeout");
        } else if e.is_parse_too_large() {
            refused("header_too_large");
        } else if e.is_parse() {
            refused("bad_request");
        }
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}
