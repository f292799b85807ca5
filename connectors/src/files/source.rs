//! Directory sources: every file that appears under LOCATION is read once, in name order.
//!
//! Position (recorded in each commit): `{"file": NAME, "offset": BYTES, "complete": BOOL}` —
//! every file whose name sorts before NAME is done, and NAME is done up to OFFSET (all of it when
//! `complete`). On restart the source resumes exactly there, so no file is read twice and none is
//! skipped, provided producers follow the contract below.
//!
//! Producer contract: a file appears complete (write it elsewhere, or under a name starting with
//! `.` or `_`, then rename it into place), and new files sort after the ones already there (e.g.
//! a timestamp or sequence prefix). Names starting with `.` or `_` are ignored.
//!
//! Violations are never silent. The file of the position (the one being read, or the last one
//! read) replaced under its name — its identity, device and inode, is in the position — stops
//! the source with an error; files read before it are not watched. A file that grows
//! after it was read to its end is reported and its new bytes are read. A file that appears
//! sorting before the current position, or whose name is not UTF-8, is reported (it is not
//! read). A file that disappears before it is read, or an I/O error, stops the source with an
//! error, and the server exits non-zero.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_engine::dead_letter::{DeadLetter, Stage};
use sluice_engine::decode::{Format, RecordDecoder, csv_records, lines};
use sluice_engine::connector::source::{Chunk, Message, Source, SourceContext};
use sluice_engine::{EngineError, Result};

use super::config::{DirFormat, DirSourceConfig, READ_CHUNK_BYTES};

/// Chunks of one file decoded at the same time (read in order, sent in order).
pub const DECODE_PARALLELISM: usize = 2;

/// Where a directory source is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePosition {
    /// The file being read, or the last one read.
    pub file: String,
    /// Bytes of it consumed.
    pub offset: u64,
    /// Whether it is finished.
    pub complete: bool,
    /// The file's identity when it was read (device and inode), so a file replaced under the
    /// same name is detected instead of read at the old offset. Absent in positions recorded
    /// before identities were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// The identity of a file (device and inode).
fn identity_of(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("{}:{}", m.dev(), m.ino())
}

/// The identity of the file at `path`.
fn identity(path: &Path) -> Result<String> {
    let m = std::fs::metadata(path).map_err(EngineError::io(format!("reading {}", path.display())))?;
    Ok(identity_of(&m))
}

/// A directory source feeding one pipeline.
pub struct DirSource {
    /// The source table's name.
    pub source: String,
    /// Settings.
    pub config: DirSourceConfig,
    /// NDJSON or CSV.
    pub format: DirFormat,
    /// Decodes records into the declared schema.
    pub decoder: RecordDecoder,
}

/// What the source has seen of its directory, to report contract violations once each.
#[derive(Debug, Default)]
struct Seen {
    /// Names present at the previous listing (`None` before the first).
    names: Option<std::collections::BTreeSet<String>>,
    /// Names already reported.
    reported: std::collections::BTreeSet<std::ffi::OsString>,
}

/// Names of the files to read after `pos`, in order. Files it will never read are reported
/// loudly (logged as errors and counted in `sluice_files_skipped_total{reason}`): names that
/// are not UTF-8, and files that appeared after the source had passed their place in name order.
fn pending(dir: &Path, pos: Option<&FilePosition>, seen: &mut Seen, source: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut listed = std::collections::BTreeSet::new();
    let rd = std::fs::read_dir(dir).map_err(EngineError::io(format!("listing {}", dir.display())))?;
    for entry in rd {
        let entry = entry.map_err(EngineError::io(format!("listing {}", dir.display())))?;
        let name = match entry.file_name().into_string() {
            Ok(n) => n,
            Err(raw) => {
                if seen.reported.insert(raw.clone()) {
                    tracing::error!(source, dir = %dir.display(), name = ?raw, "file name is not UTF-8; it will not be read (rename it)");
                    metrics::counter!("sluice_files_skipped_total", "source" => source.to_string(), "reason" => "name_not_utf8").increment(1);
                }
                continue;
            }
        };
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        if !entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        let after = match pos {
            None => true,
            Some(p) => name.as_str() > p.file.as_str() || (name == p.file && !p.complete),
        };
        if !after
            && seen.names.as_ref().is_some_and(|prev| !prev.contains(&name))
            && seen.reported.insert(name.clone().into())
        {
            tracing::error!(source, dir = %dir.display(), file = %name, "a file appeared whose name sorts before files already read; it will not be read (producers must name new files to sort last)");
            metrics::counter!("sluice_files_skipped_total", "source" => source.to_string(), "reason" => "late")
                .increment(1);
        }
        listed.insert(name.clone());
        if after {
            names.push(name);
        }
    }
    seen.names = Some(listed);
    names.sort();
    Ok(names)
}

