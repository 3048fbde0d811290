//! The device's two system slots and its bootloader, behind a trait: [`FileSlots`]
//! simulates them with files for the simulator and tests; real hardware implements
//! [`Slots`] over RAUC, SWUpdate or a U-Boot A/B scheme.
//!
//! The bootloader boots the default slot, or a slot armed for one trial boot; the
//! trial is consumed by the boot that tries it, so a second boot (a power loss during
//! the trial) returns to the default.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::update::Slot;

/// What the bootloader did at the last boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    /// The slot running now.
    pub booted: Slot,
    /// The slot the bootloader boots unless a trial is armed (now, not at the boot).
    pub default: Slot,
    /// The slot tried once at the last boot, if one was armed.
    pub trial: Option<Slot>,
}

/// The slots and bootloader of a device.
pub trait Slots {
    /// What the bootloader did at the boot that started this agent.
    fn boot_state(&self) -> BootState;
    /// Writes `image` into `slot` (never the running one) and makes it durable.
    fn write(&mut self, slot: Slot, image: &mut dyn Read) -> std::io::Result<u64>;
    /// Arms a one-time trial boot of `slot`, or disarms one (`None`).
    fn arm_trial(&mut self, slot: Option<Slot>) -> std::io::Result<()>;
    /// Makes `slot` the default.
    fn commit(&mut self, slot: Slot) -> std::io::Result<()>;
    /// Reboots. Simulated slots boot at once and return the new boot state; real
    /// hardware does not return (the agent starts again after the boot).
    fn reboot(&mut self) -> std::io::Result<BootState>;
    /// Checks that the device works on the slot it runs (simulated: what the image's
    /// header says; real hardware: the device's self-test).
    fn health_check(&self) -> Result<(), String>;
}

/// Power-cut drills: the step of an update at which the simulated hardware hangs
/// until the agent's process is killed (`nanofleet-agent run --sim-hang-at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HangAt {
    /// After the first part of the image arrived.
    Download,
    /// Halfway through writing the inactive slot (a torn write).
    Install,
    /// With the trial boot armed, before the reboot.
    Reboot,
    /// In the new slot's health check.
    Verify,
    /// Before the new slot is made the default.
    Commit,
}

impl HangAt {
    pub const NAMES: [&'static str; 5] = ["download", "install", "reboot", "verify", "commit"];

    pub fn parse(s: &str) -> Option<HangAt> {
        Some(match s {
            "download" => HangAt::Download,
            "install" => HangAt::Install,
            "reboot" => HangAt::Reboot,
            "verify" => HangAt::Verify,
            "commit" => HangAt::Commit,
            _ => return None,
        })
    }
}

/// Hangs the calling thread for good (the drill kills the process).
pub(crate) fn hang(at: HangAt) -> ! {
    tracing::warn!(?at, "simulated hardware hangs here until the process is killed");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// First line of a simulated firmware image.
const MAGIC: &[u8] = b"NFIMG1\n";

/// What a simulated image says of itself (its second line, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHeader {
    pub model: String,
    pub version: String,
    pub release_counter: u64,
    /// A fault built into the image: `none`, `health` (boots, fails its health
    /// check), `no-boot` (the bootloader cannot start it) or `qc` (boots and passes
    /// its health check, but trims the ethanol pump 15 % low: its batches come out
    /// with larger particles and less encapsulation, which only the rollout's health
    /// gate can see).
    #[serde(default = "no_fault")]
    pub fault: String,
}

fn no_fault() -> String {
    "none".into()
}

/// A simulated firmware image: header, then `size` bytes of payload.
pub fn sim_image(header: &ImageHeader, size: usize) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend(serde_json::to_vec(header).expect("a header serialises"));
    out.push(b'\n');
    // A payload that is not all zeros, so a torn write shows in the hash.
    out.extend((0..size).map(|i| (i * 31 % 251) as u8));
    out
}

/// The header of a simulated image, if it has a well-formed one.
pub fn read_header(path: &Path) -> Option<ImageHeader> {
    let mut buf = vec![0u8; 4096];
    let mut f = std::fs::File::open(path).ok()?;
    let n = f.read(&mut buf).ok()?;
    let rest = buf[..n].strip_prefix(MAGIC)?;
    let line = rest.split(|b| *b == b'\n').next()?;
    serde_json::from_slice(line).ok()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BootEnv {
    default: Slot,
    /// Armed for the next boot.
    #[serde(default)]
    armed: Option<Slot>,
    /// What the last boot did.
    last: BootState,
}

/// Two image files and a bootloader environment in a directory:
/// `slot-a.img`, `slot-b.img`, `bootenv.json`.
#[derive(Debug)]
pub struct FileSlots {
    dir: PathBuf,
    env: BootEnv,
    hang: Option<HangAt>,
}

impl FileSlots {
    /// Powers the simulated device on: the bootloader picks a slot (an armed trial
    /// once, else the default; a slot it cannot start falls back to the default).
    /// A directory without slots is a factory device: `factory` goes to slot A.
    pub fn power_on(dir: &Path, factory: &[u8]) -> std::io::Result<FileSlots> {
        std::fs::create_dir_all(dir)?;
        let env_path = dir.join("bootenv.json");
        let env: BootEnv = match std::fs::read(&env_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_synced(&dir.join("slot-a.img"), factory)?;
                let boot = BootState { booted: Slot::A, default: Slot::A, trial: None };
                BootEnv { default: Slot::A, armed: None, last: boot }
            }
            Err(e) => return Err(e),
        };
        let mut slots = FileSlots { dir: dir.to_owned(), env, hang: None };
        slots.boot()?;
        Ok(slots)
    }

    /// Hangs at `at` during an update (a power-cut drill).
    pub fn hang_at(mut self, at: Option<HangAt>) -> FileSlots {
        self.hang = at;
        self
    }

    pub fn image_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(format!("slot-{}.img", slot.name()))
    }

    /// The header of the image in the running slot.
    pub fn running_header(&self) -> Option<ImageHeader> {
        read_header(&self.image_path(self.env.last.booted))
    }

    fn bootable(&self, slot: Slot) -> bool {
        read_header(&self.image_path(slot)).is_some_and(|h| h.fault != "no-boot")
    }

    fn boot(&mut self) -> std::io::Result<BootState> {
        let default = self.env.default;
        let trial = self.env.armed.take();
        let booted = match trial {
            Some(s) if self.bootable(s) => s,
            _ => default,
        };
        self.env.last = BootState { booted, default, trial };
        self.save()?;
        Ok(self.env.last)
    }

    fn save(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.env).map_err(std::io::Error::other)?;
        let path = self.dir.join("bootenv.json");
        let tmp = self.dir.join("bootenv.json.tmp");
        write_synced(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)
    }
}

