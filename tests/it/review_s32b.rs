//! Second adversarial review, session 32, of f3d35d7..9ed130f (the fixes of review32: config
//! and OUT/input opened on a blocking thread raced against the stop signal, the input bound
//! without CRLF/BOM, OUT resumed only from this service's results, `flock` on OUT/ERR, 408s not
//! taken for hangs, pools cooling when none draws, retention >= max_wait_limit).
//!
//! Every test below fails on 9ed130f.
//!
//! Checked and found sound (no test): every version since 953ce01 wrote results with serde from
//! the same `JobResult` (id, custom_id, response, error, routing, in that order, `custom_id` null
//! rather than absent, `routing` always an object), so `is_result` refuses no OUT an older
//! version wrote, and `RESULT_START` begins every line they wrote; enqueue opens OUT only through
//! `Output` (`OUT.key` is a file of its own, the reply queue a hash of the path), so its flock
//! does not meet a second open of its own; a result line cannot reach 64 MiB (the answer is
//! capped at 8 MiB of raw bytes, no content decoding, re-serialisation at most ~4x).
//!
//! Observations without a test:
//! - `status` never looks at the stop token: since a3972fd a SIGTERM or Ctrl-C during `status`
//!   is swallowed and it runs on (bounded only by the pool's 2 s acquire and the connections'
//!   statement_timeout); stopped before its config is read it exits 0 having printed nothing.
//! - `worker.result_retention == max_wait_limit` is accepted: a job that waited its whole
//!   `max_wait_limit` still has its last attempts and publish to make when its row may be purged;
//!   the floor wants a margin (`delivery_deadline`, or `>`), if the purge counts from the row's
//!   creation.
//! - A user who serialises runs with `flock OUT fallback-worker batch ...` (flock(1) on the output
//!   itself) is now refused: the wrapper's lock is "another run".
//! - An OUT whose tail a crash left as NULs (delayed allocation) is still refused as "not written
//!   by enqueue or batch" (as before 5082ed6): the message sends the user to another file
//!   rather than to the damaged tail.

use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use fallback_worker::cli::backlog::Output;
use fallback_worker::job::{ErrorCode, ErrorEnvelope, JobResult, Routing};

use crate::support::{ScratchDir, exit_within};

const CONFIG: &[u8] = b"[[providers]]\nname = \"p\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\nfree = true\n\n[chains.default]\nproviders = [\"p\"]\n";

fn binary(args: &[&str]) -> Command {
    quiet(env!("CARGO_BIN_EXE_fallback-worker"), args)
}

/// `program` with `args`, none of the runner's broker, database or trace settings, and quiet.
fn quiet(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// Runs the command with a FIFO as its config, sends SIGTERM while it blocks reading it, and
/// returns how it ended.
fn stopped_while_reading_the_config(dir: &ScratchDir, command: &[&str]) -> ExitStatus {
    let fifo = dir.0.join(format!("config-{}.fifo", command[0]));
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut args = vec!["--config", fifo.to_str().unwrap()];
    args.extend_from_slice(command);
    let mut child = binary(&args).spawn().unwrap();
    // Opening the FIFO to write returns once the process opened it to read: it is in its config
    // read, and stays there (nothing is written).
    let (sender, opened) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let writer = std::fs::OpenOptions::new().write(true).open(path);
        let _ = sender.send(writer);
        std::thread::sleep(Duration::from_secs(20));
    });
    let _writer = opened.recv_timeout(Duration::from_secs(30)).expect("the command opens its config").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    exit_within(&mut child, Duration::from_secs(10)).expect("SIGTERM ends the command")
}

