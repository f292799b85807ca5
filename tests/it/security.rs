//! Safe on a network (docs/specs/security.md), against the real binary over loopback: who may
//! send (tokens, client certificates) and how it is recorded, HTTPS with reload, and the limits
//! hostile clients meet while a normal producer keeps posting.
//!
//! Reproducers for #25.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};


use crate::delivery::{http_pipeline, line};
use crate::harness::{Server, dead_letters, log_entries, peak_rss, run_to_exit, wait_until};

/// A token line for the token file.
fn token_line(name: &str, token: &str, rest: &str) -> String {
    format!("{name} {} {rest}\n", sluice_engine::connector::auth::token_file_hash(token))
}

/// Records committed in `sink` from the sender `principal` (the entries' `counts.principals`).
fn committed_from(sink: &Path, principal: &str) -> u64 {
    log_entries(sink)
        .iter()
        .map(|e| e["counts"]["principals"][principal].as_u64().unwrap_or(0))
        .sum()
}

async fn post(http: &reqwest::Client, url: &str, token: Option<&str>, id: &str, body: String) -> (u16, String) {
    let mut r = http.post(url).header("x-request-id", id).body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    match r.send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, String, Option<String>) {
    let mut r = http.get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("GET");
    let auth = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    (r.status().as_u16(), r.text().await.unwrap_or_default(), auth)
}

fn hangup(server: &Server) {
    let _ = Command::new("kill").args(["-HUP", &server.pid().to_string()]).status();
}

#[test]
fn tokens_decide_who_may_send_and_the_sender_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let sink = dir.path().join("lake/out");
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        token_line("orders-team", "tok-orders-0123456789", "sources=ev")
            + &token_line("ops", "tok-admin-0123456789", "admin")
            + &token_line("elsewhere", "tok-other-0123456789", "sources=clicks"),
    )
    .unwrap();
    let server = Server::start_full(&[&sql], dir.path(), 0, &[], &["--auth-tokens", tokens.to_str().unwrap()]);
    let rt = crate::harness::runtime();
    let http = reqwest::Client::new();
    let url = server.url("/v1/sources/ev");
    let body = |ids: std::ops::Range<i64>| ids.map(line).collect::<Vec<_>>().join("\n");

    // No token, an unknown one: 401 with the challenge; a token of another source: 403.
    let (status, text) = rt.block_on(post(&http, &url, None, "a", body(0..10)));
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("\"error\""), "{text}");
    let (status, _) = rt.block_on(post(&http, &url, Some("not-a-token-at-all"), "a", body(0..10)));
    assert_eq!(status, 401);
    let (status, text) = rt.block_on(post(&http, &url, Some("tok-other-0123456789"), "a", body(0..10)));
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("elsewhere") && !text.contains("tok-other"), "{text}");
    // An unknown source: 401 for strangers, a bare 404 (no list of sources) for a known sender.
    let other = server.url("/v1/sources/nope");
    assert_eq!(rt.block_on(post(&http, &other, None, "x", body(0..1))).0, 401);
    let (status, text) = rt.block_on(post(&http, &other, Some("tok-orders-0123456789"), "x", body(0..1)));
    assert_eq!(status, 404);
    assert!(!text.contains("ev"), "the 404 names no source: {text}");

    // The right token: accepted, id 5 is malformed (a dead letter).
    let (status, text) = rt.block_on(post(&http, &url, Some("tok-orders-0123456789"), "b", body(0..100)));
    assert_eq!(status, 200, "{text}");

    // Management: admin only; probes open.
    let (status, _, challenge) = rt.block_on(get(&http, &server.url("/metrics"), None));
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer")));
    assert_eq!(rt.block_on(get(&http, &server.url("/v1/pipelines"), Some("tok-orders-0123456789"))).0, 403);
    let (status, metrics, _) = rt.block_on(get(&http, &server.url("/metrics"), Some("tok-admin-0123456789")));
    assert_eq!(status, 200);
    assert!(metrics.contains("sluice_http_refused_total{reason=\"unauthorized\"}"), "{metrics}");
    assert!(metrics.contains("sluice_http_refused_total{reason=\"forbidden\"}"), "{metrics}");
    assert_eq!(rt.block_on(get(&http, &server.url("/healthz"), None)).0, 200);
    assert_eq!(rt.block_on(get(&http, &server.url("/readyz"), None)).0, 200);

    // Who sent it: the commit entries and the dead letter name the token, never the token.
    wait_until(Duration::from_secs(30), "the request committed", || {
        (committed_from(&sink, "orders-team") == 100).then_some(())
    });

    // Revoke and add without a restart (SIGHUP); a bad file keeps the tokens loaded.
    std::fs::write(&tokens, token_line("new-team", "tok-new-0123456789ab", "sources=*")).unwrap();
    hangup(&server);
    wait_until(Duration::from_secs(10), "the revoked token refused", || {
        (rt.block_on(post(&http, &url, Some("tok-orders-0123456789"), "c", body(100..110))).0 == 401).then_some(())
    });
    assert_eq!(rt.block_on(post(&http, &url, Some("tok-new-0123456789ab"), "d", body(110..120))).0, 200);
    std::fs::write(&tokens, "this is not a token file\n").unwrap();
    hangup(&server);
    let log = server.stderr_path();
    wait_until(Duration::from_secs(10), "the bad file reported", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("token file not reloaded")
            .then_some(())
    });
    assert_eq!(rt.block_on(post(&http, &url, Some("tok-new-0123456789ab"), "e", body(120..130))).0, 200);
    server.stop();
    // (Read once stopped: a commit's files move into place just after its entry is written.)
    // Id 5 is malformed (and 102, if the post racing the reload got in before it).
    let dead = dead_letters(&sink);
    assert!(!dead.is_empty());
    assert!(dead.iter().all(|d| d["principal"] == "orders-team"), "{dead:?}");

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("principal=orders-team"), "the access log names the sender");
    for secret in ["tok-orders-0123456789", "tok-admin-0123456789", "tok-new-0123456789ab"] {
        assert!(!text.contains(secret), "a token in the log");
        for f in crate::harness::files_under(dir.path()) {
            let bytes = std::fs::read(dir.path().join(&f)).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "token {secret} written to {f}"
            );
        }
    }
}

