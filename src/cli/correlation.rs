//! The correlation ids `enqueue` gives its jobs, and the key file that makes them unguessable.
//!
//! `enqueue` reads its results from a reply queue whose name derives from the output path, so
//! anyone who may publish on the broker can put a message into it. Were results matched by
//! something a stranger can guess (the line's `custom_id`, often `req-1`, `req-2`…), a forged
//! message would be written to the output as that line's answer. So every job is published with
//! `correlation_id` = an HMAC of its `custom_id` under a random key, the worker copies it onto the
//! result, and only a message bearing exactly that id answers the line. Only those who saw the job
//! (the workers, or a reader of the jobs queue, who could take the job itself anyway) know it.
//!
//! The key lives beside the output, in `OUT.key` (mode 0600), so that a run started again reads
//! the results that arrived for the earlier one. It is a secret: it never goes to a log line.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::job::to_hex;

/// Every correlation id starts with this, so one is told apart from a `custom_id` at a glance.
const PREFIX: &str = "fwe1.";

/// The bytes of a key; stored as twice as many lowercase hex digits.
const KEY_BYTES: usize = 32;

/// The random key of one output file.
#[derive(Clone, PartialEq, Eq)]
pub struct CorrelationKey([u8; KEY_BYTES]);

impl std::fmt::Debug for CorrelationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CorrelationKey(…)")
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFileError {
    #[error("is not an enqueue key ({} hex digits on one line)", 2 * KEY_BYTES)]
    Malformed,
}

impl CorrelationKey {
    /// A new key from the operating system's random source.
    pub fn random() -> CorrelationKey {
        // uuid's v4 takes its 122 random bits from the OS (getrandom); two of them make 244,
        // far past guessing. The version and variant bits are the only fixed ones.
        let mut bytes = [0u8; KEY_BYTES];
        let (first, second) = bytes.split_at_mut(KEY_BYTES / 2);
        first.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        second.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        CorrelationKey(bytes)
    }

    /// Reads a key file's text: 64 hex digits, an end of line allowed.
    pub fn parse(text: &str) -> Result<CorrelationKey, KeyFileError> {
        let digits = text.strip_suffix('\n').unwrap_or(text);
        let digits = digits.strip_suffix('\r').unwrap_or(digits);
        if digits.len() != 2 * KEY_BYTES || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyFileError::Malformed);
        }
        let mut bytes = [0u8; KEY_BYTES];
        for (byte, pair) in bytes.iter_mut().zip(digits.as_bytes().chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| KeyFileError::Malformed)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| KeyFileError::Malformed)?;
        }
        Ok(CorrelationKey(bytes))
    }

    /// The key file of an output: `OUT.key`, beside it.
    pub fn path_for(out: &Path) -> PathBuf {
        let mut name = out.as_os_str().to_owned();
        name.push(".key");
        PathBuf::from(name)
    }

    /// The output's key: read from its key file, or made and stored there (mode 0600) when there
    /// is none; `true` with a key just made. Two runs starting at once on one output agree on one
    /// key: the file appears whole (written aside, then linked into place), and the loser of the
    /// race reads the winner's.
    pub fn load_or_create(out: &Path) -> anyhow::Result<(CorrelationKey, bool)> {
        let path = Self::path_for(out);
        if let Some(key) = Self::load(&path)? {
            return Ok((key, false));
        }
        let key = CorrelationKey::random();
        let text = format!("{}\n", to_hex(&key.0));
        // A name no other run (nor a leftover of a killed one) can hold.
        let aside = path.with_extension(format!("key.{}.tmp", uuid::Uuid::new_v4().simple()));
        write_private(&aside, &text).with_context(|| format!("cannot write the key file {}", aside.display()))?;
        let linked = fs::hard_link(&aside, &path);
        let _ = fs::remove_file(&aside);
        let placed = match linked {
            Ok(()) => Ok(()),
            // A file system without hard links: created in place (a run reading it half-written
            // is told it is damaged, and says so).
            Err(e) if e.kind() != ErrorKind::AlreadyExists => write_private(&path, &text),
            Err(e) => Err(e),
        };
        match placed {
            Ok(()) => {
                sync_parent(&path);
                Ok((key, true))
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let theirs = Self::load(&path)?;
                Ok((theirs.with_context(|| format!("the key file {} vanished", path.display()))?, false))
            }
            Err(e) => Err(e).with_context(|| format!("cannot create the key file {}", path.display())),
        }
    }

    /// The key in `path`, `None` when there is no such file. Anyone who knew the key could
    /// forge results, so only a key this user alone could have written is used: a regular file
    /// (not a link, which could point anywhere), owned by this user, neither group nor others
    /// allowed to read or write it.
    fn load(path: &Path) -> anyhow::Result<Option<CorrelationKey>> {
        let refused = |why: String| {
            anyhow::anyhow!(
                "the key file {} {why}: delete it to start a new key (results already waiting for this \
                 output are then not recognised, and their lines are published again)",
                path.display()
            )
        };
        let file = match open_no_follow(path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot read the key file {} (it must be a regular file, not a link)", path.display())
                });
            }
        };
        let metadata = file.metadata().with_context(|| format!("cannot read the key file {}", path.display()))?;
        if let Some(why) = not_private(&metadata) {
            return Err(refused(why));
        }
        let mut bytes = Vec::new();
        file.take(4096)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read the key file {}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| refused(KeyFileError::Malformed.to_string()))?;
        CorrelationKey::parse(&text).map(Some).map_err(|e| refused(e.to_string()))
    }

    /// The correlation id of the job with this `custom_id`.
    pub fn correlation_id(&self, custom_id: &str) -> String {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(custom_id.as_bytes());
        format!("{PREFIX}{}", to_hex(&mac.finalize().into_bytes()))
    }
}

