//! What `enqueue` and `batch` share: reading an OpenAI-Batch input file, resuming from the
//! output already written, writing result lines as they arrive, and showing progress.

use std::collections::{BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::job::{Job, JobResult};

/// A valid input line still to be done.
#[derive(Debug, Clone)]
pub struct Line {
    pub number: usize,
    pub job: Job,
    /// The line as read, published as is by `enqueue`.
    pub raw: String,
}

/// The input file, split into what is left to do.
#[derive(Debug, Default)]
pub struct Backlog {
    pub pending: Vec<Line>,
    /// Lines that are not valid jobs (each reported on stderr with its number).
    pub invalid: usize,
    /// Lines whose `custom_id` already has a result in the output.
    pub already_done: usize,
}

/// The longest result line OUT may hold: an answer of at most 8 MiB, escaped (a control
/// character takes 6 bytes), in its envelope.
const MAX_RESULT_LINE_BYTES: u64 = 64 << 20;

/// How every result line this service writes begins (`JobResult`'s first field).
const RESULT_START: &[u8] = b"{\"id\":\"";

/// Whether `line` is a result this service wrote (contract §3), not just any JSON.
fn is_result(line: &Value) -> bool {
    let Some(fields) = line.as_object() else { return false };
    fields.get("id").is_some_and(Value::is_string)
        && fields.get("custom_id").is_some_and(|c| c.is_string() || c.is_null())
        && fields.contains_key("response")
        && fields.contains_key("error")
        && fields.get("routing").is_some_and(Value::is_object)
}

/// Opens OUT (and ERR) and reads the input ([`Output::open`], [`read_input`]) on a blocking
/// thread, as long as no stop is asked for: opening a FIFO waits for its reader and reading a
/// pipe for its writer, and a stop request (SIGTERM, Ctrl-C) must still end the command then.
pub async fn open_backlog(
    shutdown: &CancellationToken,
    out: &Path,
    errors: Option<&Path>,
    input: &Path,
    chains: BTreeSet<String>,
    max_line_bytes: Option<usize>,
) -> anyhow::Result<(Output, Backlog)> {
    let (out, errors, input) = (out.to_path_buf(), errors.map(Path::to_path_buf), input.to_path_buf());
    let opening = tokio::task::spawn_blocking(move || {
        let output = Output::open(&out, errors.as_deref())?;
        let backlog = read_input(&input, output.done(), &chains, max_line_bytes)?;
        anyhow::Ok((output, backlog))
    });
    tokio::select! {
        opened = opening => opened.context("opening the input and output files")?,
        () = shutdown.cancelled() => anyhow::bail!("interrupted while opening the input and output files"),
    }
}

/// The longest input line `batch` reads (it has no broker, so no `amqp.max_message_bytes`):
/// past it a line is reported and skipped without being held, so that no input (a device, a
/// pipe that never sends a newline) can take the process's memory.
pub const MAX_INPUT_LINE_BYTES: usize = 256 << 20;

/// Reads `path`; invalid lines (bad JSON or UTF-8, contract §2, unknown chain, a repeated
/// `custom_id`, more than `max_line_bytes` when given, else more than [`MAX_INPUT_LINE_BYTES`])
/// are reported as `FILE:LINE: problem` and skipped. A byte-order mark before the first line is
/// not part of it (editors on Windows write one).
///
/// `max_line_bytes` is for `enqueue`: a worker refuses a message over `amqp.max_message_bytes`
/// before reading it, so its error result cannot name the line; refusing the line here, with its
/// number, is clearer than publishing a job that is bound to fail.
pub fn read_input(
    path: &Path,
    done: &HashSet<String>,
    chains: &BTreeSet<String>,
    max_line_bytes: Option<usize>,
) -> anyhow::Result<Backlog> {
    let file = File::open(path).with_context(|| format!("cannot open the input {}", path.display()))?;
    let longest = max_line_bytes.unwrap_or(MAX_INPUT_LINE_BYTES);
    let mut lines = BoundedLines::new(BufReader::new(file), longest);
    let mut backlog = Backlog::default();
    let mut seen = HashSet::new();
    let mut number = 0usize;
    while let Some(line) = lines
        .next_line()
        .with_context(|| format!("cannot read {} at line {}", path.display(), number.saturating_add(1)))?
    {
        number = number.saturating_add(1);
        let raw = match line {
            InputLine::Text(raw) => raw,
            InputLine::NotUtf8 => {
                report(path, number, "the line is not valid UTF-8", &mut backlog);
                continue;
            }
            InputLine::TooLong { bytes } => {
                let problem = match max_line_bytes {
                    Some(limit) => format!(
                        "the line has {bytes} bytes, more than amqp.max_message_bytes ({limit}): a worker would refuse it"
                    ),
                    None => format!("the line has {bytes} bytes, more than the {longest} a line may have"),
                };
                report(path, number, &problem, &mut backlog);
                continue;
            }
        };
        if raw.trim().is_empty() {
            continue;
        }
        let problem = match Job::parse(raw.as_bytes()) {
            Err(invalid) => Some(invalid.message),
            Ok(job) if !chains.contains(&job.chain) => Some(format!("unknown chain `{}`", job.chain)),
            Ok(job) if !seen.insert(job.custom_id.clone()) => {
                Some(format!("`custom_id` \"{}\" is repeated", job.custom_id))
            }
            Ok(job) if done.contains(&job.custom_id) => {
                backlog.already_done += 1;
                None
            }
            Ok(job) => {
                backlog.pending.push(Line { number, job, raw });
                None
            }
        };
        if let Some(problem) = problem {
            report(path, number, &problem, &mut backlog);
        }
    }
    Ok(backlog)
}

/// Reports an invalid input line by its number and counts it.
fn report(path: &Path, number: usize, problem: &str, backlog: &mut Backlog) {
    eprintln!("{}:{number}: {problem}", path.display());
    backlog.invalid += 1;
}

/// One line of an input file, as [`BoundedLines`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputLine {
    /// Its text, without the `\n` or `\r\n` that ended it (nor, on the first line, a
    /// byte-order mark).
    Text(String),
    /// Bytes that are not UTF-8.
    NotUtf8,
    /// Longer than the reader's bound: skipped, not held (`bytes` read, without the `\n`).
    TooLong { bytes: usize },
}

