//! Compiles the `.proto` files with `protox` (pure Rust, no system `protoc`) and
//! generates prost messages plus tonic clients and servers.

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &[
    "nanofleet/device/v1/device.proto",
    "nanofleet/device/v1/recipe.proto",
    "nanofleet/device/v1/run.proto",
    "nanofleet/device/v1/update.proto",
    "nanofleet/device/v1/inventory.proto",
    "nanofleet/v1/batches.proto",
    "nanofleet/v1/fleet.proto",
    "nanofleet/v1/telemetry.proto",
    "nanofleet/v1/enrollment.proto",
    "nanofleet/v1/people.proto",
    "nanofleet/v1/audit.proto",
    "nanofleet/v1/recipes.proto",
    "nanofleet/v1/monitoring.proto",
    "nanofleet/v1/firmware.proto",
    "nanofleet/v1/rollouts.proto",
    "nanofleet/v1/inventory.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    // Served by gRPC reflection so that grpcurl and friends can discover the API.
    std::fs::write(out.join("nanofleet_descriptor.bin"), fds.encode_to_vec())?;
    // Two flavours, so the agent can take the messages without tonic.
    for (dir, services) in [("messages", false), ("grpc", true)] {
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir)?;
        tonic_prost_build::configure()
            .out_dir(&dir)
            .build_client(services)
            .build_server(services)
            .compile_fds(fds.clone())?;
    }
    Ok(())
}
