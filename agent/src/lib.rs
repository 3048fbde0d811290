//! `nanofleet-agent`: the software on a formulation device that talks to the Nanofleet
//! cloud, and a fleet simulator that runs many simulated devices in one process.
//!
//! # Layout
//! - [`hal`]: the device hardware-abstraction trait.
//! - [`sim`]: a simulated device with realistic physics, alarms and injectable faults.
//! - [`outbox`]: unacknowledged messages and what to (re)send; pure state.
//! - [`seq`]: per-stream sequence numbers that survive restarts.
//! - [`enroll`]: the device's key and certificate: enrollment with a token, renewal.
//! - [`recipes`]: the pinned trust root and the verified recipes; answers commands.
//! - [`runs`]: run interlocks, the batch recorder and the device's signature on records.
//! - [`link`]: the MQTT edge that runs one device.
//! - [`update`]: the firmware update engine, a pure A/B state machine.
//! - [`slots`]: the device's two system slots and bootloader; simulated with files.
//! - [`updater`]: carries out the update engine's actions; survives power loss.
//! - [`updates`]: firmware offers from the cloud, checked, then run on a worker thread.
//! - [`fleet`]: many simulated devices, each with its own connection.
//! - [`process`]: logging, signals, error reports and exit codes of the binaries.
#![forbid(unsafe_code)]

pub mod enroll;
pub mod fleet;
pub mod hal;
pub mod link;
pub mod outbox;
pub mod process;
pub mod recipes;
pub mod runs;
pub mod seq;
pub mod sim;
pub mod slots;
pub mod update;
pub mod updater;
pub mod updates;

/// Resident memory of this process in bytes (Linux), for the simulator's report.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
