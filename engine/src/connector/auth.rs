//! Who may send: bearer tokens, checked on every ingest and management request.
//!
//! Tokens come from a token file (`sluice run --auth-tokens FILE`), one per line:
//!
//! ```text
//! # name   hash of the token                      what it may do
//! orders   sha256:5e884898da28047151d0e56f8dc62927...  sources=orders,clicks
//! ops      sha256:9f86d081884c7d659a2feaa0c55ad015...  admin
//! ```
//!
//! `sources=` lists the HTTP sources the token may post to (`*` for all); `admin` opens the
//! management endpoints. Only the SHA-256 of a token is stored; a request's
//! `Authorization: Bearer <token>` is hashed and compared in constant time with every entry.
//! A source may also carry its own token (`OPTIONS ('auth.token' '${TOKEN}')`), checked by the
//! source with [`token_matches`]. The **name** of the token (never the token) is the request's
//! [`Principal`]: it is recorded in the commit entries, dead letters and the access log.
//!
//! Invariants:
//! 1. With no token configured anywhere, every request is allowed, as the principal-less
//!    anonymous sender.
//! 2. With a token file, management endpoints (everything but `/healthz`, `/readyz`) need an
//!    `admin` token; an ingest needs a token allowed on that source (or the source's own).
//! 3. [`Auth::reload`] swaps the file's tokens whole; a bad file keeps the old ones. Requests
//!    already admitted finish as the principal they were admitted as.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{EngineError, Result};

/// Counts a refused request or connection in `sluice_http_refused_total{reason}`.
pub fn refused(reason: &'static str) {
    metrics::counter!("sluice_http_refused_total", "reason" => reason).increment(1);
}

/// The subject of a verified client certificate (mTLS), as a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The certificate's subject, e.g. `CN=producer-1, O=Acme`.
    pub subject: String,
}

/// Longest token file line accepted.
const MAX_LINE: usize = 4096;

/// The name a request is recorded under: a token's name or a client certificate's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

/// The SHA-256 of a token.
pub type TokenHash = [u8; 32];

/// The SHA-256 of `token`.
pub fn hash_token(token: &str) -> TokenHash {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(token.as_bytes()));
    out
}

/// `sha256:<hex>` of a token, as the token file wants it.
pub fn token_file_hash(token: &str) -> String {
    let hex: String = hash_token(token).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// True when `presented` hashes to `hash` (compared in constant time).
pub fn token_matches(presented: &TokenHash, hash: &TokenHash) -> bool {
    presented.ct_eq(hash).into()
}

/// The bearer token of a request, hashed; `None` without one.
pub fn bearer(headers: &HeaderMap) -> Option<TokenHash> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| hash_token(token.trim()))
}

/// Where a token may post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sources {
    /// Every source (`sources=*`).
    All,
    /// These sources (none for an admin-only token).
    Only(BTreeSet<String>),
}

/// One line of the token file.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// The principal the token's requests are recorded under.
    pub name: String,
    hash: TokenHash,
    /// The sources it may post to.
    pub sources: Sources,
    /// Whether it opens the management endpoints.
    pub admin: bool,
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("sources", &self.sources)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl TokenEntry {
    /// Whether the token may post to `source`.
    pub fn allows(&self, source: &str) -> bool {
        match &self.sources {
            Sources::All => true,
            Sources::Only(s) => s.contains(source),
        }
    }
}

fn file_error(file: &str, line: usize, message: impl Into<String>) -> EngineError {
    EngineError::config(
        format!("{file}:{line}: {}", message.into()),
        Some("a token line is `NAME sha256:<64 hex digits> [sources=a,b|*] [admin]`; make the hash with `sluice token hash`".to_string()),
    )
}