/// Bytes of a too-long line kept in its dead letter (the rest is skipped unread into memory).
const LONG_LINE_HEAD: usize = 4096;

/// What one read of a file gave.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    /// Whole records (lines; CSV records, quoted newlines included).
    Records(Vec<u8>),
    /// One line longer than `max_line_bytes`, skipped: its first bytes and its length.
    TooLong {
        /// The line's first [`LONG_LINE_HEAD`] bytes.
        head: Vec<u8>,
        /// Its length, newline included.
        len: u64,
    },
}

impl Piece {
    fn consumed(&self) -> u64 {
        match self {
            Piece::Records(b) => b.len() as u64,
            Piece::TooLong { len, .. } => *len,
        }
    }
}

/// Where the records of `buf` end, when it does not run to the end of the file: after the last
/// newline (NDJSON), or where the last CSV record (which may be cut) starts. `None` when no
/// whole record is in `buf`.
fn records_end(buf: &[u8], format: DirFormat, delimiter: u8) -> Option<usize> {
    match format {
        DirFormat::Ndjson => buf.iter().rposition(|b| *b == b'\n').map(|nl| nl + 1),
        DirFormat::Csv => {
            // The last record may be cut by the chunk's end (even right after a newline inside
            // quotes, which the CSV reader takes for a record's end): short of the end of the
            // file it always starts the next read.
            let records = csv_records(buf, delimiter);
            records.last().map(|last| last.start).filter(|start| *start > 0)
        }
    }
}

/// Reads from `offset` up to about `max` bytes ending at a record end (or the end of the file).
/// A record longer than `max_line` is skipped to its next newline, holding only its head.
/// Returns the piece and whether the end of the file was reached.
fn read_records_from(
    path: &Path,
    offset: u64,
    max: usize,
    config: &DirSourceConfig,
    format: DirFormat,
) -> Result<(Piece, bool)> {
    let ctx = || format!("reading {}", path.display());
    let mut f = std::fs::File::open(path).map_err(EngineError::io(ctx()))?;
    let len = f.metadata().map_err(EngineError::io(ctx()))?.len();
    f.seek(SeekFrom::Start(offset)).map_err(EngineError::io(ctx()))?;
    let max_line = usize::try_from(config.max_line_bytes).unwrap_or(usize::MAX);
    // Sized for the whole chunk up front: read_to_end through `take` has no size hint and would
    // grow the buffer by doubling, copying it each time.
    let mut buf = Vec::with_capacity(len.saturating_sub(offset).min(max as u64) as usize);
    loop {
        let want = max.max(1);
        let before = buf.len();
        (&mut f)
            .take(want as u64)
            .read_to_end(&mut buf)
            .map_err(EngineError::io(ctx()))?;
        if buf.len() - before < want || offset + buf.len() as u64 >= len {
            if buf.len() > max_line && records_end(&buf, format, config.delimiter).is_none() {
                return skip_long_line(&mut f, buf, path);
            }
            return Ok((Piece::Records(buf), true));
        }
        if let Some(end) = records_end(&buf, format, config.delimiter) {
            buf.truncate(end);
            return Ok((Piece::Records(buf), false));
        }
        if buf.len() > max_line {
            return skip_long_line(&mut f, buf, path);
        }
        // A record longer than `max` (but within `max_line`): keep reading until it ends.
    }
}

