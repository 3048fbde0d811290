//! Sequence numbers that survive an agent restart.
//!
//! The cloud drops a message whose (device, sequence number) it already has, so a
//! restarted agent must never reuse a number. Numbers are reserved in blocks written
//! to the state directory before use; after a restart numbering resumes above the
//! last reservation (the skipped numbers show in the cloud as a gap at the restart).

use std::path::{Path, PathBuf};

use crate::outbox::Stream;

const BLOCK: u64 = 10_000;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Reserved {
    telemetry: u64,
    events: u64,
}

#[derive(Debug)]
pub struct SeqCounter {
    path: Option<PathBuf>,
    next: [u64; 2],
    reserved: Reserved,
}

#[derive(Debug, thiserror::Error)]
#[error("sequence state {path}: {source}")]
pub struct SeqError {
    path: PathBuf,
    source: std::io::Error,
}

impl SeqCounter {
    /// Numbering in memory only, from `first`.
    pub fn starting_at(first: u64) -> SeqCounter {
        let first = first.max(1);
        SeqCounter {
            path: None,
            next: [first, first],
            reserved: Reserved { telemetry: u64::MAX, events: u64::MAX },
        }
    }

    /// Numbering in memory only, from the current time in microseconds: a device
    /// without a state directory still never reuses a number after a restart (unless
    /// the clock goes back), where starting from 1 would make the cloud drop every
    /// batch as already stored.
    pub fn from_clock() -> SeqCounter {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        SeqCounter::starting_at(micros)
    }

    /// Numbering persisted in `dir/{device_id}.seq.json`.
    pub fn load(dir: &Path, device_id: &str) -> Result<SeqCounter, SeqError> {
        let path = dir.join(format!("{device_id}.seq.json"));
        let err = |source| SeqError { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        let reserved: Reserved = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Reserved::default(),
            Err(e) => return Err(err(e)),
        };
        let next = [reserved.telemetry + 1, reserved.events + 1];
        let mut c = SeqCounter { path: Some(path), next, reserved };
        c.reserve()?;
        Ok(c)
    }

    fn reserve(&mut self) -> Result<(), SeqError> {
        let Some(path) = &self.path else { return Ok(()) };
        self.reserved = Reserved { telemetry: self.next[0] - 1 + BLOCK, events: self.next[1] - 1 + BLOCK };
        let tmp = path.with_extension("tmp");
        let err = |source| SeqError { path: path.clone(), source };
        let bytes = serde_json::to_vec(&self.reserved).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        // The rename is durable only once its directory is: without this, a power loss
        // could bring back the old reservation and numbers would be reused.
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        Ok(())
    }

    /// The next number of `stream`.
    pub fn next(&mut self, stream: Stream) -> Result<u64, SeqError> {
        let i = match stream {
            Stream::Telemetry => 0,
            // Batch records are numbered by the run desk; share the events counter if asked.
            Stream::Events | Stream::Batch => 1,
        };
        let limit = if i == 0 { self.reserved.telemetry } else { self.reserved.events };
        if self.next[i] > limit {
            self.reserve()?;
        }
        let n = self.next[i];
        self.next[i] += 1;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_numbering_starts_above_any_earlier_run() {
        let a = SeqCounter::from_clock().next(Stream::Telemetry).expect("next");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = SeqCounter::from_clock().next(Stream::Telemetry).expect("next");
        assert!(b > a + 1_000, "{a} then {b}");
        assert!(i64::try_from(b).is_ok(), "fits the cloud's signed sequence numbers");
    }

    #[test]
    fn numbering_never_repeats_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("nf-seq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = SeqCounter::load(&dir, "NF-1").expect("load");
        let first: Vec<u64> = (0..3).map(|_| a.next(Stream::Telemetry).expect("next")).collect();
        assert_eq!(first, vec![1, 2, 3]);
        drop(a);
        let mut b = SeqCounter::load(&dir, "NF-1").expect("reload");
        assert!(b.next(Stream::Telemetry).expect("next") > 3);
        assert_eq!(b.next(Stream::Events).expect("next"), BLOCK + 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
