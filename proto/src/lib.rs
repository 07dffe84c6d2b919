//! `broker.v1`: the protobuf messages and tonic services of the broker and its proxies.
//!
//! Generated at build time from `proto/broker/v1/broker.proto` with `protox`, so no
//! system `protoc` is needed. Domain crates convert to and from these types at their
//! gRPC edges only.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("broker.v1");

    /// The encoded `FileDescriptorSet` of broker.v1, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/broker_v1_descriptor.bin"));
}
