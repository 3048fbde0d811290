//! The Nanofleet contract between devices and the cloud, and between the cloud and
//! its operators.
//!
//! - [`device::v1`]: MQTT payloads (telemetry, events, presence), encoded with protobuf.
//! - [`v1`]: the gRPC API (with the `grpc` feature: tonic clients and servers).
//! - [`topics`]: the MQTT topic names, defined once for both sides.
//!
//! Devices in the field run old schemas for years: `buf breaking` guards every change
//! against the committed baseline image `proto/baseline.binpb`.
#![forbid(unsafe_code)]

pub mod topics;

#[cfg(feature = "grpc")]
mod generated {
    pub mod device {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/grpc/nanofleet.device.v1.rs"));
        }
    }
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/grpc/nanofleet.v1.rs"));
    }
}

#[cfg(not(feature = "grpc"))]
mod generated {
    pub mod device {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/messages/nanofleet.device.v1.rs"));
        }
    }
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/messages/nanofleet.v1.rs"));
    }
}

pub use generated::{device, v1};

/// Encoded `FileDescriptorSet` of every Nanofleet `.proto` file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nanofleet_descriptor.bin"));

pub use prost::{self, Message};