#[test]
fn a_source_token_from_the_environment_guards_that_source() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms', 'auth.token' '${EV_TOKEN}'");
    let sink = dir.path().join("lake/out");
    let server = Server::start_with(&[&sql], dir.path(), 0, &[("EV_TOKEN", "env-token-abcdef0123")]);
    let rt = crate::harness::runtime();
    let http = reqwest::Client::new();
    let url = server.url("/v1/sources/ev");
    let body = (0..10).map(line).collect::<Vec<_>>().join("\n");
    assert_eq!(rt.block_on(post(&http, &url, None, "a", body.clone())).0, 401);
    assert_eq!(rt.block_on(post(&http, &url, Some("env-token-wrong"), "a", body.clone())).0, 401);
    assert_eq!(rt.block_on(post(&http, &url, Some("env-token-abcdef0123"), "a", body)).0, 200);
    wait_until(Duration::from_secs(30), "the request committed", || {
        (committed_from(&sink, "auth.token@ev") == 10).then_some(())
    });
    // No token file: the management endpoints stay open.
    assert_eq!(rt.block_on(get(&http, &server.url("/v1/pipelines"), None)).0, 200);
    server.stop();
}

#[test]
fn a_public_listener_needs_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let (code, out) = run_to_exit(&["run", sql.to_str().unwrap(), "--listen", "0.0.0.0:0"], dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a loopback address") && out.contains("--auth-tokens"), "{out}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client: PathBuf,
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// `sluice run`'s flags serving this server certificate (requiring client certificates
    /// from the CA with `mtls`).
    fn args(&self, mtls: bool) -> Vec<String> {
        let mut a = vec![
            "--tls-cert".to_string(),
            self.cert.display().to_string(),
            "--tls-key".to_string(),
            self.key.display().to_string(),
        ];
        if mtls {
            a.extend(["--tls-client-ca".to_string(), self.ca.display().to_string()]);
        }
        a
    }
}

fn pki(dir: &Path, tag: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("sluice test CA {tag}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let mut sp = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    sp.distinguished_name.push(rcgen::DnType::CommonName, format!("server {tag}"));
    let server = sp.signed_by(&server_key, &issuer).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut cp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name.push(rcgen::DnType::CommonName, "producer-1");
    let client = cp.signed_by(&client_key, &issuer).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.join(format!("{tag}-{name}"));
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        cert: write("server.pem", server.pem()),
        key: write("server.key", server_key.serialize_pem()),
        client: write("client.pem", client.pem() + &client_key.serialize_pem()),
        ca_pem: ca_cert.pem(),
        issuer,
    }
}

fn tls_client(ca_pem: &str, identity: Option<&Path>) -> reqwest::Client {
    crate::harness::install_crypto();
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .tls_info(true)
        .timeout(Duration::from_secs(20));
    if let Some(p) = identity {
        b = b.identity(reqwest::Identity::from_pem(&std::fs::read(p).unwrap()).unwrap());
    }
    b.build().unwrap()
}

/// The certificate the server presented on a fresh connection.
fn served_certificate(rt: &tokio::runtime::Runtime, ca_pem: &str, url: &str) -> Vec<u8> {
    let client = tls_client(ca_pem, None);
    rt.block_on(async {
        let r = client.get(url).send().await.expect("HTTPS GET");
        r.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
            .expect("peer certificate")
    })
}

