//! Corridor's gRPC protocol: generated prost messages and tonic clients and servers for
//! package `corridor.v1`, plus the file descriptor set used for server reflection.
//!
//! The protobuf encoding is only the transport; what a signature or seal covers is defined
//! by the `corridor` crate's canonical encodings.

#![allow(clippy::all, clippy::pedantic)]

/// Package `corridor.v1`.
pub mod v1 {
    tonic::include_proto!("corridor.v1");
}

/// Package `corridor.bench.v1`: the bare echo service of `corridor bench`.
pub mod bench {
    tonic::include_proto!("corridor.bench.v1");
}

/// Encoded `FileDescriptorSet` of every Corridor proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("corridor_descriptor");