/// Skips the rest of a too-long line (to its newline or the end of the file) in small reads.
fn skip_long_line(f: &mut std::fs::File, mut buf: Vec<u8>, path: &Path) -> Result<(Piece, bool)> {
    let head_end = buf.iter().position(|b| *b == b'\n');
    if let Some(nl) = head_end {
        // The newline is already in the buffer.
        buf.truncate(nl + 1);
        let len = buf.len() as u64;
        buf.truncate(LONG_LINE_HEAD.min(buf.len()));
        return Ok((Piece::TooLong { head: buf, len }, false));
    }
    let mut len = buf.len() as u64;
    buf.truncate(LONG_LINE_HEAD);
    let mut block = vec![0u8; 64 << 10];
    loop {
        let n = f
            .read(&mut block)
            .map_err(EngineError::io(format!("reading {}", path.display())))?;
        if n == 0 {
            return Ok((Piece::TooLong { head: buf, len }, true));
        }
        if let Some(nl) = block[..n].iter().position(|b| *b == b'\n') {
            len += nl as u64 + 1;
            return Ok((Piece::TooLong { head: buf, len }, false));
        }
        len += n as u64;
    }
}

impl DirSource {
    /// Reads `name` from `offset`, sending chunks; returns false when the pipeline is gone.
    /// Chunks are read in order, decoded [`DECODE_PARALLELISM`] at a time on blocking threads,
    /// and sent in order.
    async fn read_file(&self, ctx: &SourceContext, name: &str, offset: u64, identity: &str) -> Result<Option<u64>> {
        let path = self.config.dir.join(name);
        let mut pending: VecDeque<tokio::task::JoinHandle<Result<Chunk>>> = VecDeque::new();
        let (mut next, mut eof) = (offset, false);
        loop {
            while !eof && pending.len() < DECODE_PARALLELISM {
                let (p, format, start, config) = (path.clone(), self.format, next, self.config.clone());
                let (piece, at_end) =
                    tokio::task::spawn_blocking(move || read_records_from(&p, start, READ_CHUNK_BYTES, &config, format))
                        .await
                        .map_err(|e| EngineError::Internal(format!("file reader task failed: {e}")))??;
                next = start + piece.consumed();
                eof = at_end;
                let job = DecodeJob {
                    decoder: self.decoder.clone(),
                    format: self.format,
                    config: self.config.clone(),
                    source: self.source.clone(),
                    file: name.to_string(),
                    identity: identity.to_string(),
                    start,
                    eof,
                };
                pending.push_back(tokio::task::spawn_blocking(move || job.run(piece)));
            }
            let Some(handle) = pending.pop_front() else {
                return Ok(Some(next));
            };
            let chunk = handle
                .await
                .map_err(|e| EngineError::Internal(format!("decode task failed: {e}")))??;
            let mut stop = ctx.shutdown.clone();
            if !ctx.budget.acquire(chunk.bytes as u64, &mut stop).await {
                return Ok(None);
            }
            if ctx.tx.send(chunk.into()).await.is_err() {
                return Ok(None);
            }
            if *ctx.shutdown.borrow() {
                return Ok(None);
            }
        }
    }
}

/// Decoding one chunk of a file into a [`Chunk`] (runs on a blocking thread).
struct DecodeJob {
    decoder: RecordDecoder,
    format: DirFormat,
    config: DirSourceConfig,
    source: String,
    file: String,
    identity: String,
    start: u64,
    eof: bool,
}

impl DecodeJob {
    fn run(self, piece: Piece) -> Result<Chunk> {
        let buf = match piece {
            Piece::Records(buf) => buf,
            Piece::TooLong { head, len } => return self.too_long(head, len),
        };
        let ranges = match self.format {
            DirFormat::Ndjson => lines(&buf),
            DirFormat::Csv => {
                let mut r = csv_records(&buf, self.config.delimiter);
                // The header is the file's first record only.
                if self.config.has_header && self.start == 0 && !r.is_empty() {
                    r.remove(0);
                }
                r
            }
        };
        let decoded = self.decoder.decode(&buf, &ranges)?;
        let dead_letters = decoded
            .rejected
            .iter()
            .map(|r| (r, DeadLetter::raw_fields(&buf[ranges[r.index].clone()])))
            .map(|(r, raw)| DeadLetter {
                source: self.source.clone(),
                position: json!({ "file": self.file, "offset": self.start + ranges[r.index].start as u64 }),
                stage: Stage::Decode,
                error: r.error.clone(),
                raw: raw.0,
                raw_base64: raw.1,
                principal: None,
            })
            .collect();
        let position = self.position(self.start + buf.len() as u64)?;
        Ok(Chunk {
            batch: decoded.batch,
            dead_letters,
            position: Some(position),
            bytes: buf.len(),
            principal: None,
        })
    }