/// Opens `path` for reading without following a link in its last part (a link is an error) and
/// without waiting on a FIFO.
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use rustix::fs::OFlags;
        let flags = (OFlags::NOFOLLOW | OFlags::NONBLOCK).bits();
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, i32::try_from(flags).unwrap_or(0));
    }
    options.open(path)
}

/// Why a key file is not one this user alone could have written, if it is not.
fn not_private(metadata: &fs::Metadata) -> Option<String> {
    if !metadata.is_file() {
        return Some("is not a regular file".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if metadata.uid() != rustix::process::geteuid().as_raw() {
            return Some(format!("belongs to another user (uid {})", metadata.uid()));
        }
        if metadata.mode() & 0o077 != 0 {
            return Some(format!(
                "may be read or written by others (mode {:o}; a key this run made is 600)",
                metadata.mode() & 0o777
            ));
        }
    }
    None
}

/// Makes a new name in `path`'s directory last through a crash, as far as the file system
/// allows (a key lost after jobs went out with it would leave their results unrecognised).
fn sync_parent(path: &Path) {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}

/// Creates `path` (which must not exist) readable by its owner only, with `text`, on disk.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file: File = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fw-correlation-{name}-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_correlation_id_depends_on_the_key_and_the_custom_id() {
        let (one, two) = (CorrelationKey::random(), CorrelationKey::random());
        assert_ne!(one, two, "two keys are never the same");
        assert_eq!(one.correlation_id("req-1"), one.correlation_id("req-1"));
        assert_ne!(one.correlation_id("req-1"), one.correlation_id("req-2"));
        assert_ne!(one.correlation_id("req-1"), two.correlation_id("req-1"));
        let id = one.correlation_id("req-1");
        assert!(id.starts_with(PREFIX) && id.len() == PREFIX.len() + 64, "{id}");
        assert!(!id.contains("req-1"), "the custom_id cannot be read off it");
    }

    #[test]
    fn the_key_file_is_made_once_kept_private_and_read_again() {
        let dir = temp_dir("roundtrip");
        let out = dir.join("out.jsonl");
        let (key, created) = CorrelationKey::load_or_create(&out).unwrap();
        assert!(created);
        assert_eq!(CorrelationKey::load_or_create(&out).unwrap(), (key, false), "a second run reads the same key");
        let path = CorrelationKey::path_for(&out);
        assert_eq!(path, dir.join("out.jsonl.key"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary file stays behind: {leftovers:?}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn runs_starting_together_agree_on_one_key() {
        let dir = temp_dir("race");
        let out = dir.join("out.jsonl");
        let runs: Vec<_> = (0..8)
            .map(|_| {
                let out = out.clone();
                std::thread::spawn(move || CorrelationKey::load_or_create(&out).unwrap())
            })
            .collect();
        let keys: Vec<(CorrelationKey, bool)> = runs.into_iter().map(|run| run.join().unwrap()).collect();
        assert!(keys.iter().all(|(key, _)| *key == keys[0].0), "one key for all");
        assert_eq!(keys.iter().filter(|(_, created)| *created).count(), 1, "made by one run");
        fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    fn private_file(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_damaged_key_file_is_a_clear_error_that_names_the_file() {
        let dir = temp_dir("damaged");
        let out = dir.join("out.jsonl");
        private_file(&CorrelationKey::path_for(&out), &"ab".repeat(31));
        let error = format!("{:#}", CorrelationKey::load_or_create(&out).unwrap_err());
        assert!(error.contains("out.jsonl.key") && error.contains("not an enqueue key"), "{error}");
        assert!(error.contains("delete it"), "{error}");
        fs::write(CorrelationKey::path_for(&out), [0xff_u8; 64]).unwrap();
        let error = format!("{:#}", CorrelationKey::load_or_create(&out).unwrap_err());
        assert!(error.contains("not an enqueue key"), "not UTF-8 is damaged too: {error}");
        fs::remove_dir_all(dir).unwrap();
    }

    /// A key someone else could have planted (before the first run, in a directory others may
    /// write to) would let them forge every line: it is refused, never used.
    #[cfg(unix)]
    #[test]
    fn a_key_file_others_could_have_written_or_a_link_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("planted");
        let out = dir.join("out.jsonl");
        let path = CorrelationKey::path_for(&out);
        let planted = format!("{}\n", "ab".repeat(32));

        fs::write(&path, &planted).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = format!("{:#}", CorrelationKey::load_or_create(&out).unwrap_err());
        assert!(error.contains("read or written by others") && error.contains("644"), "{error}");
        fs::remove_file(&path).unwrap();

        let elsewhere = dir.join("elsewhere");
        private_file(&elsewhere, &planted);
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let error = format!("{:#}", CorrelationKey::load_or_create(&out).unwrap_err());
        assert!(error.contains("not a link"), "a link to a private file: {error}");
        fs::remove_file(&elsewhere).unwrap();
        let error = format!("{:#}", CorrelationKey::load_or_create(&out).unwrap_err());
        assert!(error.contains("not a link"), "a dangling link: {error}");
        fs::remove_file(&path).unwrap();

        let made = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(made.success());
        let error = format!("{:#}", CorrelationKey::load_or_create(&out).unwrap_err());
        assert!(error.contains("not a regular file"), "a FIFO is refused, not waited on: {error}");
        fs::remove_file(&path).unwrap();

        assert!(CorrelationKey::load_or_create(&out).unwrap().1, "with the file gone, a new key is made");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn key_files_with_a_line_end_are_read_and_others_refused() {
        let digits = "0123456789abcdefABCDEF".repeat(3)[..64].to_string();
        assert!(CorrelationKey::parse(&digits).is_ok());
        assert!(CorrelationKey::parse(&format!("{digits}\n")).is_ok());
        assert!(CorrelationKey::parse(&format!("{digits}\r\n")).is_ok());
        for bad in ["", "\n", &digits[..63], &format!("{digits}0"), &format!("{digits}\n\n"), &format!(" {digits}")] {
            assert_eq!(CorrelationKey::parse(bad), Err(KeyFileError::Malformed), "{bad:?}");
        }
        assert_eq!(CorrelationKey::parse(&format!("{}é", &digits[..62])), Err(KeyFileError::Malformed));
    }

    proptest! {
        #[test]
        fn parsing_any_text_never_panics_and_a_written_key_reads_back(text in ".{0,80}", bytes in any::<[u8; 32]>()) {
            let _ = CorrelationKey::parse(&text);
            let key = CorrelationKey(bytes);
            prop_assert_eq!(CorrelationKey::parse(&format!("{}\n", to_hex(&key.0))), Ok(key));
        }
    }
}
