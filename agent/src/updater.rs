//! The edge of the update engine: carries out [`crate::update`]'s actions against the
//! slots, the download and the state directory.
//!
//! The engine is written to `update.json` (through a synced temporary file) after
//! every step and before that step's actions run, so whatever the device loses
//! power in the middle of, the next start resumes from a state that is on disk:
//! [`Updater::resume`] tells the engine how the device booted and carries on. The
//! image being downloaded is `update.download`; a download resumes after the bytes
//! it holds.

use std::collections::VecDeque;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::slots::{Slots, sync_dir, write_synced};
use crate::update::{Action, Engine, Firmware, Input, Report};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("update state {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("update state {path} is not a readable engine state: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("bootloader: {0}")]
    Boot(std::io::Error),
}

/// Fetches image bytes from where an offer says the image is.
pub trait Fetch {
    /// Appends the bytes of the image at `url` from `offset` to the end to `out`;
    /// returns how many it wrote. On an error the bytes written so far stay written.
    fn fetch(&mut self, url: &str, offset: u64, out: &mut dyn Write) -> Result<u64, String>;
}

/// Images that are files on the device (a local install from a USB stick, tests).
#[derive(Debug, Default)]
pub struct FileFetch;

impl Fetch for FileFetch {
    fn fetch(&mut self, url: &str, offset: u64, out: &mut dyn Write) -> Result<u64, String> {
        let path = url.strip_prefix("file://").unwrap_or(url);
        let mut f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
        f.seek(std::io::SeekFrom::Start(offset)).map_err(|e| format!("{path}: {e}"))?;
        std::io::copy(&mut f, out).map_err(|e| format!("{path}: {e}"))
    }
}

/// Hears each report as the engine makes it (to publish progress while the
/// update goes on).
pub type Reporter = Box<dyn FnMut(&Report) + Send>;

/// The update engine with its state directory and the device's slots.
pub struct Updater<S: Slots> {
    dir: PathBuf,
    engine: Engine,
    slots: S,
    /// Bytes fetched by downloads since this updater was opened.
    pub fetched_bytes: u64,
    reporter: Option<Reporter>,
}

