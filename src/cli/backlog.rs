//! What `enqueue` and `batch` share: reading an OpenAI-Batch input file, resuming from the
//! output already written, writing result lines as they arrive, and showing progress.

use std::collections::{BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

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

/// Reads `path`; invalid lines (bad JSON, contract §2, unknown chain, a repeated `custom_id`,
/// more than `max_line_bytes` when given) are reported as `FILE:LINE: problem` and skipped.
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
    let mut backlog = Backlog::default();
    let mut seen = HashSet::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let number = index + 1;
        let raw = line.with_context(|| format!("cannot read {} at line {number}", path.display()))?;
        if raw.trim().is_empty() {
            continue;
        }
        let too_big = max_line_bytes.filter(|limit| raw.len() > *limit).map(|limit| {
            format!(
                "the line has {} bytes, more than amqp.max_message_bytes ({limit}): a worker would refuse it",
                raw.len()
            )
        });
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
            Ok(_) if too_big.is_some() => too_big,
            Ok(job) => {
                backlog.pending.push(Line { number, job, raw });
                None
            }
        };
        if let Some(problem) = problem {
            eprintln!("{}:{number}: {problem}", path.display());
            backlog.invalid += 1;
        }
    }
    Ok(backlog)
}

/// The output file(s): successes to OUT, failures to ERR when given (else OUT too).
pub struct Output {
    out: File,
    errors: Option<File>,
    /// `custom_id`s with a result already written (from earlier runs too).
    written: HashSet<String>,
    pub succeeded: usize,
    pub failed: usize,
}

impl Output {
    /// Opens (or creates) the files, reading what earlier runs wrote. A torn last line (the
    /// previous run was killed mid-write) is cut off.
    pub fn open(out: &Path, errors: Option<&Path>) -> anyhow::Result<Output> {
        let mut output =
            Output { out: open_for_append(out)?, errors: None, written: HashSet::new(), succeeded: 0, failed: 0 };
        output.load(out)?;
        if let Some(path) = errors {
            output.errors = Some(open_for_append(path)?);
            output.load(path)?;
        }
        Ok(output)
    }

    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut reader = BufReader::new(&mut file);
        let mut good_len = 0u64;
        let mut text = String::new();
        loop {
            text.clear();
            let read = reader.read_line(&mut text)?;
            if read == 0 {
                break;
            }
            let Ok(line) = serde_json::from_str::<Value>(&text) else { break };
            if !text.ends_with('\n') {
                break;
            }
            good_len += read as u64;
            if let Some(id) = line.get("custom_id").and_then(Value::as_str)
                && self.written.insert(id.to_string())
            {
                if line.get("error").is_some_and(|e| !e.is_null()) { self.failed += 1 } else { self.succeeded += 1 }
            }
        }
        drop(reader);
        if file.metadata()?.len() > good_len {
            eprintln!("{}: cutting off an incomplete last line left by an interrupted run", path.display());
            file.set_len(good_len)?;
            file.seek(SeekFrom::End(0))?;
        }
        Ok(())
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
        let file = match (&mut self.errors, result.is_success()) {
            (Some(errors), false) => errors,
            _ => &mut self.out,
        };
        file.write_all(&line)?;
        file.flush()?;
        if result.is_success() {
            self.succeeded += 1
        } else {
            self.failed += 1
        }
        Ok(true)
    }
}

fn open_for_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))
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
        let out = temp(
            "out.jsonl",
            "{\"custom_id\":\"a\",\"error\":null}\n{\"custom_id\":\"b\",\"error\":{\"code\":\"x\"}}\n{\"custom_id\":\"c\",\"err",
        );
        let output = Output::open(&out, None).unwrap();
        assert_eq!(output.done().len(), 2);
        assert_eq!((output.succeeded, output.failed), (1, 1));
        assert!(std::fs::read_to_string(&out).unwrap().ends_with("}\n"), "the torn line is gone");
    }
}