#[test]
fn https_serves_reloads_its_certificate_and_refuses_plain_http_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let sink = dir.path().join("lake/out");
    let first = pki(dir.path(), "one");
    let cert = dir.path().join("live.pem");
    let key = dir.path().join("live.key");
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let server = Server::start_full(
        &[&sql],
        dir.path(),
        0,
        &[],
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let rt = crate::harness::runtime();
    let client = tls_client(&first.ca_pem, None);
    let body = (0..50).map(line).collect::<Vec<_>>().join("\n");
    let (status, text) = rt.block_on(post(&client, &server.url("/v1/sources/ev"), None, "a", body));
    assert_eq!(status, 200, "{text}");
    wait_until(Duration::from_secs(30), "the HTTPS request committed", || {
        (crate::harness::committed_output(&sink) > 0).then_some(())
    });

    // Plain HTTP to the TLS port: a TLS alert (or a close), never a hang.
    let addr = server.base.trim_start_matches("https://").to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let started = Instant::now();
    let _ = s.read_to_end(&mut got);
    assert!(started.elapsed() < Duration::from_secs(9), "the server hung on plain HTTP");
    assert!(got.is_empty() || got[0] == 0x15, "expected a TLS alert record, got {got:?}");

    // A client that does not trust the CA is refused, nothing written.
    let other = pki(dir.path(), "stranger");
    let (status, _) = rt.block_on(post(
        &tls_client(&other.ca_pem, None),
        &server.url("/v1/sources/ev"),
        None,
        "z",
        line(1_000_000),
    ));
    assert_eq!(status, 0, "a certificate from an unknown CA must fail the handshake");

    // Reload: a new certificate (same CA) on SIGHUP; a broken one keeps the current.
    let url = server.url("/healthz");
    let before = served_certificate(&rt, &first.ca_pem, &url);
    let second = pki_with_ca(dir.path(), &first);
    std::fs::copy(&second, &cert).unwrap();
    hangup(&server);
    let after = wait_until(Duration::from_secs(10), "the new certificate served", || {
        let now = served_certificate(&rt, &first.ca_pem, &url);
        (now != before).then_some(now)
    });
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n").unwrap();
    hangup(&server);
    let log = server.stderr_path();
    wait_until(Duration::from_secs(10), "the bad certificate reported", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("TLS certificate not reloaded")
            .then_some(())
    });
    assert_eq!(served_certificate(&rt, &first.ca_pem, &url), after);
    server.stop();
}

/// A renewed server certificate from `pki`'s CA for the same key (only the certificate
/// changes on a reload here), with a new name.
fn pki_with_ca(dir: &Path, pki: &Pki) -> PathBuf {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&pki.key).unwrap()).unwrap();
    let mut sp = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    sp.distinguished_name.push(rcgen::DnType::CommonName, "server renewed");
    let cert = sp.signed_by(&key, &pki.issuer).unwrap();
    let p = dir.join("renewed.pem");
    std::fs::write(&p, cert.pem()).unwrap();
    p
}

#[test]
fn client_certificates_are_required_and_name_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let sink = dir.path().join("lake/out");
    let p = pki(dir.path(), "m");
    let args = p.args(true);
    let server = Server::start_full(&[&sql], dir.path(), 0, &[], &args.iter().map(String::as_str).collect::<Vec<_>>());
    let rt = crate::harness::runtime();
    let url = server.url("/v1/sources/ev");
    let body = (0..20).map(line).collect::<Vec<_>>().join("\n");
    let (status, _) = rt.block_on(post(&tls_client(&p.ca_pem, None), &url, None, "a", body.clone()));
    assert_eq!(status, 0, "no client certificate: the handshake fails");
    let (status, text) = rt.block_on(post(&tls_client(&p.ca_pem, Some(&p.client)), &url, None, "b", body));
    assert_eq!(status, 200, "{text}");
    wait_until(Duration::from_secs(30), "the request committed", || {
        (committed_from(&sink, "CN=producer-1") == 20).then_some(())
    });
    server.stop();

    // With tokens configured, a certificate alone passes no token rule (review of #25).
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, token_line("producers", "tok-mtls-0123456789", "sources=ev")).unwrap();
    let mut args = p.args(true);
    args.extend(["--auth-tokens".to_string(), tokens.display().to_string()]);
    let server = Server::start_full(&[&sql], dir.path(), 0, &[], &args.iter().map(String::as_str).collect::<Vec<_>>());
    let url = server.url("/v1/sources/ev");
    let client = tls_client(&p.ca_pem, Some(&p.client));
    let body = (100..110).map(line).collect::<Vec<_>>().join("\n");
    assert_eq!(rt.block_on(post(&client, &url, None, "c", body.clone())).0, 401);
    assert_eq!(rt.block_on(post(&client, &url, Some("tok-mtls-0123456789"), "c", body)).0, 200);
    server.stop();
}