impl<S: Slots + std::fmt::Debug> std::fmt::Debug for Updater<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("dir", &self.dir)
            .field("engine", &self.engine)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl<S: Slots> Updater<S> {
    /// Loads the engine from `dir/update.json`, or starts a factory one.
    pub fn open(dir: &Path, slots: S, model: &str, factory: Firmware) -> Result<Updater<S>, Error> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("update.json");
        let engine = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt { path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Engine::factory(model, factory),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        Ok(Updater { dir: dir.to_owned(), engine, slots, fetched_bytes: 0, reporter: None })
    }

    /// Calls `reporter` with each report as it is made.
    pub fn with_reporter(mut self, reporter: Reporter) -> Updater<S> {
        self.reporter = Some(reporter);
        self
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn slots(&self) -> &S {
        &self.slots
    }

    /// After the agent starts: tells the engine how the device booted and carries the
    /// update under way (if any) as far as it goes.
    pub fn resume(&mut self, busy: bool, fetch: &mut dyn Fetch) -> Result<Vec<Report>, Error> {
        let b = self.slots.boot_state();
        self.handle(Input::Booted { booted: b.booted, default: b.default, trial: b.trial }, busy, fetch)
    }

    /// Feeds `input` to the engine and carries out what follows until the engine waits
    /// for something from outside (an offer, the device going idle, an install order).
    pub fn handle(&mut self, input: Input, busy: bool, fetch: &mut dyn Fetch) -> Result<Vec<Report>, Error> {
        let mut reports = Vec::new();
        let mut queue = VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            let actions = self.engine.step(input, busy);
            self.persist()?;
            for action in actions {
                match action {
                    Action::Report(r) => {
                        tracing::info!(rollout = %r.rollout_id, version = %r.version, status = ?r.status, code = %r.code, detail = %r.detail, "update");
                        if let Some(hear) = &mut self.reporter {
                            hear(&r);
                        }
                        reports.push(r);
                    }
                    Action::Download => queue.push_back(self.download(fetch)?),
                    Action::Install { slot } => {
                        let result = self.download_file().and_then(|mut f| self.slots.write(slot, &mut f));
                        queue.push_back(Input::Written(result.map(drop).map_err(|e| e.to_string())));
                    }
                    Action::Reboot { trial } => {
                        self.slots.arm_trial(trial).map_err(Error::Boot)?;
                        let b = self.slots.reboot().map_err(Error::Boot)?;
                        queue.push_back(Input::Booted {
                            booted: b.booted,
                            default: b.default,
                            trial: b.trial,
                        });
                    }
                    Action::HealthCheck => queue.push_back(Input::HealthChecked(self.slots.health_check())),
                    Action::Commit { slot } => {
                        self.slots.commit(slot).map_err(Error::Boot)?;
                        queue.push_back(Input::CommitDone);
                    }
                    Action::Discard => {
                        let path = self.download_path();
                        match std::fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(Error::Io { path, source: e }),
                        }
                    }
                }
            }
        }
        Ok(reports)
    }

    fn download_path(&self) -> PathBuf {
        self.dir.join("update.download")
    }

    fn download_file(&self) -> std::io::Result<std::fs::File> {
        std::fs::File::open(self.download_path())
    }

    /// Fetches what is missing of the image, then hashes all of it.
    fn download(&mut self, fetch: &mut dyn Fetch) -> Result<Input, Error> {
        let Some(job) = &self.engine.job else {
            return Ok(Input::DownloadFailed { reason: "no update".into() });
        };
        let (url, length) = (job.offer.url.clone(), job.offer.length);
        let path = self.download_path();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut held = file.metadata().map_err(io(&path))?.len();
        if held > length {
            file.set_len(0).map_err(io(&path))?;
            held = 0;
        }
        if held < length {
            if held > 0 {
                tracing::info!(held, length, "download resumes after the bytes held");
            }
            let mut sink = Counted { inner: &mut file, count: 0 };
            let result = fetch.fetch(&url, held, &mut sink);
            self.fetched_bytes += sink.count;
            file.sync_all().map_err(io(&path))?;
            if let Err(reason) = result {
                return Ok(Input::DownloadFailed { reason });
            }
        }
        let mut hasher = sha2::Sha256::new();
        let mut f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Ok(Input::Downloaded { sha256: hex::encode(hasher.finalize()), length: total })
    }

    fn persist(&self) -> Result<(), Error> {
        let path = self.dir.join("update.json");
        let tmp = self.dir.join("update.json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.engine)
            .map_err(|e| Error::Io { path: path.clone(), source: std::io::Error::other(e) })?;
        write_synced(&tmp, &bytes).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir).map_err(io(&self.dir))
    }
}

