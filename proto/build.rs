//! Compiles the .proto files with protox (pure Rust, no system protoc) and keeps the
//! encoded file descriptor set for gRPC server reflection.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "corridor/v1/corridor.proto",
        "corridor/bench/v1/bench.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("corridor_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Stored envelopes go into a batch, and back out of it for a retry, uncopied.
        .bytes(".corridor.v1.DeliverBatchRequest.envelopes")
        .compile_fds(fds)?;
    Ok(())
}
