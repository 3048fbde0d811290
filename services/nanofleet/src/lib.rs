//! The Nanofleet server as a library: [`server::Server`] wires storage, ingest, the
//! embedded MQTT broker, the gRPC API and the dashboard together. The `nanofleet`
//! binary (server, demo, CLI) and the end-to-end tests both start it from here.
//!
//! # Layout
//! - [`server`]: options, start, addresses, orderly shutdown.
//! - [`demo`]: the server plus an in-process simulated fleet.
//! - [`cli`]: the operator commands that talk gRPC to a server.
#![forbid(unsafe_code)]

pub mod cli;
pub mod demo;
pub mod server;
