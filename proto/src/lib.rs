//! dlm-proto: the wire contracts of dlm, and nothing else.
//!
//! - [`dlm::v1`]: the generator's public API (`dlm/v1/generator.proto`) and guide cards
//!   (`dlm/v1/guide.proto`).
//! - [`inference`]: the Open Inference Protocol (KServe v2) that guides speak.
//! - [`card`]: the guide card as JSON (`card.json`, ONNX metadata), read by guides and generator.
//! - [`security`]: admin-call token and TLS flags shared by both servers.
//! - [`guide_contract`]: the guide tensor contract over OIP — the one encoder and decoder of it.
//!
//! The encoded file descriptor set is exported for gRPC reflection.

pub mod card;
pub mod guide_contract;
pub mod security;

pub mod dlm {
    pub mod v1 {
        tonic::include_proto!("dlm.v1");
        include!(concat!(env!("OUT_DIR"), "/dlm.v1.serde.rs"));
    }
}

pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of every .proto here (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dlm_descriptor");
