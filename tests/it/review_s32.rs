//! Adversarial review, session 32, of 1c4290a..2ab7c24 (bounded input lines and OUT resume,
//! SIGTERM from the start of `service()`, pools shown `cooling`, timeouts together cooling a
//! provider at once, config floors, the pod's memory limit).
//!
//! Every test below fails on 2ab7c24. The chain finding (a 408 is taken for a hang) is in
//! `src/chain/tests.rs` (`review32_*`), where the scripted providers and the manual clock are.
//! Regressions of this range: the two signal tests (checked by hand against 1c4290a's binary:
//! killed by SIGTERM there, hung here) and the CRLF line at the limit. The others are claims of
//! the range that do not hold (a file that is not results "refused and left untouched"; pools
//! "cooling" when nothing can draw; a retention floor "so ledger rows outlive their waits").
//!
//! Observations that are not tests:
//! - `a_full_device_as_out_fails_the_write_naming_it` (src/cli/backlog.rs), should the fix
//!   regress, reads `/dev/full` without bound: the commit says that took 24 GB and the OOM
//!   killer. A test that fails by exhausting a shared machine's memory wants a bound of its own
//!   (a thread and a timeout, or `RLIMIT_AS` in a child).
//! - `bounded_lines_split_any_input_as_a_plain_split_does`'s oracle measures a piece before
//!   stripping its `\r`: it encodes the off-by-`\r` bound rather than catching it.
//! - deploy: limits 1536Mi with requests 64Mi is a 24x overcommit the scheduler does not see;
//!   jobs with `on_all_rejected = "best"` may hold a kept answer while the next provider's is
//!   parsed, two near-cap answers per job, which the 40 MB/job figure does not count (not
//!   measured here).

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

use fallback_worker::cli::backlog::{Output, read_input};
use fallback_worker::config::{Config, EnvOverrides};

use crate::support::{ScratchDir, WorkerProcess, exit_within};

fn chains() -> BTreeSet<String> {
    ["default".to_string()].into()
}

fn job_line(id: &str, content: &str) -> String {
    format!("{{\"custom_id\":\"{id}\",\"body\":{{\"messages\":[{{\"role\":\"user\",\"content\":\"{content}\"}}]}}}}")
}

/// Finding (high): `Output::load` takes any JSON line for a result. The input file itself named
/// as OUT (a swapped or mistyped argument: `batch jobs.jsonl --out jobs.jsonl`) is "resumed":
/// every job line has a `custom_id` and no `error`, so each is counted as succeeded, the whole
/// input is "done by an earlier run", and `batch`/`enqueue` exit 0 having called nothing. The
/// README says "a file ... that is not results is refused and left untouched".
#[test]
fn review32_the_input_file_named_as_out_is_refused_not_counted_as_results() {
    let dir = ScratchDir::new("review32-jobs-as-out");
    let text = format!("{}\n{}\n", job_line("a", "hi"), job_line("b", "ho"));
    let jobs = dir.file("jobs.jsonl", text.as_bytes());
    match Output::open(&jobs, None) {
        Err(refused) => assert!(refused.to_string().contains("jobs.jsonl"), "{refused:#}"),
        Ok(output) => {
            let backlog = read_input(&jobs, output.done(), &chains(), None).unwrap();
            panic!(
                "a file of jobs was taken for results: {} counted succeeded, {} line(s) of {} skipped as done, {} left to run",
                output.succeeded,
                backlog.already_done,
                2,
                backlog.pending.len()
            );
        }
    }
    assert_eq!(std::fs::read_to_string(&jobs).unwrap(), text, "left as it is");
}