/// The lines of a reader, each held in memory only up to a bound (`BufRead::lines` holds a
/// line whatever its length, and gives up on the whole input at the first byte that is not
/// UTF-8). The bound is on the line as published: a `\r` before its `\n` and a byte-order mark
/// before the first line are not part of it.
pub struct BoundedLines<R> {
    reader: R,
    longest: usize,
    line: Vec<u8>,
    first: bool,
}

/// What a line may hold beyond its bound while it is read: a byte-order mark and a `\r`.
const LINE_SLACK: usize = BOM.len() + 1;

const BOM: &[u8] = "\u{feff}".as_bytes();

impl<R: BufRead> BoundedLines<R> {
    pub fn new(reader: R, longest: usize) -> BoundedLines<R> {
        BoundedLines { reader, longest, line: Vec::new(), first: true }
    }

    /// The next line, `None` at the end of the input.
    pub fn next_line(&mut self) -> std::io::Result<Option<InputLine>> {
        self.line.clear();
        let held = self.longest.saturating_add(LINE_SLACK);
        let (mut bytes, mut ended, mut any) = (0usize, false, false);
        while !ended {
            let available = match self.reader.fill_buf() {
                Ok(available) => available,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                break;
            }
            any = true;
            let (content, used) = match available.iter().position(|b| *b == b'\n') {
                Some(at) => {
                    ended = true;
                    (available.get(..at).unwrap_or(available), at.saturating_add(1))
                }
                None => (available, available.len()),
            };
            bytes = bytes.saturating_add(content.len());
            if bytes <= held {
                self.line.extend_from_slice(content);
            } else {
                self.line = Vec::new();
            }
            self.reader.consume(used);
        }
        if !any {
            return Ok(None);
        }
        let first = std::mem::replace(&mut self.first, false);
        if bytes > held {
            return Ok(Some(InputLine::TooLong { bytes }));
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        if first && self.line.starts_with(BOM) {
            self.line.drain(..BOM.len());
        }
        if self.line.len() > self.longest {
            return Ok(Some(InputLine::TooLong { bytes }));
        }
        Ok(Some(match String::from_utf8(std::mem::take(&mut self.line)) {
            Ok(text) => InputLine::Text(text),
            Err(_) => InputLine::NotUtf8,
        }))
    }
}

/// The output file(s): successes to OUT, failures to ERR when given (else OUT too).
pub struct Output {
    out: (File, std::path::PathBuf),
    errors: Option<(File, std::path::PathBuf)>,
    /// `custom_id`s with a result already written (from earlier runs too).
    written: HashSet<String>,
    pub succeeded: usize,
    pub failed: usize,
}

impl Output {
    /// Opens (or creates) the files, reading what earlier runs wrote. A torn last line (the
    /// previous run was killed mid-write) is cut off.
    pub fn open(out: &Path, errors: Option<&Path>) -> anyhow::Result<Output> {
        let (file, regular) = open_for_append(out)?;
        let mut output =
            Output { out: (file, out.into()), errors: None, written: HashSet::new(), succeeded: 0, failed: 0 };
        if regular {
            output.load(out)?;
        }
        // ERR naming OUT itself (the same path, a link, `/dev/stdout` and `/dev/stderr` sent to
        // one file): one file, written through one handle.
        if let Some(path) = errors.filter(|path| !same_file(out, path)) {
            let (file, regular) = open_for_append(path)?;
            output.errors = Some((file, path.into()));
            if regular {
                output.load(path)?;
            }
        }
        Ok(output)
    }

