//! Durable persistence of the replicated table in a data directory.
//!
//! The node core hands us opaque records (appended to `table.log`) and, now
//! and then, a full snapshot (written to `table.snap`, after which the log is
//! emptied). On start-up [`Store::open`] returns the snapshot and every intact
//! record logged after it.
//!
//! # Formats
//!
//! Every log record is framed as `[u32 len LE][u32 crc LE][payload]`, where
//! `crc` is the CRC-32 (IEEE) of the four length bytes followed by the
//! payload — covering the length means a zero-filled tail (as some file
//! systems leave after a crash) never parses as a run of empty records.
//! The snapshot file is the magic `CLNYSNP1` followed by one such frame.
//!
//! # Recovery rules
//!
//! * A torn or corrupt record (short header, short payload, implausible
//!   length, CRC mismatch) ends the log: it and everything after it is
//!   truncated away and counted in [`Recovered::torn_tail_bytes`], never an
//!   error. A crash during an append only ever tears the tail; damage
//!   further in is reported the same way (see [`Recovered::damage`]) and
//!   logged as a warning.
//! * A corrupt snapshot is an error ([`StorageError::CorruptSnapshot`]):
//!   silently starting empty would forget the table.
//! * [`Store::write_snapshot`] renames the new snapshot into place before it
//!   empties the log, so a crash in between leaves the new snapshot *and* the
//!   old log, and recovery returns both. This is correct because records are
//!   idempotent to re-apply on top of any snapshot that already contains
//!   them (the core's records are Automerge changes; applying a change twice
//!   is a no-op). Callers must keep that property.
//!
//! # Concurrency
//!
//! A [`Store`] holds an exclusive `flock` on `table.lock` for its lifetime,
//! so two daemons cannot share one data directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Largest record accepted, in bytes (64 MiB).
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// Largest snapshot accepted, in bytes (1 GiB).
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

const LOG_FILE: &str = "table.log";
const SNAP_FILE: &str = "table.snap";
const LOCK_FILE: &str = "table.lock";
const SNAP_MAGIC: &[u8; 8] = b"CLNYSNP1";
const FRAME_HEADER: usize = 8;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The snapshot file exists but is damaged or not a snapshot.
    #[error("corrupt snapshot {path}: {reason}")]
    CorruptSnapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A record is larger than [`MAX_RECORD_BYTES`].
    #[error("record of {len} bytes exceeds the {max}-byte limit")]
    RecordTooLarge {
        /// The record's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A snapshot is larger than [`MAX_SNAPSHOT_BYTES`].
    #[error("snapshot of {len} bytes exceeds the {max}-byte limit")]
    SnapshotTooLarge {
        /// The snapshot's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Another process holds the data directory.
    #[error("data directory {path} is in use by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// An earlier write failed and its partial data could not be removed;
    /// the store refuses further writes until reopened.
    #[error("store is unusable after an earlier write failure; reopen it")]
    Poisoned,
}

/// What [`Store::open`] found on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The latest snapshot, if one was ever written.
    pub snapshot: Option<Vec<u8>>,
    /// Intact records logged since (possibly also some already contained in
    /// the snapshot; see the module docs), in append order.
    pub records: Vec<Vec<u8>>,
    /// Bytes cut off the end of the log because they were torn or corrupt.
    pub torn_tail_bytes: u64,
    /// Where and why reading the log stopped, when it did not end cleanly.
    pub damage: Option<LogDamage>,
}

/// Where the log stopped being readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogDamage {
    /// Byte offset of the first bad frame.
    pub offset: u64,
    /// What was wrong with it.
    pub kind: DamageKind,
    /// Whether bytes beyond the bad frame were dropped too, i.e. the damage
    /// was not just a torn final record.
    pub mid_log: bool,
}

/// Why a log frame was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    /// Fewer than 8 header bytes remained.
    ShortHeader,
    /// The header announced more payload than the file holds.
    ShortPayload,
    /// The header announced a record over [`MAX_RECORD_BYTES`].
    LengthTooLarge,
    /// The checksum did not match.
    CrcMismatch,
}