/// Counts the bytes written through it.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::{BootState, FileSlots, ImageHeader, read_header, sim_image};
    use crate::update::{ActionType, Offer, Slot, Status, code};

    const MODEL: &str = "NF-MX200";

    fn factory() -> (Vec<u8>, Firmware) {
        let h = ImageHeader {
            model: MODEL.into(),
            version: "2.3.1".into(),
            release_counter: 7,
            fault: "none".into(),
        };
        (sim_image(&h, 1000), Firmware { version: "2.3.1".into(), release_counter: 7 })
    }

    /// A new image in `dir/new.img` and its offer.
    fn new_image(dir: &Path, fault: &str) -> Offer {
        let h = ImageHeader {
            model: MODEL.into(),
            version: "2.4.0".into(),
            release_counter: 8,
            fault: fault.into(),
        };
        let img = sim_image(&h, 200_000);
        let path = dir.join("new.img");
        std::fs::write(&path, &img).unwrap();
        Offer {
            rollout_id: "r1".into(),
            version: "2.4.0".into(),
            model: MODEL.into(),
            release_counter: 8,
            sha256: hex::encode(sha2::Sha256::digest(&img)),
            length: img.len() as u64,
            action: ActionType::Soft,
            url: path.display().to_string(),
        }
    }

    fn start(dir: &Path) -> Updater<FileSlots> {
        let (img, fw) = factory();
        let slots = FileSlots::power_on(&dir.join("slots"), &img).unwrap();
        Updater::open(&dir.join("state"), slots, MODEL, fw).unwrap()
    }

    fn last(reports: &[Report]) -> Status {
        reports.last().expect("a report").status
    }

    /// The device runs a bootable image, and it is the one the engine says it runs.
    fn assert_runs_a_good_slot(u: &Updater<FileSlots>) {
        let b = u.slots().boot_state();
        let h = read_header(&u.slots().image_path(b.booted)).expect("running slot holds an image");
        assert_eq!(h.version, u.engine().running.version, "{b:?}");
        assert_eq!(b.booted, b.default, "runs the committed slot");
    }

    #[test]
    fn a_local_install_commits_the_new_slot() {
        let dir = tempfile::tempdir().unwrap();
        let offer = new_image(dir.path(), "none");
        let mut u = start(dir.path());
        let r = u.handle(Input::Offer(offer), false, &mut FileFetch).unwrap();
        assert_eq!(last(&r), Status::Committed, "{r:?}");
        assert_eq!(u.engine().running.version, "2.4.0");
        assert_eq!(u.slots().boot_state().booted, Slot::B);
        assert!(!dir.path().join("state/update.download").exists(), "the download is removed");
        assert_runs_a_good_slot(&u);
    }

    #[test]
    fn an_image_that_fails_its_health_check_is_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let offer = new_image(dir.path(), "health");
        let mut u = start(dir.path());
        let r = u.handle(Input::Offer(offer), false, &mut FileFetch).unwrap();
        let end = r.last().unwrap();
        assert_eq!((end.status, end.code.as_str()), (Status::RolledBack, code::HEALTH_CHECK_FAILED));
        assert!(end.detail.contains("pump pressure"), "{end:?}");
        assert_eq!(u.engine().running.version, "2.3.1");
        assert_runs_a_good_slot(&u);
    }

    #[test]
    fn an_image_that_does_not_boot_is_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let offer = new_image(dir.path(), "no-boot");
        let mut u = start(dir.path());
        let r = u.handle(Input::Offer(offer), false, &mut FileFetch).unwrap();
        assert_eq!(r.last().unwrap().code, code::BOOT_FAILED);
        assert_runs_a_good_slot(&u);
    }

    /// Loses power (a panic stands for it) at the `cut_at`th point: before or after
    /// each operation on the slots. Cut before a write, half the image is written.
    #[derive(Debug)]
    struct PowerCut {
        inner: FileSlots,
        points: usize,
        cut_at: usize,
    }

    impl PowerCut {
        fn point(&mut self) -> bool {
            self.points += 1;
            self.points == self.cut_at
        }
    }

    impl Slots for PowerCut {
        fn boot_state(&self) -> BootState {
            self.inner.boot_state()
        }
        fn write(&mut self, slot: Slot, image: &mut dyn Read) -> std::io::Result<u64> {
            if self.point() {
                let mut half = vec![0u8; 50_000];
                image.read_exact(&mut half)?;
                self.inner.write(slot, &mut &half[..])?;
                panic!("power lost while writing slot {}", slot.name());
            }
            let n = self.inner.write(slot, image)?;
            assert!(!self.point(), "power lost after writing slot {}", slot.name());
            Ok(n)
        }
        fn arm_trial(&mut self, slot: Option<Slot>) -> std::io::Result<()> {
            assert!(!self.point(), "power lost before arming");
            self.inner.arm_trial(slot)?;
            assert!(!self.point(), "power lost after arming");
            Ok(())
        }
        fn commit(&mut self, slot: Slot) -> std::io::Result<()> {
            assert!(!self.point(), "power lost before the commit");
            self.inner.commit(slot)?;
            assert!(!self.point(), "power lost after the commit");
            Ok(())
        }
        fn reboot(&mut self) -> std::io::Result<BootState> {
            assert!(!self.point(), "power lost before the reboot");
            self.inner.reboot()
        }
        fn health_check(&self) -> Result<(), String> {
            self.inner.health_check()
        }
    }

    /// Fetches `limit` bytes, then fails like a cut connection.
    struct CutFetch {
        limit: u64,
    }

    impl Fetch for CutFetch {
        fn fetch(&mut self, url: &str, offset: u64, out: &mut dyn Write) -> Result<u64, String> {
            let mut all = Vec::new();
            FileFetch.fetch(url, offset, &mut all)?;
            let n = (all.len() as u64).min(self.limit) as usize;
            out.write_all(&all[..n]).map_err(|e| e.to_string())?;
            if n < all.len() { Err(format!("connection reset after {n} bytes")) } else { Ok(n as u64) }
        }
    }

    #[test]
    fn power_lost_at_every_step_leaves_the_device_on_a_good_slot_and_the_update_ends() {
        let mut cut_at = 1;
        loop {
            let dir = tempfile::tempdir().unwrap();
            let offer = new_image(dir.path(), "none");
            let (img, fw) = factory();
            let slots = FileSlots::power_on(&dir.path().join("slots"), &img).unwrap();
            let mut u = Updater::open(
                &dir.path().join("state"),
                PowerCut { inner: slots, points: 0, cut_at },
                MODEL,
                fw,
            )
            .unwrap();
            let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                u.handle(Input::Offer(offer.clone()), false, &mut FileFetch)
            }));
            if let Ok(done) = first {
                // No point left to cut at: every one was covered.
                assert_eq!(last(&done.unwrap()), Status::Committed);
                assert!(cut_at > 7, "the update passes more than {cut_at} points");
                break;
            }
            drop(u);
            // Power comes back: the bootloader boots, the agent starts again.
            let mut u = start(dir.path());
            let r = u.resume(false, &mut FileFetch).unwrap();
            let end = r.last().unwrap_or_else(|| panic!("cut at {cut_at}: the update reports its end"));
            assert!(end.status.is_final(), "cut at {cut_at}: {r:?}");
            assert!(
                end.status == Status::Committed
                    || (end.status == Status::RolledBack && end.code == code::POWER_LOST),
                "cut at {cut_at}: {end:?}"
            );
            assert!(u.engine().job.is_none());
            assert_runs_a_good_slot(&u);
            cut_at += 1;
        }
    }

    #[test]
    fn a_cut_download_resumes_and_fetches_no_byte_twice() {
        let dir = tempfile::tempdir().unwrap();
        let offer = new_image(dir.path(), "none");
        let length = offer.length;
        let mut u = start(dir.path());
        let r = u.handle(Input::Offer(offer), false, &mut CutFetch { limit: 70_000 }).unwrap();
        assert_eq!(last(&r), Status::Committed, "{r:?}");
        assert_eq!(u.fetched_bytes, length, "each byte fetched once over three attempts");
    }

    /// Fetches `limit` bytes, then the agent is killed (a panic stands for it).
    struct KilledFetch {
        limit: usize,
    }

    impl Fetch for KilledFetch {
        fn fetch(&mut self, url: &str, offset: u64, out: &mut dyn Write) -> Result<u64, String> {
            let mut all = Vec::new();
            FileFetch.fetch(url, offset, &mut all)?;
            out.write_all(&all[..self.limit]).map_err(|e| e.to_string())?;
            panic!("agent killed during the download");
        }
    }

    #[test]
    fn a_download_cut_by_a_restart_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let offer = new_image(dir.path(), "none");
        let length = offer.length;
        let mut u = start(dir.path());
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            u.handle(Input::Offer(offer), false, &mut KilledFetch { limit: 30_000 })
        }));
        assert!(killed.is_err());
        drop(u);
        let mut u = start(dir.path());
        let r = u.resume(false, &mut FileFetch).unwrap();
        assert_eq!(last(&r), Status::Committed, "{r:?}");
        assert_eq!(u.fetched_bytes, length - 30_000, "only the missing bytes are fetched");
    }
}
