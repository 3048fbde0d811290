//! Formulation recipes: what they may contain, how they are signed, and how a device
//! decides to accept one. Both the server (drafting, signing, delivery) and the device
//! agent (verification) use this crate; it does no I/O and reads no clock.
//!
//! # Format
//!
//! A recipe (`nanofleet.device.v1.Recipe`) is signed by two people: its author
//! (meaning `AUTHORED`, trust-root role `recipe-author`) and a QA approver (`APPROVED`,
//! `recipe-approver`). Each signs a `RecipeStatement` holding the exact encoded recipe
//! bytes, their person id, printed name, meaning and time. The statement is wrapped in
//! a DSSE v1 envelope with payload type [`dsse::RECIPE_PAYLOAD_TYPE`] and an ed25519
//! signature over DSSE's pre-authentication encoding, so a signature cannot be moved
//! to another recipe, version, meaning or document type. A `RecipeDelivery` carries one
//! envelope per signer.
//!
//! # Checks on the device
//!
//! [`verify::verify_delivery`] accepts a delivery only if, in this order: it is at most
//! 64 KiB and decodes; every envelope is a recipe statement; all statements sign the
//! same recipe bytes; each has one signature by a key the pinned trust root lists in the
//! role of its meaning, owned by the person the statement names, and the signature
//! verifies; no key or person signs twice; each role's threshold is met; the recipe
//! decodes and passes [`validate::validate`]; the device clock is within its validity
//! window; it is not older than (or a different copy of) the version the device holds
//! (the same copy again is `already_held`, still judged by the checks after it); it
//! targets the device or its site, its model and firmware; and it fits the model's
//! [`envelope::HardwareEnvelope`]. A refusal carries a stable code for `Ack.code` and a
//! reason naming the value and what was allowed.
//!
//! # Layout
//!
//! - [`mod@validate`]: formulation limits every recipe must meet, all problems at once.
//! - [`envelope`]: per-model hardware limits.
//! - [`dsse`]: DSSE v1 envelopes, signing and verification.
//! - [`sign`]: the server's statements, signatures and digests.
//! - [`verify`]: the device's verifier and trust-root rotation.
//! - [`batch`]: batch records: QC against release criteria, the device's signature.
//! - [`json`]: recipes as proto3 JSON.
//! - [`example`]: a valid example recipe.
#![forbid(unsafe_code)]

pub mod batch;
pub mod dsse;
pub mod envelope;
pub mod example;
pub mod json;
pub mod sign;
pub mod validate;
pub mod verify;

pub use envelope::HardwareEnvelope;
pub use validate::{FieldError, Invalid, validate};
pub use verify::{
    DeviceContext, Held, MAX_DELIVERY_BYTES, Refusal, Signer, Verified, apply_root_updates, verify_delivery,
};