/// The data directory's table files, open for appending.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    log: File,
    log_len: u64,
    poisoned: bool,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and recovers its
    /// contents, truncating a torn log tail.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), StorageError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let lock = lock_dir(dir)?;

        // A leftover temporary snapshot is an interrupted write: discard it.
        let tmp = tmp_path(&dir.join(SNAP_FILE));
        match fs::remove_file(&tmp) {
            Ok(()) => tracing::info!(path = %tmp.display(), "removed interrupted snapshot write"),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err("remove", &tmp)(err)),
        }

        let snapshot = read_snapshot(&dir.join(SNAP_FILE))?;

        let log_path = dir.join(LOG_FILE);
        let existed = log_path.exists();
        let log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(io_err("open", &log_path))?;
        if !existed {
            sync_dir(dir)?;
        }
        let scan = scan_log(&log, &log_path)?;
        let torn_tail_bytes = scan.file_len - scan.good_len;
        if torn_tail_bytes > 0 {
            if let Some(damage) = scan.damage {
                if damage.mid_log {
                    tracing::warn!(
                        path = %log_path.display(),
                        offset = damage.offset,
                        kind = ?damage.kind,
                        dropped = torn_tail_bytes,
                        "log corrupt before its end; dropping everything after the damage"
                    );
                } else {
                    tracing::info!(
                        path = %log_path.display(),
                        dropped = torn_tail_bytes,
                        "truncating torn log tail"
                    );
                }
            }
            log.set_len(scan.good_len).map_err(io_err("truncate", &log_path))?;
            log.sync_all().map_err(io_err("sync", &log_path))?;
        }

        let store = Store { dir: dir.to_path_buf(), log, log_len: scan.good_len, poisoned: false, _lock: lock };
        let recovered = Recovered { snapshot, records: scan.records, torn_tail_bytes, damage: scan.damage };
        Ok((store, recovered))
    }

    /// Appends records to the log and makes them durable (`fdatasync`)
    /// before returning. On failure nothing of the batch is kept.
    pub fn append(&mut self, records: &[Vec<u8>]) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for record in records {
            if record.len() > MAX_RECORD_BYTES {
                return Err(StorageError::RecordTooLarge { len: record.len(), max: MAX_RECORD_BYTES });
            }
            encode_frame(record, &mut buf);
        }
        let path = self.dir.join(LOG_FILE);
        let result = self
            .log
            .write_all(&buf)
            .map_err(io_err("append to", &path))
            .and_then(|()| self.log.sync_data().map_err(io_err("sync", &path)));
        match result {
            Ok(()) => {
                self.log_len += buf.len() as u64;
                Ok(())
            }
            Err(err) => {
                // Cut off whatever part of the batch made it, so later
                // appends do not land behind a torn frame.
                if self.log.set_len(self.log_len).is_err() || self.log.sync_all().is_err() {
                    self.poisoned = true;
                }
                Err(err)
            }
        }
    }

    /// Atomically replaces the snapshot, then empties the log.
    ///
    /// The snapshot must include every record appended so far; a crash
    /// between the two steps is safe (see the module docs).
    pub fn write_snapshot(&mut self, snapshot: &[u8]) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        if snapshot.len() > MAX_SNAPSHOT_BYTES {
            return Err(StorageError::SnapshotTooLarge { len: snapshot.len(), max: MAX_SNAPSHOT_BYTES });
        }
        let mut buf = Vec::with_capacity(SNAP_MAGIC.len() + FRAME_HEADER + snapshot.len());
        buf.extend_from_slice(SNAP_MAGIC);
        encode_frame(snapshot, &mut buf);
        let snap_path = self.dir.join(SNAP_FILE);
        write_file_atomic(&snap_path, &buf).map_err(io_err("write snapshot", &snap_path))?;

        let log_path = self.dir.join(LOG_FILE);
        let truncated = self.log.set_len(0).and_then(|()| self.log.sync_all()).map_err(io_err("truncate", &log_path));
        match truncated {
            Ok(()) => {
                self.log_len = 0;
                Ok(())
            }
            Err(err) => {
                // The log's state is unknown; recovery would still be
                // correct (idempotent records), but stop writing.
                self.poisoned = true;
                Err(err)
            }
        }
    }

    /// Current size of the log in bytes: how much a snapshot would reclaim.
    pub fn log_bytes(&self) -> u64 {
        self.log_len
    }
}