/// Finding (medium): a stop that comes before the config is read ends every command with exit 0
/// ("stopped before the config was read"), which is right for `worker` alone. For `batch` and
/// `enqueue` the contract (§1) gives 0 "only when every line got a successful result", and the
/// same commands stopped a moment later (while opening OUT, or mid-run) exit 1 ("interrupted ...
/// run the same command again"); `migrate` exits 0 with no migration applied, while stopped
/// during its database wait it exits 1. A script `batch ... && mark_done`, or an init container
/// running `migrate` that a rollout stops, takes the stop for a success.
#[test]
fn review32b_batch_and_migrate_stopped_before_the_config_is_read_do_not_exit_0() {
    let dir = ScratchDir::new("review32b-stopped-config");
    let input = dir
        .file("in.jsonl", b"{\"custom_id\":\"a\",\"body\":{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}}\n");
    let out = dir.0.join("out.jsonl");
    let batch =
        stopped_while_reading_the_config(&dir, &["batch", input.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let migrate = stopped_while_reading_the_config(&dir, &["migrate"]);
    assert!(
        batch.code() != Some(0) && migrate.code() != Some(0),
        "stopped before anything ran: batch {batch:?}, migrate {migrate:?} (0 says every line succeeded / migrations applied)"
    );
}

/// Whether `strace` can inject a syscall's failure here (it needs ptrace).
fn strace_injects() -> bool {
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=flock", "-e", "inject=flock:error=ENOSYS", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Finding (medium): any `flock` failure but EWOULDBLOCK refuses the run ("cannot lock OUT").
/// File systems that do not do `flock` say so with an error, not a lock: Lustre mounted without
/// `-o flock` (the default on HPC clusters) answers ENOSYS, NFS whose lock daemon is down or
/// missing ENOLCK, some FUSE and network file systems EOPNOTSUPP/EINVAL. `batch` and `enqueue`
/// worked there before 9ed130f and now refuse every run on such a mount. The lock guards
/// against a second run, so it should be best-effort: a warning and go on (only EWOULDBLOCK
/// means another run). The failure is injected with `strace` (skipped where ptrace is not
/// allowed).
#[test]
fn review32b_a_file_system_without_flock_does_not_refuse_the_run() {
    if !strace_injects() {
        eprintln!("skipped: strace cannot inject syscall failures here");
        return;
    }
    let dir = ScratchDir::new("review32b-no-flock");
    let config = dir.file("fallback.toml", CONFIG);
    let input = dir.file("in.jsonl", b"");
    let mut refused = Vec::new();
    for errno in ["ENOSYS", "ENOLCK", "EOPNOTSUPP"] {
        let out = dir.0.join(format!("out-{errno}.jsonl"));
        let inject = format!("inject=flock:error={errno}");
        let bin = env!("CARGO_BIN_EXE_fallback-worker");
        let batch = ["--config", config.to_str().unwrap(), "batch", input.to_str().unwrap()];
        let mut child = quiet("strace", &["-f", "-qq", "-o", "/dev/null", "-e", "trace=flock", "-e", &inject, bin])
            .args(batch)
            .args(["--out", out.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = exit_within(&mut child, Duration::from_secs(60)).expect("batch of an empty input ends");
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        if status.code() != Some(0) {
            refused.push(format!("{errno}: {status:?}: {}", stderr.trim()));
        }
    }
    assert!(refused.is_empty(), "an empty input, refused because OUT could not be locked:\n{}", refused.join("\n"));
}

/// One result line as this service writes it.
fn result_line(custom_id: &str) -> String {
    let result = JobResult {
        id: JobResult::new_id(),
        custom_id: Some(custom_id.into()),
        response: None,
        error: Some(ErrorEnvelope { code: ErrorCode::InvalidRequest, message: "x".into() }),
        routing: Routing {
            chain: None,
            provider: None,
            model: None,
            free: None,
            attempts: Vec::new(),
            rejected: false,
            worker: "w".into(),
            queued_ms: 0,
            total_ms: 0,
        },
    };
    serde_json::to_string(&result).unwrap()
}

/// Finding (low, regression of 5082ed6): a torn last line is cut only when it holds all of
/// `{"id":"`; one torn within those 7 bytes (`{`, `{"`, ... `{"id":`) is now "not a result
/// line: this file was not written by enqueue or batch" and the run refused, where the `{`
/// rule before cut it. A write is torn anywhere: a full disk (ENOSPC after a short write: the
/// run stops on the error, and the next run, with space freed, finds the stub) or SIGKILL in
/// `write` (the kernel stops at a page boundary, which falls anywhere in a line). The rule
/// should cut a last line without newline that is a prefix of `{"id":"` or starts with it.
#[test]
fn review32b_a_result_torn_within_its_first_bytes_is_cut_not_refused() {
    let dir = ScratchDir::new("review32b-short-torn");
    let whole = result_line("a");
    let start = "{\"id\":\"";
    let mut refused = Vec::new();
    for cut in 1..start.len() {
        let stub = &start[..cut];
        let path = dir.file(&format!("out-{cut}.jsonl"), format!("{whole}\n{stub}").as_bytes());
        match Output::open(&path, None) {
            Ok(output) => {
                assert_eq!(output.done().len(), 1);
                assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{whole}\n"), "the stub is cut");
            }
            Err(e) => refused.push(format!("{stub:?}: {e:#}")),
        }
    }
    assert!(refused.is_empty(), "OUT refused for a result torn in its first bytes:\n{}", refused.join("\n"));
}

/// Finding (low, regression of 9ed130f): `--errors` naming the same file as `--out` (or the
/// same inode by another name: a hard link, `--out /dev/stdout --errors /dev/stderr` with
/// `>f 2>&1`) worked before (one file of every result); now the run's own second `flock` on it
/// meets its first, and the user is told the file "is in use by another run (enqueue or batch):
/// wait for it to end" — a run that does not exist, for ever. Either take the two as one file
/// (same dev/ino: one handle) or refuse with what is really wrong.
#[test]
fn review32b_errors_naming_the_out_file_is_not_taken_for_another_run() {
    let dir = ScratchDir::new("review32b-same-file");
    let out = dir.file("out.jsonl", b"");
    if let Err(e) = Output::open(&out, Some(&out)) {
        let message = format!("{e:#}");
        assert!(!message.contains("another run"), "this run alone uses the file, yet: {message}");
    }
    let link = dir.0.join("errors.jsonl");
    std::fs::hard_link(&out, &link).unwrap();
    if let Err(e) = Output::open(&out, Some(&link)) {
        let message = format!("{e:#}");
        assert!(!message.contains("another run"), "this run alone uses the file, yet: {message}");
    }
}