    /// The source position after this chunk, as recorded in the commit.
    fn position(&self, offset: u64) -> Result<serde_json::Value> {
        let position = FilePosition {
            file: self.file.clone(),
            offset,
            complete: self.eof,
            identity: Some(self.identity.clone()),
        };
        serde_json::to_value(&position).map_err(|e| EngineError::Internal(e.to_string()))
    }

    /// A line longer than `max_line_bytes`: one dead letter by position, holding its head only.
    fn too_long(self, head: Vec<u8>, len: u64) -> Result<Chunk> {
        let raw = DeadLetter::raw_fields(&head);
        let letter = DeadLetter {
            source: self.source.clone(),
            position: json!({ "file": self.file, "offset": self.start, "length": len }),
            stage: Stage::Decode,
            error: format!(
                "line of {len} bytes is longer than max_line_bytes = {}; it was skipped (the dead letter holds its first {} bytes)",
                self.config.max_line_bytes,
                head.len()
            ),
            raw: raw.0,
            raw_base64: raw.1,
            principal: None,
        };
        Ok(Chunk {
            batch: arrow::record_batch::RecordBatch::new_empty(self.decoder.schema().clone()),
            dead_letters: vec![letter],
            position: Some(self.position(self.start + len)?),
            bytes: head.len(),
            principal: None,
        })
    }
}

#[async_trait::async_trait]
impl Source for DirSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<()> {
        let dir: PathBuf = self.config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(EngineError::io(format!("creating {}", dir.display())))?;
        let mut pos: Option<FilePosition> = match &ctx.start {
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| EngineError::CommitLog {
                path: dir.display().to_string(),
                message: format!("recorded position {v} is not a directory-source position: {e}"),
            })?),
            None => None,
        };
        ctx.mark_started();
        let mut idle_sent = false;
        let mut seen = Seen::default();
        loop {
            if *ctx.shutdown.borrow() {
                return Ok(());
            }
            // The last file read, if complete, must not have grown or been replaced since.
            if let Some(p) = pos.as_mut().filter(|p| p.complete) {
                let path = dir.join(&p.file);
                if let Ok(meta) = std::fs::metadata(&path) {
                    let now = identity_of(&meta);
                    if p.identity.as_ref().is_some_and(|id| *id != now) {
                        return Err(replaced(&dir, p));
                    }
                    if meta.len() > p.offset {
                        tracing::error!(source = %self.source, file = %p.file, read = p.offset, now = meta.len(),
                            "a file grew after it was read to its end; reading the rest (producers must write files whole, then rename them into place)");
                        metrics::counter!("sluice_files_appended_total", "source" => self.source.clone()).increment(1);
                        p.complete = false;
                    }
                }
            }
            let names = pending(&dir, pos.as_ref(), &mut seen, &self.source)?;
            if names.is_empty() {
                // Drained: let the pipeline commit now rather than at its batch interval.
                if !idle_sent {
                    idle_sent = true;
                    if ctx.tx.send(Message::Idle).await.is_err() {
                        return Ok(());
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = ctx.shutdown.changed() => {}
                }
                continue;
            }
            idle_sent = false;
            for name in names {
                let path = dir.join(&name);
                let id = match identity(&path) {
                    Ok(id) => id,
                    // Listed, then gone before it was read: a producer broke the contract.
                    Err(e) => {
                        return Err(EngineError::BadInput(format!(
                            "file {} disappeared before it was read ({e}); files must stay until read",
                            path.display()
                        )));
                    }
                };
                let offset = match &pos {
                    Some(p) if p.file == name => {
                        if p.identity.as_ref().is_some_and(|recorded| *recorded != id) {
                            return Err(replaced(&dir, p));
                        }
                        p.offset
                    }
                    _ => 0,
                };
                // The offset actually read, not the size now: bytes appended after the last
                // read are read on the next pass.
                let Some(read_to) = self.read_file(&ctx, &name, offset, &id).await? else {
                    return Ok(());
                };
                pos = Some(FilePosition {
                    file: name,
                    offset: read_to,
                    complete: true,
                    identity: Some(id),
                });
                if *ctx.shutdown.borrow() {
                    return Ok(());
                }
            }
        }
    }
}