/// Parses a token file's text (`file` names it in errors, with the line).
pub fn parse_tokens(text: &str, file: &str) -> Result<Vec<TokenEntry>> {
    let mut out: Vec<TokenEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.len() > MAX_LINE {
            return Err(file_error(file, n, format!("line longer than {MAX_LINE} bytes")));
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or_default();
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            || name.len() > 128
        {
            // Words of a bad line are not echoed: a misplaced token must not reach a log.
            return Err(file_error(
                file,
                n,
                "the first word is not a token name: use up to 128 letters, digits, '-', '_', '.' ('@' is kept for sources' own tokens)",
            ));
        }
        let Some(hex) = words.next().and_then(|h| h.strip_prefix("sha256:")) else {
            return Err(file_error(file, n, "the second word must be sha256:<hex of the token>"));
        };
        let hash = parse_hex(hex).ok_or_else(|| file_error(file, n, "the hash is not 64 hex digits"))?;
        let (mut sources, mut admin) = (Sources::Only(BTreeSet::new()), false);
        for (k, w) in words.enumerate() {
            if w == "admin" {
                admin = true;
            } else if let Some(list) = w.strip_prefix("sources=") {
                sources = if list == "*" {
                    Sources::All
                } else {
                    Sources::Only(list.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
                };
            } else {
                return Err(file_error(
                    file,
                    n,
                    format!("word {} is neither 'sources=...' nor 'admin'", k + 3),
                ));
            }
        }
        if out.iter().any(|e| e.name == name) {
            return Err(file_error(file, n, format!("token name '{name}' appears twice")));
        }
        if out.iter().any(|e| e.hash == hash) {
            return Err(file_error(file, n, "the same token appears twice"));
        }
        out.push(TokenEntry {
            name: name.to_string(),
            hash,
            sources,
            admin,
        });
    }
    Ok(out)
}

fn parse_hex(hex: &str) -> Option<TokenHash> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The server's tokens (from the token file), shared by the ingest and management routes.
#[derive(Debug, Default)]
pub struct Auth {
    path: Option<PathBuf>,
    tokens: RwLock<Arc<Vec<TokenEntry>>>,
}

/// What a token check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, as this principal (`None`: no token configured, anonymous).
    Allowed(Option<Principal>),
    /// No token, or one nobody knows: 401.
    Unauthorized,
    /// A known token not allowed here: 403 (the token's name).
    Forbidden(String),
}

impl Auth {
    /// No token file: management endpoints open.
    pub fn none() -> Arc<Auth> {
        Arc::new(Auth::default())
    }

    /// Tokens from a file.
    pub fn from_file(path: &Path) -> Result<Arc<Auth>> {
        let auth = Auth {
            path: Some(path.to_path_buf()),
            tokens: RwLock::default(),
        };
        auth.reload()?;
        Ok(Arc::new(auth))
    }

    /// Reads the token file again (add or revoke without a restart); a bad file keeps the old
    /// tokens. Returns how many tokens are loaded.
    pub fn reload(&self) -> Result<usize> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let text = std::fs::read_to_string(path).map_err(EngineError::io(format!("reading {}", path.display())))?;
        let tokens = parse_tokens(&text, &path.display().to_string())?;
        let n = tokens.len();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
        Ok(n)
    }

    /// Whether a token file is configured (management endpoints then need `admin`).
    pub fn has_file(&self) -> bool {
        self.path.is_some()
    }

    /// The file entry whose token hashes to `presented`, if any.
    pub fn lookup(&self, presented: &TokenHash) -> Option<TokenEntry> {
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Every entry is compared, so the time does not depend on which one matched.
        let mut found = None;
        for e in tokens.iter() {
            if token_matches(presented, &e.hash) {
                found = Some(e.clone());
            }
        }
        found
    }

    /// The verdict for a management request.
    pub fn check_admin(&self, headers: &HeaderMap) -> Verdict {
        if !self.has_file() {
            return Verdict::Allowed(None);
        }
        match bearer(headers).and_then(|h| self.lookup(&h)) {
            None => Verdict::Unauthorized,
            Some(e) if e.admin => Verdict::Allowed(Some(Principal(e.name))),
            Some(e) => Verdict::Forbidden(e.name),
        }
    }
}

/// The JSON answer to a refused token: 401 with `WWW-Authenticate: Bearer`, or 403.
pub fn refusal(verdict: &Verdict, what: &str) -> Response {
    let (status, reason, message) = match verdict {
        Verdict::Forbidden(name) => (
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token '{name}' may not {what}"),
        ),
        _ => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{what} needs a valid token: Authorization: Bearer <token>"),
        ),
    };
    refused(reason);
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    r
}