    /// Reads the results an earlier run wrote to the regular file `path` (only such a file
    /// holds any: a device or a pipe named as OUT, `/dev/stdout`, `/dev/full`, is written to,
    /// never read — `/dev/zero` would be read for ever — nor cut). A line that is not a result (this
    /// service's: an object with its `id`, `custom_id`, `response`, `error` and `routing`), or
    /// longer than any result can be, means the file is not one of results — the jobs file
    /// named as OUT by mistake, a user's file: it is left as it is and the run refused. The only
    /// line cut is a last one without its newline that a result began (`{"id":"`) and did not
    /// finish: a run killed mid-write.
    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut reader = BufReader::new(&mut file);
        let (mut good_len, mut number) = (0u64, 0usize);
        let not_results = |number: usize| {
            anyhow::anyhow!(
                "{}:{number}: not a result line: this file was not written by enqueue or batch (left as it is); name another",
                path.display()
            )
        };
        let mut line = Vec::new();
        let torn = loop {
            line.clear();
            let read = (&mut reader)
                .take(MAX_RESULT_LINE_BYTES.saturating_add(1))
                .read_until(b'\n', &mut line)
                .with_context(|| format!("{}: cannot read the results of an earlier run", path.display()))?;
            if read == 0 {
                break false;
            }
            number = number.saturating_add(1);
            let complete = line.ends_with(b"\n");
            if line.len() as u64 > MAX_RESULT_LINE_BYTES {
                return Err(not_results(number));
            }
            if line.trim_ascii().is_empty() && complete {
                good_len = good_len.saturating_add(read as u64);
                continue;
            }
            match serde_json::from_slice::<Value>(&line) {
                Ok(result) if is_result(&result) => self.remember(&result),
                // A result's start, cut anywhere (even within `{"id":"` itself).
                Err(_) if !complete && (line.starts_with(RESULT_START) || RESULT_START.starts_with(&line)) => {
                    break true;
                }
                _ => return Err(not_results(number)),
            }
            good_len = good_len.saturating_add(read as u64);
            if !complete {
                break false;
            }
        };
        drop(reader);
        if torn {
            eprintln!("{}: cutting off an incomplete last line left by an interrupted run", path.display());
            file.set_len(good_len)?;
        } else if !line.is_empty() && !line.ends_with(b"\n") {
            // A whole last result without its newline: ended, so the next one starts a line.
            file.seek(SeekFrom::End(0))?;
            file.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Counts a result line of an earlier run: its `custom_id` is done.
    fn remember(&mut self, result: &Value) {
        if let Some(id) = result.get("custom_id").and_then(Value::as_str)
            && self.written.insert(id.to_string())
        {
            if result.get("error").is_some_and(|e| !e.is_null()) { self.failed += 1 } else { self.succeeded += 1 }
        }
    }

    pub fn done(&self) -> &HashSet<String> {
        &self.written
    }

    /// Appends a result unless its `custom_id` already has one; returns whether it was new.
    pub fn write(&mut self, result: &JobResult) -> anyhow::Result<bool> {
        let Some(id) = result.custom_id.clone() else { return Ok(false) };
        if !self.written.insert(id) {
            return Ok(false);
        }
        let mut line = serde_json::to_vec(result)?;
        line.push(b'\n');
        let (file, path) = match (&mut self.errors, result.is_success()) {
            (Some(errors), false) => errors,
            _ => &mut self.out,
        };
        file.write_all(&line)
            .and_then(|()| file.flush())
            .with_context(|| format!("cannot write a result to {}", path.display()))?;
        if result.is_success() {
            self.succeeded += 1
        } else {
            self.failed += 1
        }
        Ok(true)
    }
}

/// Whether two paths name one file (device and inode); unknown (unreadable) is "no".
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        a == b
    }
}

