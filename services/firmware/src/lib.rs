//! Firmware releases as a TUF image repository, through the maintained `tough` crate.
//!
//! The repository's metadata follows TUF with consistent snapshots: `root` names the
//! keys of each role, `targets` lists the released images (length, SHA-256 and, in
//! `custom`, the hardware model, version and anti-rollback release counter),
//! `snapshot` pins the version of `targets`, `timestamp` pins `snapshot` and expires
//! soon, so a device notices when it is being fed old metadata (freeze) or metadata
//! of different moments (mix and match).
//!
//! Keys come from the fleet trust root ([`nanofleet_pki::trust_root`]): the TUF root
//! is signed by the trust root's `root` keys and must list exactly them, and
//! `targets` must carry a threshold of signatures by keys the device's pinned trust
//! root names under `firmware`, so a firmware key removed from the trust root stops
//! counting at once, whatever an older TUF root says. `snapshot` and `timestamp` are
//! signed by the server's online key (the trust root's `director` role), which can
//! re-sign them without the release key.
//!
//! # Layout
//! - [`keys`]: ed25519 keys as tough signers, and tough's key form of a public key.
//! - [`repo`]: the server's repository: create it, release an image, refresh the
//!   timestamp, rotate the root.
//! - [`https`]: HTTPS GET for devices: tough's transport, and range requests.
//! - [`client`]: the device's side: anchor the TUF root in the pinned trust root, load
//!   the metadata, and check a release for this device.
#![forbid(unsafe_code)]

pub mod client;
pub mod https;
pub mod keys;
pub mod repo;

/// Keys of a target's `custom` object.
pub mod custom {
    pub const HARDWARE_MODEL: &str = "hardware_model";
    pub const VERSION: &str = "version";
    pub const RELEASE_COUNTER: &str = "release_counter";
}

/// The trust-root role whose keys sign `targets` (released images).
pub const FIRMWARE_ROLE: &str = "firmware";
/// The trust-root role of the server's online key (snapshot, timestamp, offers).
pub const ONLINE_ROLE: &str = "director";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("firmware repository {path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    /// Boxed: tough's errors carry a backtrace and are large.
    #[error("TUF: {0}")]
    Tuf(Box<tough::error::Error>),
    #[error("TUF metadata: {0}")]
    Schema(Box<tough::schema::Error>),
    #[error("{0}")]
    Invalid(String),
}

impl From<tough::error::Error> for Error {
    fn from(e: tough::error::Error) -> Error {
        Error::Tuf(Box::new(e))
    }
}

impl From<tough::schema::Error> for Error {
    fn from(e: tough::schema::Error) -> Error {
        Error::Schema(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