/// The error for a file replaced under a name already (partly) read.
fn replaced(dir: &Path, p: &FilePosition) -> EngineError {
    EngineError::config(
        format!(
            "file {} was replaced after it was read up to byte {} (another file now has its name); the source stops rather than read the new file at the old offset",
            dir.join(&p.file).display(),
            p.offset
        ),
        Some("producers must never reuse a file name; give the new file a new name that sorts last".to_string()),
    )
}

/// The decoder format of a directory format.
pub fn decoder_format(format: DirFormat, config: &DirSourceConfig) -> Format {
    match format {
        DirFormat::Ndjson => Format::Json,
        DirFormat::Csv => Format::Csv {
            delimiter: config.delimiter,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max_line: u64) -> DirSourceConfig {
        DirSourceConfig {
            dir: dir.to_path_buf(),
            poll_interval: std::time::Duration::from_millis(10),
            has_header: true,
            delimiter: b',',
            max_line_bytes: max_line,
        }
    }

    /// Reads a whole file the way the source does, `max` bytes at a time.
    fn read_all(path: &Path, cfg: &DirSourceConfig, format: DirFormat, max: usize) -> Vec<Piece> {
        let (mut offset, mut out) = (0u64, Vec::new());
        loop {
            let (piece, eof) = read_records_from(path, offset, max, cfg, format).unwrap();
            offset += piece.consumed();
            out.push(piece);
            if eof {
                return out;
            }
        }
    }

    // Reproducer for #25: the directory source had no line-length bound.
    #[test]
    fn a_line_past_max_line_bytes_is_skipped_by_position_without_being_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ndjson");
        let long = "x".repeat(100_000);
        std::fs::write(&path, format!("{{\"a\":1}}\n{long}\n{{\"a\":2}}\n{long}")).unwrap();
        let pieces = read_all(&path, &config(dir.path(), 1000), DirFormat::Ndjson, 64);
        let mut records = Vec::new();
        let mut long_lines = Vec::new();
        for p in pieces {
            match p {
                Piece::Records(b) => records.extend(String::from_utf8(b).unwrap().lines().map(str::to_string)),
                Piece::TooLong { head, len } => {
                    assert!(head.len() <= LONG_LINE_HEAD);
                    long_lines.push(len);
                }
            }
        }
        assert_eq!(records, vec!["{\"a\":1}", "{\"a\":2}"]);
        assert_eq!(long_lines, vec![100_001, 100_000]);
    }

    // Reproducer for #25 (review): a piece ending right after a newline inside quotes was taken
    // for a whole record.
    #[test]
    fn csv_pieces_never_end_inside_a_quoted_field_whatever_the_chunk_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.csv");
        let text = "a,b\r\n1,\"x\ny\"\r\n2,\"p\n\nq, r\"\n3,z\n";
        std::fs::write(&path, text).unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let whole: Vec<Vec<u8>> = csv_records(text.as_bytes(), b',')
            .into_iter()
            .map(|r| text.as_bytes()[r].to_vec())
            .collect();
        for max in 1..=text.len() {
            let mut records = Vec::new();
            for p in read_all(&path, &cfg, DirFormat::Csv, max) {
                let Piece::Records(b) = p else { panic!("no record is too long") };
                records.extend(csv_records(&b, b',').into_iter().map(|r| b[r].to_vec()));
            }
            assert_eq!(records, whole, "chunk size {max}");
        }
    }

    // Reproducer for #25: CSV files were read whole.
    #[test]
    fn csv_is_read_in_pieces_that_end_on_record_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        let mut text = String::from("id,note\n");
        for i in 0..200 {
            text.push_str(&format!("{i},\"line one\nline, two {i}\"\n"));
        }
        std::fs::write(&path, &text).unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let pieces = read_all(&path, &cfg, DirFormat::Csv, 50);
        assert!(pieces.len() > 10, "read in pieces");
        let mut joined = Vec::new();
        for p in &pieces {
            let Piece::Records(b) = p else { panic!("no record is too long") };
            assert!(csv_records(b, b',').iter().all(|r| !b[r.clone()].is_empty()));
            joined.extend_from_slice(b);
        }
        assert_eq!(String::from_utf8(joined).unwrap(), text, "every byte once, in order");
        let records: usize = pieces
            .iter()
            .map(|p| match p {
                Piece::Records(b) => csv_records(b, b',').len(),
                Piece::TooLong { .. } => 0,
            })
            .sum();
        assert_eq!(records, 201, "the header and 200 records, none split");
    }
}