/// A normal producer: posts small requests in a loop until stopped, counting answers.
struct Producer {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    other: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Producer {
    fn start(rt: &tokio::runtime::Runtime, url: String, first_id: i64) -> Producer {
        let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let other = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, o, bad) = (stop.clone(), ok.clone(), other.clone());
        rt.spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
            let mut next = first_id;
            while !s.load(Ordering::Relaxed) {
                let body = (next..next + 20).map(line).collect::<Vec<_>>().join("\n");
                let (status, text) = post(&http, &url, None, &format!("p{next}"), body).await;
                if status == 200 {
                    o.fetch_add(1, Ordering::Relaxed);
                    next += 20;
                } else {
                    bad.lock().unwrap().push(format!("{status}: {text}"));
                }
            }
        });
        Producer { stop, ok, other }
    }

    /// Waits until `n` more requests were acknowledged.
    fn advance(&self, n: usize, what: &str) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        wait_until(Duration::from_secs(30), what, || {
            (self.ok.load(Ordering::Relaxed) >= target).then_some(())
        });
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.other.lock().unwrap().clone()
    }
}

fn metric(rt: &tokio::runtime::Runtime, server: &Server, reason: &str) -> u64 {
    let (_, text, _) = rt.block_on(get(&reqwest::Client::new(), &server.url("/metrics"), None));
    let key = format!("sluice_http_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn hostile_clients_are_refused_while_a_normal_producer_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let server = Server::start_full(
        &[&sql],
        dir.path(),
        0,
        &[],
        &[
            "--header-read-timeout",
            "1s",
            "--body-read-timeout",
            "1s",
            "--max-connections",
            "300",
            "--max-buffer-bytes",
            "67108864",
        ],
    );
    let rt = crate::harness::runtime();
    let url = server.url("/v1/sources/ev");
    let addr = server.base.trim_start_matches("http://").to_string();
    let base_rss = peak_rss(server.pid()).unwrap_or(0);
    let producer = Producer::start(&rt, url.clone(), 0);
    producer.advance(5, "the producer's first requests");

    // 1. Stalled connections: headers never finished, and bodies declared but never sent.
    //    The server closes them after the timeouts; the producer is served meanwhile.
    let mut stalled = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            s.write_all(b"POST /v1/sources/ev HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n").unwrap();
        } else {
            s.write_all(
                b"POST /v1/sources/ev HTTP/1.1\r\nHost: x\r\nContent-Length: 16000000\r\n\r\n{\"id\": 1",
            )
            .unwrap();
        }
        stalled.push(s);
    }
    producer.advance(10, "the producer while 200 connections stall");
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(metric(&rt, &server, "header_timeout") >= 100);
    assert!(metric(&rt, &server, "body_timeout") >= 100);

    // 1b. A body that comes fast, then trickles (1 byte every 300 ms): cut once one window of
    //     the read timeout is too slow (408), not after its average decays.
    let trickler = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"POST /v1/sources/ev HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n").unwrap();
            s.write_all(&[b' '; 50_000]).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = vec![0u8; 4096];
            for _ in 0..100 {
                // The attacker's pacing, not a synchronisation: one byte, then wait for an answer.
                if s.write_all(b" ").is_err() {
                    break;
                }
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
            String::new()
        })
    };
    let answer = trickler.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(metric(&rt, &server, "body_too_slow") >= 1);

    // 2. Many bad lines in one body: refused whole (400), nothing of it logged.
    let mut garbage = line(1_000_000_000);
    garbage.push('\n');
    garbage.push_str(&"x\n".repeat(2_000_000));
    let http = reqwest::Client::new();
    let (status, text) = rt.block_on(post(&http, &url, None, "garbage", garbage));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("bad records") && text.len() < 2000, "{text}");

    // 3. A gzip bomb: 413 once the limit (16 MB) was inflated.
    let bomb = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![b'\n'; 512 << 20]).unwrap();
        e.finish().unwrap()
    };
    let (status, text) = rt.block_on(async {
        let r = http
            .post(&url)
            .header("content-encoding", "gzip")
            .body(bomb)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    });
    assert_eq!(status, 413, "{text}");
    // A well-formed gzip body is accepted like any other.
    let small = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all((2_000_000_000..2_000_000_010).map(line).collect::<Vec<_>>().join("\n").as_bytes())
            .unwrap();
        e.finish().unwrap()
    };
    let status = rt.block_on(async {
        http.post(&url)
            .header("content-encoding", "gzip")
            .body(small)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(status, 200);

    // 4. Headers: too many, too large: 431.
    for raw in [
        format!("POST /v1/sources/ev HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-A: b\r\n".repeat(200)),
        format!("POST /v1/sources/ev HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 << 10)),
    ] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(raw.as_bytes());
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    }
    // 5. A nested record is a dead letter, not a crash.
    let deep = format!("{{\"id\": 77, \"v\": {}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(rt.block_on(post(&http, &url, None, "deep", deep)).0, 200);

    producer.advance(10, "the producer after the hostile requests");
    let refused = producer.finish();
    assert!(refused.is_empty(), "the normal producer was refused: {refused:?}");
    let peak = peak_rss(server.pid()).unwrap_or(0);
    // Budget (64 MB buffer, bodies within it) plus a margin for the runtime and decoders.
    assert!(
        peak < base_rss + (64 << 20) + (256 << 20),
        "peak memory {peak} (start {base_rss})"
    );
    server.stop();
    let _ = dead_letters;
}

/// True when `hay` holds `needle`.
fn holds(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// One secret in every secret-bearing input, a run through success, failure, retry and dead
/// letters at debug level, then everything Sluice wrote or answered searched for each.
#[cfg(all(feature = "s3", feature = "fault-injection"))]
#[test]
fn secrets_never_reach_logs_files_or_answers() {
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};

    const EV_TOKEN: &str = "sec-ev-token-5b1f0e77c2";
    const ADMIN: &str = "sec-admin-token-93ab7d";
    const AWS_ENV: &str = "sec-aws-env-secret-11d0";
    const AWS_SESSION: &str = "sec-aws-session-3c9e";
    const KAFKA_PW: &str = "sec-kafka-pw-77e1";
    let secrets = [EV_TOKEN, ADMIN, crate::moto::SECRET, AWS_ENV, AWS_SESSION, KAFKA_PW];

    let dir = tempfile::tempdir().unwrap();
    let moto = crate::moto::Moto::start(dir.path(), "lake");
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, v BIGINT, ts TIMESTAMP NOT NULL)
             STORED AS HTTP LOCATION '/v1/sources/ev'
             OPTIONS ('batch.interval' '100ms', 'auth.token' '${{EV_TOKEN}}', 'event_time' 'ts', 'watermark.delay' '1h');
             CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 's3://lake/sec/'
             OPTIONS ('s3.endpoint' '{}', 's3.allow_http' 'true', 's3.region' 'us-east-1',
                      's3.access_key_id' '{}', 's3.secret_access_key' '${{S3_SECRET}}');
             INSERT INTO out SELECT id, v, ts FROM ev;",
            moto.endpoint(),
            crate::moto::KEY_ID
        ),
    )
    .unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, token_line("ops", ADMIN, "admin")).unwrap();
    let env = [
        ("EV_TOKEN", EV_TOKEN),
        ("S3_SECRET", crate::moto::SECRET),
        ("AWS_SECRET_ACCESS_KEY", AWS_ENV),
        ("AWS_SESSION_TOKEN", AWS_SESSION),
        ("KAFKA_PASSWORD", KAFKA_PW),
        ("SLUICE_FAIL_AT", "after_state"),
        ("RUST_LOG", "debug"),
    ];
    let mut answers = String::new();
    let server = Server::start_full(&[&sql], dir.path(), 0, &env, &["--auth-tokens", tokens.to_str().unwrap()]);
    let rt = crate::harness::runtime();
    let http = reqwest::Client::new();
    let url = server.url("/v1/sources/ev");
    let ev = |id: i64| format!("{{\"id\": {id}, \"v\": {id}, \"ts\": {}}}", 1_795_132_800_000i64 + id);
    for (token, id, body) in [
        (Some(EV_TOKEN), "r1", (0..20).map(ev).collect::<Vec<_>>().join("\n")),
        (Some(EV_TOKEN), "r2", format!("{}\n{{\"id\": \"bad\"}}", ev(20))),
        (Some(EV_TOKEN), "r2", format!("{}\n{{\"id\": \"bad\"}}", ev(20))),
        (Some("sec-wrong-token"), "r3", ev(30)),
        (None, "r4", ev(31)),
        (Some(ADMIN), "r5", ev(32)),
        (Some(EV_TOKEN), "r6", "not json at all".to_string()),
    ] {
        let (status, text) = rt.block_on(post(&http, &url, token, id, body));
        answers.push_str(&format!("{status} {text}\n"));
    }
    let store = moto.client("lake");
    wait_until(Duration::from_secs(60), "the good rows committed", || {
        let n: u64 = rt.block_on(async {
            let t = crate::moto::S3Table {
                store: store.clone(),
                root: "sec".into(),
            };
            t.committed_output().await
        });
        (n >= 21).then_some(())
    });
    for path in ["/metrics", "/v1/pipelines", "/readyz"] {
        answers.push_str(&rt.block_on(get(&http, &server.url(path), Some(ADMIN))).1);
        answers.push_str(&rt.block_on(get(&http, &server.url(path), Some(EV_TOKEN))).1);
    }
    let log = server.stderr_path();
    server.stop();

    // `validate` of a Kafka source with a SASL password, and of a LOCATION holding one.
    let kafka = dir.path().join("k.sql");
    std::fs::write(
        &kafka,
        "CREATE UNBOUNDED EXTERNAL TABLE k (id BIGINT) STORED AS KAFKA
         LOCATION 'kafka://127.0.0.1:9/t'
         OPTIONS ('group.id' 'g', 'kafka.security.protocol' 'SASL_PLAINTEXT', 'kafka.sasl.mechanism' 'PLAIN',
                  'kafka.sasl.username' 'u', 'kafka.sasl.password' '${KAFKA_PASSWORD}');
         CREATE EXTERNAL TABLE kout STORED AS PARQUET LOCATION '/tmp/sluice-never/kout/';
         INSERT INTO kout SELECT id FROM k;",
    )
    .unwrap();
    let userinfo = dir.path().join("u.sql");
    std::fs::write(
        &userinfo,
        "CREATE UNBOUNDED EXTERNAL TABLE k (id BIGINT) STORED AS KAFKA
         LOCATION 'kafka://u:${KAFKA_PASSWORD}@127.0.0.1:9/t' OPTIONS ('group.id' 'g');",
    )
    .unwrap();
    let mut outputs = Vec::new();
    for f in [&kafka, &userinfo] {
        let out = Command::new(crate::harness::bin())
            .args(["validate", f.to_str().unwrap()])
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .output()
            .unwrap();
        outputs.push(out.stdout);
        outputs.push(out.stderr);
    }
    assert!(
        String::from_utf8_lossy(&outputs[3]).contains("must not hold credentials"),
        "{}",
        String::from_utf8_lossy(&outputs[3])
    );

    // Everything written: the log, the working directory (state, sink-side files), the bucket.
    let log_text = std::fs::read(&log).unwrap();
    assert!(holds(&log_text, "injected"), "the run went through an injected failure and a retry");
    let mut written: Vec<(String, Vec<u8>)> = vec![("answers".into(), answers.into_bytes())];
    written.extend(outputs.into_iter().enumerate().map(|(i, o)| (format!("validate output {i}"), o)));
    for f in crate::harness::files_under(dir.path()) {
        if f.ends_with(".sql") || f == "tokens" || f.starts_with("moto-") {
            continue; // the inputs themselves, and the test's own S3 server's log
        }
        written.push((f.clone(), std::fs::read(dir.path().join(&f)).unwrap_or_default()));
    }
    let objects: Vec<object_store::ObjectMeta> = rt.block_on(store.list(None).try_collect()).unwrap();
    assert!(objects.len() > 3, "the bucket holds the table");
    for m in objects {
        let bytes = rt.block_on(async { store.get(&m.location).await.unwrap().bytes().await.unwrap() });
        written.push((format!("s3://lake/{}", m.location), bytes.to_vec()));
    }
    for (what, bytes) in &written {
        for s in secrets {
            assert!(!holds(bytes, s), "secret {s} found in {what}");
        }
    }
}

