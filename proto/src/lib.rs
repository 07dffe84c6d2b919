//! `broker.v1`: the protobuf messages and tonic services of the broker and its proxies,
//! the method paths a signature covers ([`methods`]), signed calls in gRPC metadata
//! ([`signed`]), TLS with pinned certificates ([`tls`]), the wire limits, and the one
//! conversion between messages and the domain types ([`convert`]).
//!
//! Generated at build time from `proto/broker/v1/broker.proto` with `protox`, so no
//! system `protoc` is needed. Domain crates never see these types: the broker's gRPC
//! adapter, the proxy's adapter and the client's wire module convert at their edges.

pub mod convert;
pub mod methods;
pub mod signed;
pub mod tls;

/// The largest message either side encodes or decodes (a batch of envelopes, a bulk
/// upload).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("broker.v1");

    /// The encoded `FileDescriptorSet` of broker.v1, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/broker_v1_descriptor.bin"));
}