/// Opens an output file to append to, and holds it for this run alone: a second run on the
/// same file (the command started twice) would resume from what the first is still writing and
/// could take a result it is halfway through for one an interrupted run left torn, and cut it.
/// Also answers whether it is a regular file (the only kind that holds earlier results).
fn open_for_append(path: &Path) -> anyhow::Result<(File, bool)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))?;
    let regular = file.metadata()?.is_file();
    if regular {
        lock_for_this_run(&file, path)?;
    }
    Ok((file, regular))
}

/// Only "held elsewhere" refuses the run: a file system that cannot lock (NFS without its lock
/// daemon, Lustre without `-o flock`, some FUSE mounts) keeps working as before the lock, with
/// a warning that a second run would not be noticed.
#[cfg(unix)]
fn lock_for_this_run(file: &File, path: &Path) -> anyhow::Result<()> {
    use rustix::fs::{FlockOperation, flock};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            anyhow::bail!("{} is in use by another run (enqueue or batch): wait for it to end", path.display())
        }
        Err(e) => {
            eprintln!(
                "{}: cannot be locked ({e}): a second run on it at the same time would not be noticed",
                path.display()
            );
            Ok(())
        }
    }
}

#[cfg(not(unix))]
fn lock_for_this_run(_file: &File, _path: &Path) -> anyhow::Result<()> {
    Ok(())
}