/// The p99 of `samples` (milliseconds).
fn p99(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 * 0.99) as usize).min(samples.len() - 1)]
}

/// Issue #25's hostile run: 1,000 stalled connections (re-opened as the server closes them),
/// gzip bombs and 100 bodies of garbage lines at once, while one producer posts 200,000
/// events. Asserts exactly-once for every acknowledged event and the memory bound; prints the
/// producer's ack latency unloaded and under attack (BENCHMARKS.md, "hostile load").
#[test]
fn hostile_load_keeps_every_acknowledged_event_exactly_once() {
    const BUDGET: u64 = 128 << 20;
    const PER: i64 = 200;
    const REQUESTS: i64 = 1000;
    const CALM: i64 = 250;
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '200ms'");
    let sink = dir.path().join("lake/out");
    // The issue's scenario: 1,000 stalled connections against the global limit, so the cap per
    // address (which would close most of them at once) is off here.
    let server = Server::start_full(
        &[&sql],
        dir.path(),
        0,
        &[],
        &["--max-buffer-bytes", &BUDGET.to_string(), "--max-connections-per-address", "0"],
    );
    let rt = crate::harness::runtime();
    let url = server.url("/v1/sources/ev");
    let addr = server.base.trim_start_matches("http://").to_string();
    let stop = Arc::new(AtomicBool::new(false));

    // The producer: requests of 200 events, each retried (same id) until acknowledged; the
    // latency of a request is from its first try to its 200.
    let producer = {
        let url = url.clone();
        rt.spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
            let (mut calm, mut loaded, mut retries) = (Vec::new(), Vec::new(), 0usize);
            for r in 0..REQUESTS {
                let body = (r * PER..(r + 1) * PER).map(line).collect::<Vec<_>>().join("\n");
                let started = Instant::now();
                loop {
                    let (status, _) = post(&http, &url, None, &format!("load-{r}"), body.clone()).await;
                    if status == 200 {
                        break;
                    }
                    retries += 1;
                    // Client back-off before a retry (what a producer does on 429/503).
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                if r < CALM { calm.push(ms) } else { loaded.push(ms) }
            }
            (calm, loaded, retries)
        })
    };
    wait_until(Duration::from_secs(120), "the calm phase", || {
        (crate::harness::committed_output(&sink) > (CALM * PER / 2) as u64).then_some(())
    });

    // 1,000 stalled connections, re-opened as the server closes them.
    let stalls = Arc::new(AtomicUsize::new(0));
    let staller = {
        let (stop, addr, stalls) = (stop.clone(), addr.clone(), stalls.clone());
        std::thread::spawn(move || {
            let mut open: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Keep the ones the server has not closed (nothing to read yet).
                open.retain(|s| {
                    let mut b = [0u8; 1];
                    s.set_nonblocking(true).ok();
                    matches!((&*s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while open.len() < 1000 && !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(&addr) else { break };
                    let _ = s.write_all(b"POST /v1/sources/ev HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n");
                    stalls.fetch_add(1, Ordering::Relaxed);
                    open.push(s);
                }
                // Pacing of the attacker's loop (not a synchronisation).
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // 100 bodies of garbage lines at once, and gzip bombs.
    let garbage = Arc::new({
        let mut g = line(5_000_000_000);
        g.push('\n');
        g.push_str(&"x\n".repeat(2_000_000));
        g
    });
    let bomb = Arc::new({
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![b'\n'; 256 << 20]).unwrap();
        e.finish().unwrap()
    });
    let attacks: Vec<_> = (0..100)
        .map(|_| {
            let (url, garbage) = (url.clone(), garbage.clone());
            rt.spawn(async move {
                let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
                let r = http.post(&url).body(garbage.as_str().to_string()).send().await;
                r.map(|r| r.status().as_u16()).unwrap_or(0)
            })
        })
        .collect();
    let statuses: Vec<u16> = attacks.into_iter().map(|a| rt.block_on(a).unwrap()).collect();
    // Then gzip bombs, one after another (within the budget, each is inflated to the limit).
    let bombs: Vec<u16> = (0..4)
        .map(|_| {
            rt.block_on(async {
                let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
                let r = http.post(&url).header("content-encoding", "gzip").body(bomb.to_vec()).send().await;
                r.map(|r| r.status().as_u16()).unwrap_or(0)
            })
        })
        .collect();
    let (calm, loaded, retries) = {
        let (mut calm, mut loaded, retries) = rt.block_on(producer).unwrap();
        (p99(&mut calm), p99(&mut loaded), retries)
    };
    stop.store(true, Ordering::Relaxed);
    staller.join().unwrap();
    let peak = peak_rss(server.pid()).unwrap_or(0);
    assert!(
        statuses.iter().all(|s| matches!(s, 400 | 413 | 429 | 0)),
        "hostile requests must be refused: {statuses:?}"
    );
    assert!(statuses.iter().any(|s| *s == 400), "{statuses:?}");
    assert!(bombs.iter().all(|s| matches!(s, 413 | 429)) && bombs.contains(&413), "{bombs:?}");
    let sent: std::collections::HashSet<i64> = (0..REQUESTS * PER).collect();
    wait_until(Duration::from_secs(120), "every acknowledged event committed", || {
        let want = sent.iter().filter(|i| crate::delivery::passes(**i) && !crate::delivery::malformed(**i)).count();
        (crate::harness::committed_output(&sink) >= want as u64).then_some(())
    });
    server.stop();
    rt.block_on(crate::delivery::check(&sink, &sent, &sent));
    eprintln!(
        "hostile load: {} events acknowledged, ack p99 {calm:.1} ms unloaded, {loaded:.1} ms under attack ({:.1}x), {retries} retries, {} stalled connections opened, server VmHWM {} MiB (budgets 2 x {} MiB)",
        REQUESTS * PER,
        loaded / calm,
        stalls.load(Ordering::Relaxed),
        peak >> 20,
        BUDGET >> 20
    );
    // The server's budget is --max-buffer-bytes twice: once for the pipelines' buffers, once
    // for request bodies (and their dead letters) being read and decoded.
    assert!(
        peak < 2 * BUDGET + (128 << 20),
        "peak memory {} MiB over the budgets (2 x {} MiB) + 128 MiB",
        peak >> 20,
        BUDGET >> 20
    );
}

/// Past `--max-connections`, a new connection waits to be accepted (it is not refused, and the
/// server does not fail); it is served once a stalled one is closed at the header timeout.
#[test]
fn connections_past_the_limit_wait_and_are_then_served() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let server = Server::start_full(
        &[&sql],
        dir.path(),
        0,
        &[],
        &["--max-connections", "3", "--header-read-timeout", "1s"],
    );
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stalled: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"POST /v1/sources/ev HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let rt = crate::harness::runtime();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let (status, text) = rt.block_on(post(&http, &server.url("/v1/sources/ev"), None, "after", line(1)));
    assert_eq!(status, 200, "{text}");
    // It was served only because the stalled ones were closed.
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let (_, metrics, _) = rt.block_on(get(&http, &server.url("/metrics"), None));
    let timeouts = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_http_refused_total{reason=\"header_timeout\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(timeouts >= 3.0, "{metrics}");
    server.stop();
}

/// One address holds at most `--max-connections-per-address` connections: the next one is
/// closed at once (not left waiting), and counted.
#[test]
fn one_address_cannot_hold_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let server = Server::start_full(&[&sql], dir.path(), 0, &[], &["--max-connections-per-address", "2"]);
    let addr = server.base.trim_start_matches("http://").to_string();
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"POST /v1/sources/ev HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    // The third connection from 127.0.0.1 is closed long before the 10 s header timeout.
    wait_until(Duration::from_secs(5), "a third connection closed at once", || {
        let mut s = TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = [0u8; 64];
        let closed = match s.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        closed.then_some(())
    });
    drop(held);
    let rt = crate::harness::runtime();
    wait_until(Duration::from_secs(10), "a connection accepted again", || {
        (metric(&rt, &server, "per_address") >= 1).then_some(())
    });
    server.stop();
}

/// A client that sends requests and never reads the answers cannot keep its connection: once a
/// write to it has stalled for the header timeout, the connection is closed and its slot freed.
#[test]
fn a_client_that_never_reads_loses_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let server = Server::start_full(
        &[&sql],
        dir.path(),
        0,
        &[],
        &["--max-connections", "1", "--header-read-timeout", "1s"],
    );
    let addr = server.base.trim_start_matches("http://").to_string();
    let greedy = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            // Pipelined requests whose answers fill both socket buffers, never read.
            let one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
            for _ in 0..2000 {
                if s.write_all(&one).is_err() {
                    return;
                }
            }
        })
    };
    let rt = crate::harness::runtime();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let (status, text) = rt.block_on(post(&http, &server.url("/v1/sources/ev"), None, "after", line(1)));
    assert_eq!(status, 200, "{text}");
    greedy.join().unwrap();
    assert!(metric(&rt, &server, "write_stalled") >= 1);
    server.stop();
}