/// Writes `bytes` to `path` atomically: to `<path>.tmp` first, `fsync`ed,
/// renamed over `path`, and the directory `fsync`ed. Readers see either the
/// old contents or the new, never a mix. Not safe against concurrent writers
/// of the same `path`.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320).
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut crc = !crc;
    for &byte in data {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// The frame checksum: CRC-32 of the length bytes then the payload.
fn frame_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    crc32_update(crc32(&len_bytes), payload)
}

/// Appends one frame; `payload` must be at most [`MAX_SNAPSHOT_BYTES`] long.
fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&frame_crc(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { op, path, source }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync directory", dir))
}

#[allow(unsafe_code)]
fn lock_dir(dir: &Path) -> Result<File, StorageError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open", &path))?;
    // SAFETY: flock on a valid, open descriptor has no memory-safety
    // preconditions; the lock lives as long as `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Err(StorageError::Locked { path });
        }
        return Err(io_err("lock", &path)(err));
    }
    Ok(file)
}

fn read_snapshot(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_err("open", path)(err)),
    };
    let corrupt = |reason: String| StorageError::CorruptSnapshot { path: path.to_path_buf(), reason };
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    let header = (SNAP_MAGIC.len() + FRAME_HEADER) as u64;
    if file_len < header {
        return Err(corrupt(format!("only {file_len} bytes long")));
    }
    let mut reader = BufReader::new(file);
    let mut head = [0u8; 16];
    reader.read_exact(&mut head).map_err(io_err("read", path))?;
    if &head[..8] != SNAP_MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let len_bytes = [head[8], head[9], head[10], head[11]];
    let len = u32::from_le_bytes(len_bytes);
    let crc = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    let len_usize = len as usize;
    if len_usize > MAX_SNAPSHOT_BYTES {
        return Err(corrupt(format!("claims {len} bytes, over the limit")));
    }
    if file_len != header + u64::from(len) {
        return Err(corrupt(format!("claims {len} payload bytes but the file holds {}", file_len - header)));
    }
    let mut payload = vec![0u8; len_usize];
    reader.read_exact(&mut payload).map_err(io_err("read", path))?;
    if frame_crc(len_bytes, &payload) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    Ok(Some(payload))
}

struct LogScan {
    records: Vec<Vec<u8>>,
    good_len: u64,
    file_len: u64,
    damage: Option<LogDamage>,
}