/// Progress: a bar on a terminal, a plain line every 10 s otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            let style = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} done, {msg} {per_sec} ETA {eta}")
                .expect("static template is valid");
            bar.set_style(style);
            bar
        });
        Progress { bar, total, started: Instant::now(), last_line: Instant::now() }
    }

    pub fn update(&mut self, done: usize, failed: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(format!("{failed} failed,"));
        } else if self.last_line.elapsed() >= Duration::from_secs(10) || done == self.total {
            self.last_line = Instant::now();
            let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = done as f64 / elapsed;
            let eta =
                if rate > 0.0 { Duration::from_secs_f64((self.total - done) as f64 / rate) } else { Duration::ZERO };
            eprintln!(
                "progress: {done}/{} done, {failed} failed, {rate:.1}/s, ETA {}",
                self.total,
                humantime::format_duration(Duration::from_secs(eta.as_secs()))
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// The summary line and exit code (contract §1): 0 only when every line has a successful result.
/// `unanswered` lines (the run gave up waiting for them) count against success like failures:
/// the run is over, but not every line got a result.
pub fn conclude(backlog: &Backlog, output: &Output, unanswered: usize) -> ExitCode {
    eprintln!(
        "{} succeeded, {} failed, {} invalid line(s){}{}",
        output.succeeded,
        output.failed,
        backlog.invalid,
        if unanswered > 0 { format!(", {unanswered} without a result") } else { String::new() },
        if backlog.already_done > 0 {
            format!(" ({} done by an earlier run)", backlog.already_done)
        } else {
            String::new()
        }
    );
    if backlog.invalid == 0 && output.failed == 0 && unanswered == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Just;

    /// A file in a directory of its own, removed with it when the test ends (passed or not).
    struct TempFile {
        path: std::path::PathBuf,
    }

    impl std::ops::Deref for TempFile {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.path
        }
    }

    impl AsRef<Path> for TempFile {
        fn as_ref(&self) -> &Path {
            &self.path
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn temp(name: &str, content: &str) -> TempFile {
        let dir = std::env::temp_dir().join(format!("fw-backlog-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        TempFile { path }
    }

    #[test]
    fn invalid_repeated_and_done_lines_are_set_aside() {
        let input = temp(
            "in.jsonl",
            concat!(
                "{\"custom_id\":\"a\",\"body\":{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}\n",
                "not json\n",
                "\n",
                "{\"custom_id\":\"a\",\"body\":{\"messages\":[{\"role\":\"user\",\"content\":\"y\"}]}}\n",
                "{\"custom_id\":\"b\",\"chain\":\"nope\",\"body\":{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}\n",
                "{\"custom_id\":\"c\",\"body\":{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}\n",
            ),
        );
        let done: HashSet<String> = ["c".to_string()].into();
        let chains: BTreeSet<String> = ["default".to_string()].into();
        let backlog = read_input(&input, &done, &chains, None).unwrap();
        assert_eq!(
            backlog.pending.iter().map(|l| (l.number, l.job.custom_id.as_str())).collect::<Vec<_>>(),
            vec![(1, "a")]
        );
        assert_eq!(backlog.invalid, 3);
        assert_eq!(backlog.already_done, 1);
    }

    #[test]
    fn lines_over_the_size_limit_are_invalid_with_their_number() {
        let small = "{\"custom_id\":\"a\",\"body\":{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}";
        let big = format!(
            "{{\"custom_id\":\"big\",\"body\":{{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}}}",
            "x".repeat(200)
        );
        let input = temp("in.jsonl", &format!("{small}\n{big}\n"));
        let chains: BTreeSet<String> = ["default".to_string()].into();
        let limit = small.len().max(100);
        let backlog = read_input(&input, &HashSet::new(), &chains, Some(limit)).unwrap();
        assert_eq!(backlog.pending.iter().map(|l| l.number).collect::<Vec<_>>(), vec![1]);
        assert_eq!(backlog.invalid, 1, "the big line is counted as invalid");
        // Exactly at the limit is allowed, as in the worker (`len > max_message_bytes` is refused).
        let exact = read_input(&input, &HashSet::new(), &chains, Some(big.len())).unwrap();
        assert_eq!(exact.pending.len(), 2);
        assert_eq!(exact.invalid, 0);
        // `batch` has no broker and no such limit.
        let unlimited = read_input(&input, &HashSet::new(), &chains, None).unwrap();
        assert_eq!(unlimited.pending.len(), 2);
    }

    #[test]
    fn resuming_reads_earlier_results_and_cuts_a_torn_line() {
        let (a, b) = (result_line("a", false), result_line("b", true));
        let torn = &result_line("c", false)[..40];
        let out = temp("out.jsonl", &format!("{a}\n{b}\n{torn}"));
        let output = Output::open(&out, None).unwrap();
        assert_eq!(output.done().len(), 2);
        assert_eq!((output.succeeded, output.failed), (1, 1));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("{a}\n{b}\n"), "the torn line is gone");
    }

    /// One result line as this service writes it.
    fn result_line(custom_id: &str, failed: bool) -> String {
        let mut result = error_result(custom_id);
        if !failed {
            result.error = None;
            result.response = Some(crate::job::ResponseEnvelope {
                status_code: 200,
                request_id: "r".into(),
                body: serde_json::json!({"object": "chat.completion", "choices": []}),
            });
        }
        serde_json::to_string(&result).unwrap()
    }

    fn chains() -> BTreeSet<String> {
        ["default".to_string()].into()
    }

    fn job_line(id: &str) -> String {
        format!("{{\"custom_id\":\"{id}\",\"body\":{{\"messages\":[{{\"role\":\"user\",\"content\":\"é\"}}]}}}}")
    }

    #[test]
    fn a_byte_order_mark_bad_utf8_and_an_overlong_line_are_each_one_invalid_line() {
        let mut bytes = format!("\u{feff}{}\n", job_line("a")).into_bytes();
        bytes.extend_from_slice(b"{\"custom_id\":\"\xff\xfe\"}\n");
        bytes.extend_from_slice(format!("{}\r\n", job_line(&"x".repeat(300))).as_bytes());
        bytes.extend_from_slice(format!("{}\n", job_line("b")).as_bytes());
        let dir = temp("in.jsonl", "");
        std::fs::write(&dir.path, &bytes).unwrap();
        let backlog = read_input(&dir, &HashSet::new(), &chains(), Some(200)).unwrap();
        assert_eq!(
            backlog.pending.iter().map(|l| (l.number, l.job.custom_id.as_str())).collect::<Vec<_>>(),
            vec![(1, "a"), (4, "b")],
            "the BOM is not part of line 1; lines 2 and 3 are reported, the rest still read"
        );
        assert_eq!(backlog.invalid, 2);
    }

    /// What [`BoundedLines`] must give for `input`: split at `\n`, a `\r` before it and a BOM
    /// before the first dropped, and only then held to the bound; no line for a final empty piece.
    fn expected_lines(input: &[u8], longest: usize) -> Vec<InputLine> {
        let mut pieces: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
        if pieces.last().is_some_and(|p| p.is_empty()) {
            pieces.pop();
        }
        pieces
            .into_iter()
            .enumerate()
            .map(|(index, piece)| {
                let mut line = piece.strip_suffix(b"\r").unwrap_or(piece);
                if index == 0 {
                    line = line.strip_prefix(BOM).unwrap_or(line);
                }
                if line.len() > longest {
                    return InputLine::TooLong { bytes: piece.len() };
                }
                String::from_utf8(line.to_vec()).map_or(InputLine::NotUtf8, InputLine::Text)
            })
            .collect()
    }

    proptest::proptest! {
        /// Whatever the bytes, the bound and where the reader's buffer splits them, every line
        /// comes out as a plain split says.
        #[test]
        fn bounded_lines_split_any_input_as_a_plain_split_does(
            input in proptest::collection::vec(
                proptest::prop_oneof![
                    Just(b'\n'), Just(b'\r'), Just(b'a'), Just(0xc3u8), Just(0xa9u8), Just(0xffu8),
                    Just(0xefu8), Just(0xbbu8), Just(0xbfu8)
                ],
                0..200,
            ),
            longest in 0usize..40,
            buffer in 1usize..17,
        ) {
            let mut lines = BoundedLines::new(BufReader::with_capacity(buffer, input.as_slice()), longest);
            let mut got = Vec::new();
            while let Some(line) = lines.next_line().unwrap() {
                got.push(line);
            }
            proptest::prop_assert_eq!(got, expected_lines(&input, longest));
        }
    }

    #[test]
    fn a_file_that_is_not_results_is_refused_and_left_as_it_is() {
        let notes = "my notes\n{\"custom_id\":\"a\"}\nno newline at the end";
        let out = temp("notes.txt", notes);
        let refused = Output::open(&out, None).err().expect("not a file of results");
        assert!(refused.to_string().contains("notes.txt:1: not a result line"), "{refused}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), notes, "nothing cut");
        let binary = temp("blob", "");
        std::fs::write(&binary.path, b"\x00\xffbinary without a newline").unwrap();
        assert!(Output::open(&binary, None).is_err());
        assert_eq!(std::fs::read(&binary).unwrap(), b"\x00\xffbinary without a newline");
    }

    #[test]
    fn a_torn_result_is_cut_even_mid_character_and_a_whole_one_is_ended() {
        let torn = temp("torn.jsonl", "");
        let a = result_line("a", false);
        let mut bytes = format!("{a}\n{{\"id\":\"res_2\",\"custom_id\":\"b\",\"x\":\"").into_bytes();
        bytes.push(0xc3); // the first byte of `é`: the run died between its two bytes
        std::fs::write(&torn.path, &bytes).unwrap();
        let output = Output::open(&torn, None).unwrap();
        assert_eq!(output.done().iter().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(std::fs::read_to_string(&torn).unwrap(), format!("{a}\n"));

        let whole = temp("whole.jsonl", &a);
        let output = Output::open(&whole, None).unwrap();
        assert_eq!(output.done().len(), 1);
        assert_eq!(std::fs::read_to_string(&whole).unwrap(), format!("{a}\n"));

        // JSON, but not results: the jobs file named as OUT, a user's JSON lines.
        for other in ["{\"custom_id\":\"a\",\"error\":null}\n", "{\"id\":\"x\"}\n", "[1]\n"] {
            let file = temp("other.jsonl", other);
            assert!(Output::open(&file, None).is_err(), "{other}");
            assert_eq!(std::fs::read_to_string(&file).unwrap(), other);
        }
    }

    /// A device as OUT (`/dev/full` reads as endless zeros) is not read; a write it refuses is
    /// reported with the file's name.
    #[test]
    fn a_full_device_as_out_fails_the_write_naming_it() {
        let mut output = Output::open(Path::new("/dev/full"), None).unwrap();
        let refused = output.write(&error_result("a")).unwrap_err();
        assert!(format!("{refused:#}").contains("cannot write a result to /dev/full: No space left"), "{refused:#}");
    }

    fn error_result(custom_id: &str) -> JobResult {
        serde_json::from_value(serde_json::json!({
            "id": "res_1", "custom_id": custom_id, "response": null,
            "error": {"code": "invalid_request", "message": "m"},
            "routing": {"chain": null, "provider": null, "model": null, "free": null, "attempts": [],
                        "worker": "w", "queued_ms": 0, "total_ms": 0}
        }))
        .unwrap()
    }

    /// A pipe named as OUT is written to, not read: reading it would wait for ever (our own
    /// handle keeps it open), as `/dev/zero` would fill the memory.
    #[test]
    fn a_pipe_named_as_out_is_written_to_not_read() {
        let fifo = temp("fifo", "");
        std::fs::remove_file(&fifo.path).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&fifo.path).status().unwrap();
        assert!(made.success());
        let path = fifo.path.clone();
        let reader = std::thread::spawn(move || std::fs::read_to_string(path).unwrap());
        let (opened, open) = std::sync::mpsc::channel();
        let path = fifo.path.clone();
        std::thread::spawn(move || {
            let output = Output::open(&path, None);
            let _ = opened.send(output);
        });
        let mut output =
            open.recv_timeout(Duration::from_secs(30)).expect("Output::open returns without reading the pipe").unwrap();
        assert!(output.write(&error_result("a")).unwrap());
        drop(output);
        let written = reader.join().unwrap();
        assert!(written.starts_with("{\"id\":\"res_1\",\"custom_id\":\"a\""), "{written}");
    }
}