/// Middleware of the management routes: an `admin` token once a token file is configured.
pub async fn require_admin(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    match auth.check_admin(request.headers()) {
        Verdict::Allowed(_) => next.run(request).await,
        v => refusal(&v, "read the management endpoints"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines_parse_and_bad_ones_name_their_line() {
        let text = format!(
            "# comment\n\norders {} sources=orders,clicks\nops {} admin\nall {} sources=*\n",
            token_file_hash("t1"),
            token_file_hash("t2"),
            token_file_hash("t3")
        );
        let tokens = parse_tokens(&text, "tokens.txt").unwrap();
        assert_eq!(tokens.len(), 3);
        assert!(tokens[0].allows("clicks") && !tokens[0].allows("other") && !tokens[0].admin);
        assert!(tokens[1].admin && !tokens[1].allows("orders"));
        assert!(tokens[2].allows("anything"));
        for (bad, want) in [
            ("x sha256:zz", "tokens.txt:1:"),
            ("x plain-token", "second word"),
            (&format!("x {} sources=a owner", token_file_hash("a")), "word 4 is neither"),
            (&format!("a/b {}", token_file_hash("a")), "not a token name"),
            (&format!("auth.token@orders {}", token_file_hash("a")), "not a token name"),
            (
                &format!("a {}\nb {}", token_file_hash("same"), token_file_hash("same")),
                "tokens.txt:2: the same token",
            ),
        ] {
            let e = parse_tokens(bad, "tokens.txt").unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains("same\n"), "no token text in errors");
        }
    }

    #[test]
    fn admin_needs_an_admin_token_once_a_file_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            format!("ops {} admin\nprod {} sources=*\n", token_file_hash("s3cret"), token_file_hash("p")),
        )
        .unwrap();
        let auth = Auth::from_file(&path).unwrap();
        let with = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
            h
        };
        assert_eq!(auth.check_admin(&HeaderMap::new()), Verdict::Unauthorized);
        assert_eq!(auth.check_admin(&with("wrong")), Verdict::Unauthorized);
        assert_eq!(auth.check_admin(&with("p")), Verdict::Forbidden("prod".into()));
        assert_eq!(
            auth.check_admin(&with("s3cret")),
            Verdict::Allowed(Some(Principal("ops".into())))
        );
        // Revoked on reload; a bad file keeps what was there.
        std::fs::write(&path, format!("prod {} sources=*\n", token_file_hash("p"))).unwrap();
        assert_eq!(auth.reload().unwrap(), 1);
        assert_eq!(auth.check_admin(&with("s3cret")), Verdict::Unauthorized);
        std::fs::write(&path, "garbage").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.lookup(&hash_token("p")).is_some());
        assert_eq!(Auth::none().check_admin(&HeaderMap::new()), Verdict::Allowed(None));
    }

    /// Seeded fuzz of the token file parser and the Authorization header: mutated lines never
    /// panic, every error names the file and a line, and a token's text never shows in one.
    #[test]
    fn fuzzed_token_files_and_headers_never_panic_or_leak() {
        let mut seed = 0x5eed_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        let valid = format!("team-a {} sources=a,b admin\n", token_file_hash("secret-token-xyz"));
        for _ in 0..20_000 {
            let mut text = valid.clone().into_bytes();
            for _ in 0..=next(6) {
                let at = next(text.len() as u64 + 1) as usize;
                match next(5) {
                    0 if at < text.len() => text[at] ^= 1 << next(8),
                    1 => text.insert(at.min(text.len()), next(256) as u8),
                    2 if at < text.len() => {
                        text.remove(at);
                    }
                    3 => text.splice(at.min(text.len())..at.min(text.len()), b"\n sources=* ".iter().copied()).for_each(drop),
                    _ => text.extend_from_slice(b"secret-token-xyz"),
                }
            }
            let text = String::from_utf8_lossy(&text);
            if let Err(e) = parse_tokens(&text, "t.txt") {
                let e = e.to_string();
                assert!(e.starts_with("t.txt:"), "{e}");
                assert!(!e.contains("secret-token-xyz"), "{e}");
            }
            let mut headers = HeaderMap::new();
            let value: Vec<u8> = text.bytes().filter(|b| *b >= 0x20 && *b != 0x7f).take(200).collect();
            if let Ok(v) = header::HeaderValue::from_bytes(&value) {
                headers.insert(header::AUTHORIZATION, v);
                let _ = bearer(&headers);
            }
        }
    }
}