fn scan_log(file: &File, path: &Path) -> Result<LogScan, StorageError> {
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut offset = 0u64;
    let damage = loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            break None;
        }
        let kind = if remaining < FRAME_HEADER as u64 {
            Some((DamageKind::ShortHeader, remaining))
        } else {
            let mut head = [0u8; FRAME_HEADER];
            reader.read_exact(&mut head).map_err(io_err("read", path))?;
            let len_bytes = [head[0], head[1], head[2], head[3]];
            let len = u32::from_le_bytes(len_bytes);
            let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let body_left = remaining - FRAME_HEADER as u64;
            if len as usize > MAX_RECORD_BYTES {
                Some((DamageKind::LengthTooLarge, FRAME_HEADER as u64))
            } else if u64::from(len) > body_left {
                Some((DamageKind::ShortPayload, remaining))
            } else {
                let mut payload = vec![0u8; len as usize];
                reader.read_exact(&mut payload).map_err(io_err("read", path))?;
                if frame_crc(len_bytes, &payload) == crc {
                    records.push(payload);
                    offset += FRAME_HEADER as u64 + u64::from(len);
                    None
                } else {
                    Some((DamageKind::CrcMismatch, FRAME_HEADER as u64 + u64::from(len)))
                }
            }
        };
        if let Some((kind, frame_bytes)) = kind {
            break Some(LogDamage { offset, kind, mid_log: offset + frame_bytes < file_len });
        }
    };
    Ok(LogScan { records, good_len: offset, file_len, damage })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn crc32_known_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32_update(crc32(b"1234"), b"56789"), 0xCBF4_3926);
    }

    #[test]
    fn empty_dir_opens_empty() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data/nested");
        let (store, rec) = Store::open(&data).unwrap();
        assert_eq!(rec, Recovered::default());
        assert_eq!(store.log_bytes(), 0);
        assert!(data.join("table.log").exists());
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = Store::open(dir.path()).unwrap();
            store.append(&recs(&["a", "", "ccc"])).unwrap();
            store.append(&[]).unwrap();
            store.append(&[vec![0u8; 100_000]]).unwrap();
            assert_eq!(store.log_bytes(), 4 * 8 + 1 + 3 + 100_000);
        }
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot, None);
        let mut expected = recs(&["a", "", "ccc"]);
        expected.push(vec![0u8; 100_000]);
        assert_eq!(rec.records, expected);
        assert_eq!(rec.torn_tail_bytes, 0);
        assert_eq!(rec.damage, None);
        assert_eq!(store.log_bytes(), 4 * 8 + 1 + 3 + 100_000);
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = Store::open(dir.path()).unwrap();
            store.append(&recs(&["first", "second"])).unwrap();
        }
        let log = dir.path().join("table.log");
        let full = fs::metadata(&log).unwrap().len();
        // Cut 3 bytes off the last record's payload.
        OpenOptions::new().write(true).open(&log).unwrap().set_len(full - 3).unwrap();
        {
            let (mut store, rec) = Store::open(dir.path()).unwrap();
            assert_eq!(rec.records, recs(&["first"]));
            assert_eq!(rec.torn_tail_bytes, 8 + 6 - 3);
            let damage = rec.damage.unwrap();
            assert_eq!(damage.kind, DamageKind::ShortPayload);
            assert_eq!(damage.offset, 8 + 5);
            assert!(!damage.mid_log);
            assert_eq!(fs::metadata(&log).unwrap().len(), 8 + 5);
            store.append(&recs(&["third"])).unwrap();
        }
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records, recs(&["first", "third"]));
        assert_eq!(rec.torn_tail_bytes, 0);
    }

    #[test]
    fn torn_header_and_zero_tail_are_truncated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = Store::open(dir.path()).unwrap();
            store.append(&recs(&["x"])).unwrap();
        }
        let log = dir.path().join("table.log");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[0u8; 5]).unwrap();
        drop(f);
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records, recs(&["x"]));
        assert_eq!(rec.torn_tail_bytes, 5);
        assert_eq!(rec.damage.unwrap().kind, DamageKind::ShortHeader);

        // A zero-filled region as long as several headers is not a run of
        // empty records.
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[0u8; 64]).unwrap();
        drop(f);
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records, recs(&["x"]));
        assert_eq!(rec.torn_tail_bytes, 64);
        let damage = rec.damage.unwrap();
        assert_eq!(damage.kind, DamageKind::CrcMismatch);
        assert!(damage.mid_log);
    }

    #[test]
    fn corrupt_tail_crc_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = Store::open(dir.path()).unwrap();
            store.append(&recs(&["good", "bad!"])).unwrap();
        }
        let log = dir.path().join("table.log");
        let mut bytes = fs::read(&log).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&log, &bytes).unwrap();
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records, recs(&["good"]));
        assert_eq!(rec.torn_tail_bytes, 12);
        let damage = rec.damage.unwrap();
        assert_eq!(damage.kind, DamageKind::CrcMismatch);
        assert!(!damage.mid_log);
    }

    #[test]
    fn mid_log_corruption_stops_reading_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = Store::open(dir.path()).unwrap();
            store.append(&recs(&["one", "two", "three"])).unwrap();
        }
        let log = dir.path().join("table.log");
        let mut bytes = fs::read(&log).unwrap();
        // Flip a payload byte of "two".
        bytes[11 + 8] ^= 0x01;
        fs::write(&log, &bytes).unwrap();
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records, recs(&["one"]));
        assert_eq!(rec.torn_tail_bytes, (11 + 13) as u64);
        let damage = rec.damage.unwrap();
        assert_eq!(damage.offset, 11);
        assert_eq!(damage.kind, DamageKind::CrcMismatch);
        assert!(damage.mid_log);

        // An absurd length is caught without allocating it.
        let mut bytes = fs::read(&log).unwrap();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 20]);
        fs::write(&log, &bytes).unwrap();
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records, recs(&["one"]));
        assert_eq!(rec.damage.unwrap().kind, DamageKind::LengthTooLarge);
        assert_eq!(rec.torn_tail_bytes, 24);
    }

    #[test]
    fn snapshot_replaces_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = Store::open(dir.path()).unwrap();
            store.append(&recs(&["r1", "r2"])).unwrap();
            assert!(store.log_bytes() > 0);
            store.write_snapshot(b"state after r2").unwrap();
            assert_eq!(store.log_bytes(), 0);
            store.append(&recs(&["r3"])).unwrap();
        }
        assert!(!dir.path().join("table.snap.tmp").exists());
        let (mut store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot.as_deref(), Some(&b"state after r2"[..]));
        assert_eq!(rec.records, recs(&["r3"]));
        assert_eq!(store.log_bytes(), 8 + 2);

        // A second snapshot replaces the first; an empty one is still a snapshot.
        store.write_snapshot(b"").unwrap();
        drop(store);
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot, Some(Vec::new()));
        assert!(rec.records.is_empty());
    }

    /// Crash after the snapshot rename but before the log truncation: the
    /// new snapshot and the old log are both returned. Records are
    /// idempotent (Automerge changes), so re-applying the ones the snapshot
    /// already holds is harmless.
    #[test]
    fn crash_between_snapshot_rename_and_log_truncate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = Store::open(dir.path()).unwrap();
            store.append(&recs(&["r1", "r2"])).unwrap();
        }
        // Simulate: the snapshot landed, the truncate never happened.
        let mut snap = SNAP_MAGIC.to_vec();
        encode_frame(b"snap with r1 r2", &mut snap);
        write_file_atomic(&dir.path().join("table.snap"), &snap).unwrap();
        // And an interrupted later snapshot write left its temp file.
        fs::write(dir.path().join("table.snap.tmp"), b"half").unwrap();

        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot.as_deref(), Some(&b"snap with r1 r2"[..]));
        assert_eq!(rec.records, recs(&["r1", "r2"]));
        assert_eq!(rec.torn_tail_bytes, 0);
        assert!(!dir.path().join("table.snap.tmp").exists());
    }

    #[test]
    fn corrupt_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = Store::open(dir.path()).unwrap();
            store.write_snapshot(b"precious state").unwrap();
        }
        let snap = dir.path().join("table.snap");
        let good = fs::read(&snap).unwrap();

        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("flipped", flipped),
            ("truncated", good[..good.len() - 2].to_vec()),
            ("extended", [good.clone(), b"xx".to_vec()].concat()),
            ("magic", [b"NOTASNAP".to_vec(), good[8..].to_vec()].concat()),
            ("tiny", b"CLNY".to_vec()),
            ("empty", Vec::new()),
        ];
        for (name, bytes) in cases {
            fs::write(&snap, &bytes).unwrap();
            let err = Store::open(dir.path()).unwrap_err();
            assert!(matches!(err, StorageError::CorruptSnapshot { .. }), "{name}: {err}");
        }
        fs::write(&snap, &good).unwrap();
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot.as_deref(), Some(&b"precious state"[..]));
    }

    #[test]
    fn oversized_inputs_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path()).unwrap();
        let big = vec![0u8; MAX_RECORD_BYTES + 1];
        let err = store.append(&[b"ok".to_vec(), big]).unwrap_err();
        assert!(matches!(err, StorageError::RecordTooLarge { .. }));
        // Nothing of the rejected batch was written.
        assert_eq!(store.log_bytes(), 0);
    }

    #[test]
    fn second_open_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StorageError::Locked { .. }), "{err}");
        drop(store);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn write_file_atomic_replaces_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        write_file_atomic(&path, b"one").unwrap();
        write_file_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("node.json.tmp").exists());
        assert!(write_file_atomic(&dir.path().join("missing/x"), b"x").is_err());
    }
}