/// Finding (high: a user's file destroyed): a file of one line without a newline that begins
/// with `{` and is not strict JSON (JSON5, a trailing comma, a JS object) is taken for a result
/// torn by an interrupted run and cut: `set_len(0)`, the whole file is gone. The commit says a
/// file that is not results is "refused and left untouched".
#[test]
fn review32_a_one_line_file_that_is_not_strict_json_is_not_erased() {
    let dir = ScratchDir::new("review32-json5");
    let settings = "{theme: \"dark\", fontSize: 14, plugins: [\"a\", \"b\"],}";
    let path = dir.file("settings.json5", settings.as_bytes());
    let opened = Output::open(&path, None);
    let left = std::fs::read_to_string(&path).unwrap();
    assert_eq!(left, settings, "the user's file was cut to {} bytes (opened: {:?})", left.len(), opened.is_ok());
    assert!(opened.is_err(), "not a file of results: refused");
}

/// Finding (medium, regression): the bound counts the `\r` of a CRLF line and a first line's
/// byte-order mark, neither of which is published. A line of exactly `amqp.max_message_bytes`
/// was accepted before e21a54e (`lines()` strips the `\r`, the check was on the text) and is now
/// refused as too long when the file has Windows line endings or a BOM. (The proptest's oracle,
/// `expected_lines`, measures the piece before stripping `\r`, so it agrees with the bug.)
#[test]
fn review32_a_crlf_or_bom_line_of_exactly_the_limit_is_not_too_long() {
    let dir = ScratchDir::new("review32-crlf-limit");
    let line = job_line("a", "padding");
    let limit = line.len();
    let crlf = dir.file("crlf.jsonl", format!("{line}\r\n").as_bytes());
    let backlog = read_input(&crlf, &HashSet::new(), &chains(), Some(limit)).unwrap();
    assert_eq!((backlog.pending.len(), backlog.invalid), (1, 0), "a CRLF line of {limit} bytes, limit {limit}");
    let bom = dir.file("bom.jsonl", format!("\u{feff}{line}\n").as_bytes());
    let backlog = read_input(&bom, &HashSet::new(), &chains(), Some(limit)).unwrap();
    assert_eq!((backlog.pending.len(), backlog.invalid), (1, 0), "a BOM line of {limit} bytes, limit {limit}");
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Finding (medium): OUT/ERR are read with an unbounded `read_until`, so a regular file with no
/// newline is held whole: a sparse file (`truncate -s 100G`), a VM image, any big blob named as
/// OUT takes the memory the commit keeps `/dev/zero` from taking. 2 GiB of holes here (no disk
/// used); the peak RSS must not grow by the file's size.
#[test]
fn review32_a_huge_out_file_without_newlines_is_not_read_whole() {
    let dir = ScratchDir::new("review32-sparse");
    let path = dir.file("out.jsonl", b"");
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(2 << 30).unwrap();
    let before = peak_rss_kib();
    let opened = Output::open(&path, None);
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    assert!(opened.is_err(), "zeros are not results");
    assert!(grown_mib < 1024, "reading OUT raised the peak RSS by {grown_mib} MiB");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 30, "left as it is");
}

/// Finding (high for operators, regression of a3972fd): SIGTERM/SIGINT are now caught before
/// the config is read, but nothing acts on them until the config is loaded. A config read that
/// blocks (a FIFO nobody writes, `--config /dev/stdin` at a terminal, a hung NFS mount) now
/// ignores SIGTERM and Ctrl-C altogether; before a3972fd the signal ended the process at once.
/// Kubernetes then waits `terminationGracePeriodSeconds` and SIGKILLs.
#[tokio::test]
async fn review32_a_sigterm_while_the_config_read_blocks_still_stops_the_process() {
    let dir = ScratchDir::new("review32-fifo-config");
    let fifo = dir.0.join("config.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut worker = WorkerProcess::spawn(&fifo);
    let path = fifo.clone();
    let open = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(path));
    // The writer is held open and nothing is written: the worker's read blocks.
    let _writer = tokio::time::timeout(Duration::from_secs(30), open)
        .await
        .expect("the worker opens its config")
        .unwrap()
        .unwrap();
    worker.signal("TERM");
    let status = exit_within(&mut worker.child, Duration::from_secs(10));
    assert!(status.is_some(), "SIGTERM was swallowed: the worker still waits for its config 10 s later");
}

