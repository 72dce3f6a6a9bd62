//! `replay`: the incoming pipeline (parse → filter → correlate → persist) over
//! files instead of a mailbox, against a scratch store. Our dry-run, and how
//! golden tests and the corpus measurement drive the real code path.
//!
//! Inputs are `.eml` files (CRLF or LF, a leading mbox `From ` line
//! tolerated), Maildir folders and mbox files, taken in name order. Every
//! message processed becomes tracked (when it correlates), so later replies in
//! the same run can chain to it.

use std::borrow::Cow;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::connector::RawMessage;
use crate::model::{AutomaticClass, Party, RecordRef, SourceKey};
use crate::pipeline::{self, ItemResult, PipelineContext, PipelineError};
use crate::store::{Store, StoreError};

/// Messages committed together; replies in a batch still see their parents.
const BATCH: usize = 64;

/// Replay failure (of the run, not of a message: those are reported per line).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Seed {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot write the output: {0}")]
    Write(std::io::Error),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One message read from the inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputMessage {
    /// Path as given (mbox messages get `#<n>`, counted from 1).
    pub file: String,
    /// Folder the message counts as found in (for folder tracking).
    pub folder: String,
    pub raw: Vec<u8>,
}

/// Where one input message is, read only when its batch is processed: a
/// replay of 100,000 messages holds one batch of mail in memory, not all of
/// it (reading every input up front made the inputs most of replay's RSS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    /// As [`InputMessage::file`].
    pub file: String,
    /// As [`InputMessage::folder`].
    pub folder: String,
    path: PathBuf,
    /// The message's bytes inside an mbox file; `None`: the whole file.
    span: Option<Range<usize>>,
}

impl InputRef {
    /// Reads the message's bytes.
    pub fn load(&self) -> Result<InputMessage, ReplayError> {
        let raw = match &self.span {
            None => std::fs::read(&self.path).map_err(read_err(&self.path))?,
            Some(span) => {
                let mut raw = vec![0; span.len()];
                std::fs::File::open(&self.path)
                    .and_then(|mut f| {
                        f.seek(SeekFrom::Start(span.start as u64))?;
                        f.read_exact(&mut raw)
                    })
                    .map_err(read_err(&self.path))?;
                raw
            }
        };
        Ok(InputMessage {
            file: self.file.clone(),
            folder: self.folder.clone(),
            raw,
        })
    }
}

/// Something [`run`] can process: a message in memory, or one to read.
pub trait ReplayInput {
    /// The message with its bytes.
    fn load(&self) -> Result<Cow<'_, InputMessage>, ReplayError>;
}

impl ReplayInput for InputMessage {
    fn load(&self) -> Result<Cow<'_, InputMessage>, ReplayError> {
        Ok(Cow::Borrowed(self))
    }
}

impl ReplayInput for InputRef {
    fn load(&self) -> Result<Cow<'_, InputMessage>, ReplayError> {
        InputRef::load(self).map(Cow::Owned)
    }
}

/// One output line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayRecord {
    pub file: String,
    pub message_id: Option<String>,
    pub regarding: Option<RecordRef>,
    /// A correlation method, `skipped`, `quarantined` or `already_seen`.
    pub method: String,
    /// Rounded to three decimals so output is stable across platforms.
    pub score: f64,
    pub reasons: Vec<String>,
    /// The automatic-mail class (`auto_reply`, `bounce`, `bulk`, `list`);
    /// absent for ordinary mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automatic: Option<AutomaticClass>,
    /// Present (true) when the outgoing side must never answer this email.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_reply: bool,
    /// From, to, cc and bcc, each resolved to a record of the directory or
    /// not (with why); absent for quarantined and already-seen messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parties: Vec<Party>,
}

/// A `seeds.jsonl` line; extra keys are ignored.
#[derive(Debug, Clone, Deserialize)]
struct SeedLine {
    file: PathBuf,
    regarding: RecordRef,
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReplayError + '_ {
    move |source| ReplayError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// Reads `seeds.jsonl`: each listed file (relative to the current directory)
/// with the record it is tracked to. Blank lines are skipped.
pub fn read_seeds(path: &Path) -> Result<Vec<(InputMessage, RecordRef)>, ReplayError> {
    let f = std::fs::File::open(path).map_err(read_err(path))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(read_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let seed: SeedLine = serde_json::from_str(&line).map_err(|e| ReplayError::Seed {
            path: path.display().to_string(),
            line: i + 1,
            message: e.to_string(),
        })?;
        for m in collect_inputs(std::slice::from_ref(&seed.file))? {
            out.push((m, seed.regarding.clone()));
        }
    }
    Ok(out)
}

/// Reads every message under `paths`, in the order given and name order within.
pub fn collect_inputs(paths: &[PathBuf]) -> Result<Vec<InputMessage>, ReplayError> {
    list_inputs(paths)?.iter().map(InputRef::load).collect()
}

/// Lists every message under `paths` like [`collect_inputs`], without
/// keeping their bytes (mbox files are read once to find the messages).
pub fn list_inputs(paths: &[PathBuf]) -> Result<Vec<InputRef>, ReplayError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk_dir(p, "INBOX", &mut out)?;
        } else {
            read_file(p, "INBOX", &mut out)?;
        }
    }
    Ok(out)
}