impl Slots for FileSlots {
    fn boot_state(&self) -> BootState {
        self.env.last
    }

    fn write(&mut self, slot: Slot, image: &mut dyn Read) -> std::io::Result<u64> {
        if slot == self.env.last.booted {
            return Err(std::io::Error::other(format!(
                "slot {} is running; refusing to write it",
                slot.name()
            )));
        }
        let mut f = std::fs::File::create(self.image_path(slot))?;
        if self.hang == Some(HangAt::Install) {
            let mut first = Vec::new();
            image.read_to_end(&mut first)?;
            f.write_all(&first[..first.len() / 2])?;
            f.sync_all()?;
            hang(HangAt::Install);
        }
        let n = std::io::copy(image, &mut f)?;
        f.sync_all()?;
        Ok(n)
    }

    fn arm_trial(&mut self, slot: Option<Slot>) -> std::io::Result<()> {
        self.env.armed = slot;
        self.save()
    }

    fn commit(&mut self, slot: Slot) -> std::io::Result<()> {
        if self.hang == Some(HangAt::Commit) {
            hang(HangAt::Commit);
        }
        self.env.default = slot;
        self.env.last.default = slot;
        self.env.armed = None;
        self.save()
    }

    fn reboot(&mut self) -> std::io::Result<BootState> {
        if self.hang == Some(HangAt::Reboot) {
            hang(HangAt::Reboot);
        }
        self.boot()
    }

    fn health_check(&self) -> Result<(), String> {
        if self.hang == Some(HangAt::Verify) {
            hang(HangAt::Verify);
        }
        match self.running_header() {
            None => Err(format!("slot {} holds no readable image", self.env.last.booted.name())),
            Some(h) if h.fault == "health" => Err(format!(
                "self-test of firmware {} failed: pump pressure did not reach setpoint",
                h.version
            )),
            Some(_) => Ok(()),
        }
    }
}

/// Writes `bytes` to `path` and syncs it to disk.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: &str, fault: &str) -> ImageHeader {
        ImageHeader {
            model: "NF-MX200".into(),
            version: version.into(),
            release_counter: 1,
            fault: fault.into(),
        }
    }

    #[test]
    fn an_armed_trial_is_booted_once_then_the_default_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSlots::power_on(dir.path(), &sim_image(&header("1.0.0", "none"), 10)).unwrap();
        assert_eq!(s.boot_state(), BootState { booted: Slot::A, default: Slot::A, trial: None });
        s.write(Slot::B, &mut &sim_image(&header("1.1.0", "none"), 10)[..]).unwrap();
        s.arm_trial(Some(Slot::B)).unwrap();
        let b = s.reboot().unwrap();
        assert_eq!(b, BootState { booted: Slot::B, default: Slot::A, trial: Some(Slot::B) });
        // Power lost during the trial: the next boot is the default again.
        let s = FileSlots::power_on(dir.path(), b"unused").unwrap();
        assert_eq!(s.boot_state(), BootState { booted: Slot::A, default: Slot::A, trial: None });
    }

    #[test]
    fn a_slot_that_cannot_start_falls_back_to_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSlots::power_on(dir.path(), &sim_image(&header("1.0.0", "none"), 10)).unwrap();
        s.write(Slot::B, &mut &sim_image(&header("1.1.0", "no-boot"), 10)[..]).unwrap();
        s.arm_trial(Some(Slot::B)).unwrap();
        assert_eq!(
            s.reboot().unwrap(),
            BootState { booted: Slot::A, default: Slot::A, trial: Some(Slot::B) }
        );
    }

    #[test]
    fn the_running_slot_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSlots::power_on(dir.path(), &sim_image(&header("1.0.0", "none"), 10)).unwrap();
        assert!(s.write(Slot::A, &mut &b"x"[..]).is_err());
        assert_eq!(read_header(&s.image_path(Slot::A)).unwrap().version, "1.0.0");
    }

    #[test]
    fn the_health_check_reads_the_fault_built_into_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileSlots::power_on(dir.path(), &sim_image(&header("1.0.0", "health"), 10)).unwrap();
        assert!(s.health_check().unwrap_err().contains("1.0.0"));
    }
}