/// Seeded fuzz of the request head against a server with tokens: random methods, paths,
/// `Authorization`, `Content-Encoding`, `Content-Length`, `X-Request-Id` and header bytes. Every
/// request is answered with a known status or a closed connection, and the server keeps serving.
#[test]
fn fuzzed_request_heads_are_answered_and_never_break_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '100ms'");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, token_line("fz", "tok-fuzz-0123456789", "sources=ev admin")).unwrap();
    let server = Server::start_full(
        &[&sql],
        dir.path(),
        0,
        &[],
        &["--auth-tokens", tokens.to_str().unwrap(), "--header-read-timeout", "1s", "--body-read-timeout", "1s"],
    );
    let addr = server.base.trim_start_matches("http://").to_string();
    let rounds: u64 = std::env::var("SLUICE_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(1000, |n: u64| n / 5);
    let mut rng = crate::harness::Rng(0x5ec0_1d);
    let pick = |rng: &mut crate::harness::Rng, v: &[&str]| v[rng.range(0, v.len() as u64) as usize].to_string();
    let known = [200, 400, 401, 403, 404, 405, 408, 409, 411, 413, 415, 429, 431, 501, 503, 505];
    for i in 0..rounds {
        let method = pick(&mut rng, &["POST", "GET", "PUT", "POST", "OPTIONS", "P\u{7f}ST", ""]);
        let path = pick(
            &mut rng,
            &["/v1/sources/ev", "/v1/sources/", "/v1/sources/%2e%2e%2fev", "/v1/sources/ev/../ev", "/metrics", "/v1/sources/e\u{0}v", "*"],
        );
        let auth = pick(
            &mut rng,
            &["", "Bearer tok-fuzz-0123456789", "Bearer", "bearer  tok-fuzz-0123456789 ", "Basic eDp5", "Bearer \u{ff}\u{fe}", "Bearer tok-fuzz-012345678"],
        );
        let encoding = pick(&mut rng, &["", "gzip", "x-gzip", "br", "gzip, gzip", "identity"]);
        let body: Vec<u8> = match rng.range(0, 4) {
            0 => line(i as i64).into_bytes(),
            1 => (0..rng.range(0, 200)).map(|_| rng.range(0, 256) as u8).collect(),
            2 => vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3],
            _ => Vec::new(),
        };
        let length = match rng.range(0, 5) {
            0 => "18446744073709551616".to_string(),
            1 => "-1".to_string(),
            2 => format!("{}", body.len() + 5),
            _ => body.len().to_string(),
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n").into_bytes();
        for (name, value) in [("Authorization", &auth), ("Content-Encoding", &encoding)] {
            if !value.is_empty() {
                head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
        }
        if rng.range(0, 3) == 0 {
            head.extend_from_slice(b"X-Request-Id: ");
            head.extend((0..rng.range(0, 40)).map(|_| rng.range(1, 256) as u8).filter(|b| *b != b'\n'));
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(&body);
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&head);
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        if n > 0 {
            let text = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            assert!(known.contains(&code), "request {i}: {text}");
        }
    }
    let rt = crate::harness::runtime();
    assert_eq!(rt.block_on(get(&reqwest::Client::new(), &server.url("/readyz"), None)).0, 200);
    server.stop();
}
