//! dlm-guide: a stateless gradient server. A guide model maps (noisy latents, timesteps, wanted
//! attribute values) to log p(c | x_t) and its gradient ∂ log p / ∂ x_t; this crate serves such
//! models over the Open Inference Protocol (KServe v2) with ONNX Runtime.
//!
//! - [`runtime`]: ONNX Runtime set-up, sessions, the tensor contract of a guide model.
//! - [`card`]: the guide card — label space and the generator it was trained for (shared with the
//!   generator through `dlm-proto`).
//! - [`batcher`]: dynamic batching of concurrent requests into one ONNX Runtime run.
//! - [`repository`]: model repository (`DIR/<model>/<version>/model.onnx`), versions, hot swap.
//! - [`server`]: the OIP gRPC service, guide cards, health, reflection; wire ↔ domain.

pub mod batcher;
pub use dlm_proto::card;
pub mod error;
pub mod repository;
pub mod runtime;
pub mod server;

pub use error::{GuideError, Result};