fn is_maildir(dir: &Path) -> bool {
    dir.join("cur").is_dir() || dir.join("new").is_dir()
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, ReplayError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Files that are documentation or expected output, not mail.
fn is_not_mail(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    name.starts_with('.')
        || name.starts_with("README")
        || name.starts_with("LICENSE")
        || name.starts_with("COPYING")
        || [".json", ".jsonl", ".md", ".toml", ".xml", ".html"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

fn walk_dir(dir: &Path, folder: &str, out: &mut Vec<InputRef>) -> Result<(), ReplayError> {
    if is_maildir(dir) {
        // All folders of a Maildir together, in file-name order: delivery names
        // sort by time, so a reply in INBOX comes after its parent in a subfolder.
        let mut files: Vec<(PathBuf, String)> = Vec::new();
        maildir_files(dir, folder, &mut files)?;
        files.sort_by(|a, b| a.0.file_name().cmp(&b.0.file_name()));
        for (f, folder) in files {
            read_file(&f, &folder, out)?;
        }
        return Ok(());
    }
    for p in sorted_entries(dir)? {
        if is_not_mail(&p) {
            continue;
        }
        if p.is_dir() {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let sub = if name.eq_ignore_ascii_case("INBOX") && folder == "INBOX" {
                "INBOX".to_string()
            } else {
                format!("{folder}/{name}")
            };
            walk_dir(&p, &sub, out)?;
        } else {
            read_file(&p, folder, out)?;
        }
    }
    Ok(())
}

/// Message files of a Maildir and its Maildir++ subfolders
/// (`.Customers.Contoso` → `INBOX/Customers/Contoso`).
fn maildir_files(
    dir: &Path,
    folder: &str,
    out: &mut Vec<(PathBuf, String)>,
) -> Result<(), ReplayError> {
    for sub in ["cur", "new"] {
        let d = dir.join(sub);
        if d.is_dir() {
            for f in sorted_entries(&d)? {
                if f.is_file() && !is_not_mail(&f) {
                    out.push((f, folder.to_string()));
                }
            }
        }
    }
    if folder != "INBOX" {
        return Ok(());
    }
    for sub in sorted_entries(dir)? {
        let name = sub
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if let Some(rest) = name.strip_prefix('.') {
            if sub.is_dir() && is_maildir(&sub) && !rest.is_empty() {
                let rest = rest.strip_prefix("INBOX.").unwrap_or(rest);
                maildir_files(&sub, &format!("INBOX/{}", rest.replace('.', "/")), out)?;
            }
        }
    }
    Ok(())
}

fn read_file(p: &Path, folder: &str, out: &mut Vec<InputRef>) -> Result<(), ReplayError> {
    let is_eml = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("eml"));
    let spans = if is_eml {
        vec![None]
    } else {
        let raw = std::fs::read(p).map_err(read_err(p))?;
        mbox_spans(&raw).map_or_else(|| vec![None], |s| s.into_iter().map(Some).collect())
    };
    let many = spans.len() > 1;
    for (i, span) in spans.into_iter().enumerate() {
        out.push(InputRef {
            file: if many {
                format!("{}#{}", p.display(), i + 1)
            } else {
                p.display().to_string()
            },
            folder: folder.to_string(),
            path: p.to_path_buf(),
            span,
        });
    }
    Ok(())
}

/// Splits an mboxo file at lines starting with `From `; a file without such
/// a first line is one message.
pub fn split_mbox(raw: &[u8]) -> Vec<Vec<u8>> {
    match mbox_spans(raw) {
        None => vec![raw.to_vec()],
        Some(spans) => spans
            .into_iter()
            .filter_map(|r| raw.get(r))
            .map(<[u8]>::to_vec)
            .collect(),
    }
}

/// The messages of an mboxo file as byte ranges (blank ones left out);
/// `None` when the file does not start with a `From ` line (one message).
fn mbox_spans(raw: &[u8]) -> Option<Vec<Range<usize>>> {
    if !raw.starts_with(b"From ") {
        return None;
    }
    let mut starts = vec![0];
    let mut i = 0;
    while let Some(nl) = memchr::memchr(b'\n', raw.get(i..).unwrap_or_default()) {
        i += nl + 1;
        if raw.get(i..).is_some_and(|rest| rest.starts_with(b"From ")) {
            starts.push(i);
        }
    }
    starts.push(raw.len());
    Some(
        starts
            .windows(2)
            .filter_map(|w| match *w {
                [a, b] => Some(a..b),
                _ => None,
            })
            .filter(|r| {
                raw.get(r.clone())
                    .is_some_and(|m| m.iter().any(|b| !b.is_ascii_whitespace()))
            })
            .collect(),
    )
}

fn raw_message(ctx: &PipelineContext, m: &InputMessage, n: usize) -> RawMessage {
    RawMessage {
        source: SourceKey {
            mailbox: ctx.mailbox.clone(),
            folder: m.folder.clone(),
            uidvalidity: 1,
            // The position keeps two copies of one file (listed twice) apart.
            uid: format!("{n}:{}", m.file),
        },
        raw: m.raw.clone(),
        received_at: None,
        too_large: None,
        unfetchable: None,
    }
}

fn round3(x: f32) -> f64 {
    (f64::from(x) * 1000.0).round() / 1000.0
}

/// Tracks the seeds, then processes `inputs` in order; calls `emit` with one
/// record per input message. `tick` is called after each message (progress).
pub fn run<I: ReplayInput>(
    store: &dyn Store,
    ctx: &PipelineContext,
    seeds: &[(InputMessage, RecordRef)],
    inputs: &[I],
    now: i64,
    emit: &mut dyn FnMut(ReplayRecord) -> Result<(), ReplayError>,
    tick: &mut dyn FnMut(),
) -> Result<(), ReplayError> {
    let mut n = 0;
    for chunk in seeds.chunks(BATCH) {
        let raws: Vec<RawMessage> = chunk
            .iter()
            .map(|(m, _)| {
                n += 1;
                raw_message(ctx, m, n)
            })
            .collect();
        let pairs: Vec<(&RawMessage, Option<&RecordRef>)> = raws
            .iter()
            .zip(chunk)
            .map(|(r, (_, rec))| (r, Some(rec)))
            .collect();
        let (batch, _) = pipeline::process_seeded(store, ctx, &pairs, now)?;
        store.commit(batch)?;
    }
    for chunk in inputs.chunks(BATCH) {
        let chunk = chunk
            .iter()
            .map(ReplayInput::load)
            .collect::<Result<Vec<_>, _>>()?;
        let raws: Vec<RawMessage> = chunk
            .iter()
            .map(|m| {
                n += 1;
                raw_message(ctx, m, n)
            })
            .collect();
        let (batch, results) = pipeline::process(store, ctx, &raws, now)?;
        store.commit(batch)?;
        for (m, (_, r)) in chunk.iter().zip(results) {
            let rec = match r {
                ItemResult::Correlated {
                    message_id,
                    decision,
                    automatic,
                    no_reply,
                    parties,
                    ..
                } => ReplayRecord {
                    file: m.file.clone(),
                    message_id,
                    regarding: decision.regarding,
                    method: decision.method.as_str().to_string(),
                    score: round3(decision.score),
                    reasons: decision.reasons,
                    automatic,
                    no_reply,
                    parties,
                },
                ItemResult::Quarantined { reason, .. } => ReplayRecord {
                    file: m.file.clone(),
                    message_id: None,
                    regarding: None,
                    method: "quarantined".into(),
                    score: 0.0,
                    reasons: vec![reason],
                    automatic: None,
                    no_reply: false,
                    parties: Vec::new(),
                },
                ItemResult::AlreadySeen => ReplayRecord {
                    file: m.file.clone(),
                    message_id: None,
                    regarding: None,
                    method: "already_seen".into(),
                    score: 0.0,
                    reasons: vec!["this source was processed before".into()],
                    automatic: None,
                    no_reply: false,
                    parties: Vec::new(),
                },
            };
            emit(rec)?;
            tick();
        }
    }
    Ok(())
}

/// Runs [`run`] and writes JSON lines to `out`.
pub fn run_to_writer<I: ReplayInput>(
    store: &dyn Store,
    ctx: &PipelineContext,
    seeds: &[(InputMessage, RecordRef)],
    inputs: &[I],
    now: i64,
    out: &mut dyn Write,
    tick: &mut dyn FnMut(),
) -> Result<(), ReplayError> {
    run(
        store,
        ctx,
        seeds,
        inputs,
        now,
        &mut |rec| {
            let line = serde_json::to_string(&rec)
                .map_err(|e| ReplayError::Write(std::io::Error::other(e)))?;
            writeln!(out, "{line}").map_err(ReplayError::Write)
        },
        tick,
    )?;
    out.flush().map_err(ReplayError::Write)
}

/// A store directory that is removed when dropped (replay's scratch store).
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// A fresh directory under the system temp dir: a random name (another
    /// local user cannot guess it and plant a symlink or a store there),
    /// created exclusively (an existing path is never reused) and 0700.
    pub fn new() -> Result<Self, ReplayError> {
        Self::new_in(&std::env::temp_dir())
    }

    fn new_in(parent: &Path) -> Result<Self, ReplayError> {
        use ring::rand::SecureRandom as _;
        let rng = ring::rand::SystemRandom::new();
        for _ in 0..16 {
            let mut bytes = [0u8; 16];
            rng.fill(&mut bytes).map_err(|_| ReplayError::Read {
                path: parent.display().to_string(),
                source: std::io::Error::other("no system randomness for a scratch name"),
            })?;
            let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let p = parent.join(format!("crm-mailsync-replay-{name}"));
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            // Not recursive: `create` fails on anything already there.
            match builder.create(&p) {
                Ok(()) => return Ok(ScratchDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(read_err(&p)(e)),
            }
        }
        Err(read_err(parent)(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "16 random scratch directory names were all taken",
        )))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover temp dir is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_store_dir_is_unpredictable_private_and_fresh() {
        let parent = tempfile::tempdir().unwrap();
        let a = ScratchDir::new_in(parent.path()).unwrap();
        let b = ScratchDir::new_in(parent.path()).unwrap();
        assert_ne!(a.0, b.0);
        let name = a.0.file_name().unwrap().to_str().unwrap().to_string();
        let suffix = name.strip_prefix("crm-mailsync-replay-").unwrap();
        // 128 random bits, nothing derived from the pid or the clock.
        assert_eq!(suffix.len(), 32, "{name}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a.0).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{mode:o}");
        }
        let kept = a.0.clone();
        drop(a);
        assert!(!kept.exists());
    }

    #[test]
    fn mbox_splits_on_from_lines_and_eml_keeps_its_from_line() {
        let mbox = b"From a@x Mon Jan 1 00:00:00 2026\nSubject: 1\n\nbody\n\nFrom b@x Mon Jan 1 00:00:00 2026\nSubject: 2\n\n>From quoted\n";
        let parts = split_mbox(mbox);
        assert_eq!(parts.len(), 2);
        assert!(parts[1].starts_with(b"From b@x"));
        assert_eq!(split_mbox(b"Subject: x\n\nFrom here on\n").len(), 1);
    }

    #[test]
    fn listed_inputs_read_the_same_bytes_as_an_up_front_read() {
        let d = tempfile::tempdir().unwrap();
        let mbox = b"From a@x Mon Jan 1 00:00:00 2026\nSubject: 1\n\nbody\n\nFrom b@x Mon Jan 1 00:00:00 2026\n\n\nFrom c@x Mon Jan 1 00:00:00 2026\nSubject: 3\n\n>From quoted\n";
        std::fs::write(d.path().join("a.mbox"), mbox).unwrap();
        std::fs::write(d.path().join("b.eml"), b"From x\nSubject: e\n\nbody\n").unwrap();
        let refs = list_inputs(&[d.path().to_path_buf()]).unwrap();
        let loaded: Vec<InputMessage> = refs.iter().map(|r| r.load().unwrap()).collect();
        let mut expected = split_mbox(mbox);
        expected.push(b"From x\nSubject: e\n\nbody\n".to_vec());
        let got: Vec<&[u8]> = loaded.iter().map(|m| m.raw.as_slice()).collect();
        assert_eq!(got, expected.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert!(loaded[0].file.ends_with("a.mbox#1"), "{}", loaded[0].file);
        assert_eq!(loaded.len(), 4);
        assert!(loaded[2].file.ends_with("a.mbox#3"), "{}", loaded[2].file);
        assert!(loaded[3].file.ends_with("b.eml"), "{}", loaded[3].file);
    }

    #[test]
    fn directories_are_read_in_name_order_with_folders() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("Customers")).unwrap();
        std::fs::write(d.join("b.eml"), "Subject: b\n\n").unwrap();
        std::fs::write(d.join("a.eml"), "Subject: a\n\n").unwrap();
        std::fs::write(d.join("a.json"), "{}").unwrap();
        std::fs::write(d.join("Customers/c.eml"), "Subject: c\n\n").unwrap();
        let got = collect_inputs(&[d.to_path_buf()]).unwrap();
        let names: Vec<(String, String)> = got
            .iter()
            .map(|m| {
                (
                    Path::new(&m.file)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .to_string(),
                    m.folder.clone(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("c.eml".into(), "INBOX/Customers".into()),
                ("a.eml".into(), "INBOX".into()),
                ("b.eml".into(), "INBOX".into())
            ]
        );
    }
}