/// Finding (low): 1a342a0 refuses `worker.result_retention` under 1h because "a retention
/// shorter than their wait forgets them" (jobs still running or parked), yet the default
/// `max_wait_limit` is 24h: a job may wait 24h, its ledger row is pruned after 1h, and its
/// redelivery calls a provider again. The floor does not cover the case it names.
#[test]
fn review32_a_retention_shorter_than_a_chains_max_wait_limit_is_refused() {
    let text = r#"
[worker]
result_retention = "1h"

[[providers]]
name = "groq"
base_url = "https://api.groq.com/openai/v1"
model = "m"
free = true

[chains.default]
providers = ["groq"]
max_wait_limit = "24h"
"#;
    let parsed = Config::parse(text, Path::new("review32.toml"), &EnvOverrides::default());
    assert!(parsed.is_err(), "a job may wait 24h but its ledger row is kept 1h");
}

/// Finding (high for users, regression of a3972fd): before it, the handler was registered by a
/// task the runtime first polled at the command's first `.await`, so a Ctrl-C while `batch` or
/// `enqueue` was still blocked in its synchronous start (opening a FIFO named as OUT whose
/// reader has not come, reading `/dev/stdin` or a FIFO as input) ended the process. Now the
/// handler is registered before anything and only polled later: Ctrl-C (and SIGTERM) do
/// nothing, the command hangs until the open or read returns by itself. SIGTERM is sent here:
/// a test runner started in the background inherits SIGINT ignored, which would hide the
/// difference (checked by hand against 1c4290a's binary: exit by SIGTERM there, a hang here).
#[test]
fn review32_a_signal_while_batch_opens_a_fifo_out_still_stops_it() {
    let dir = ScratchDir::new("review32-fifo-out");
    let config = dir.file(
        "fallback.toml",
        b"[[providers]]\nname = \"p\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\nfree = true\n\n[chains.default]\nproviders = [\"p\"]\n",
    );
    let input = dir.file("in.jsonl", format!("{}\n", job_line("a", "hi")).as_bytes());
    let fifo = dir.0.join("out.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-worker"))
        .args(["--config", config.to_str().unwrap(), "batch", input.to_str().unwrap(), "--out", fifo.to_str().unwrap()])
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until_blocked_in_open(child.id());
    let sent = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let status = exit_within(&mut child, Duration::from_secs(10));
    assert!(status.is_some(), "SIGTERM was swallowed: `batch` still blocks opening its OUT 10 s later");
}

/// Finding (medium, not new but now the only "cut" left): nothing keeps two runs off one OUT
/// (the same command started twice, a retry loop around a run still going). The second run's
/// resume reads the first one's file while it writes: a long result it sees half written is a
/// "torn last line" and cut (`set_len`) under the writer, whose `O_APPEND` write then lands past
/// the new end (a hole of NULs: every later resume refuses the file); and both runs publish
/// the same lines. A lock on OUT (`flock`) held for the run would refuse the second.
#[test]
fn review32_a_second_run_on_an_out_in_use_is_refused() {
    let dir = ScratchDir::new("review32-two-runs");
    let out = dir.file("out.jsonl", b"");
    let _first = Output::open(&out, None).unwrap();
    assert!(Output::open(&out, None).is_err(), "a second Output on the same file while the first is open");
}

/// Waits (30 s at most) until one of process `pid`'s threads sits in `openat` (Linux's
/// `/proc/PID/task/*/syscall` starts with its number, 257 on x86_64): here, `batch` waiting
/// for a reader of the FIFO it opens as OUT.
fn wait_until_blocked_in_open(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let in_open = tasks.flatten().any(|task| {
            std::fs::read_to_string(task.path().join("syscall")).is_ok_and(|call| call.starts_with("257 "))
        });
        if in_open {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "batch never blocked opening its FIFO OUT");
        std::thread::sleep(Duration::from_millis(20));
    }
}
