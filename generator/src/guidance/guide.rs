//! The `Guide` seam: whatever computes ∇ₓ log p(c | x) for a batch of latents — a guide server
//! over the Open Inference Protocol ([`super::oip`]) or an ONNX Runtime session in this process
//! ([`super::local`]). The guidance loop ([`super::step`]) sees only this trait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dlm_proto::card::GuideCard;
pub use dlm_proto::guide_contract::{Dims, GuideBatch, GuideOutputs};

use crate::{Error, Result};

#[tonic::async_trait]
pub trait Guide: Send + Sync + 'static {
    /// log p(c | x) [rows] and ∂/∂x [rows·L·D] for a batch in the contract's layout.
    async fn gradient(&self, dims: Dims, batch: GuideBatch) -> Result<GuideOutputs>;
    /// The guide's card: its label space and the generator model it was trained for.
    async fn card(&self) -> Result<GuideCard>;
    /// Ok when the guide answers now (a cheap probe: OIP ModelReady).
    async fn probe(&self) -> Result<()>;
    /// Where it runs, for Describe and logs.
    fn endpoint(&self) -> String;
}

/// A guide the generator may call, with its label space and its last known readiness.
pub struct RegisteredGuide {
    pub name: String,
    pub guide: Arc<dyn Guide>,
    pub fields: Vec<(String, Vec<String>)>,
    pub dims: Dims,
    ready: AtomicBool,
}

/// "field=value" → (field, value), or INVALID_ARGUMENT naming the bad target.
pub(crate) fn split_target(spec: &str) -> Result<(&str, &str)> {
    spec.split_once('=').ok_or_else(|| {
        Error::invalid(
            "controls.targets",
            format!("`{}` is not of the form field=value", clip(spec)),
        )
    })
}

/// User input echoed in an error, cut to a readable length.
fn clip(s: &str) -> String {
    dlm_proto::guide_contract::clip(s, 64)
}

impl RegisteredGuide {
    pub fn new(name: &str, guide: Arc<dyn Guide>, card: &GuideCard) -> Self {
        Self {
            name: name.to_string(),
            guide,
            fields: card
                .fields
                .iter()
                .map(|f| (f.name.clone(), f.values.clone()))
                .collect(),
            dims: Dims::of(card),
            ready: AtomicBool::new(true),
        }
    }

    /// Whether the last call or probe reached the guide.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        if self.ready.swap(ready, Ordering::Relaxed) != ready {
            tracing::info!(guide = %self.name, ready, "guide readiness changed");
        }
    }

    /// One call, its latency recorded under the guide's (registered, hence bounded) name, its
    /// outcome kept as the guide's readiness.
    pub async fn gradient(&self, batch: GuideBatch) -> Result<GuideOutputs> {
        let started = std::time::Instant::now();
        let out = self.guide.gradient(self.dims, batch).await;
        metrics::histogram!("dlm_generator_guide_seconds", "guide" => self.name.clone())
            .record(started.elapsed().as_secs_f64());
        self.set_ready(out.is_ok());
        out
    }

    /// The values field `field` takes, if this guide reads it.
    pub fn values(&self, field: &str) -> Option<&[String]> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(field.trim()))
            .map(|(_, v)| v.as_slice())
    }

    pub fn reads(&self, field: &str) -> bool {
        self.fields
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(field.trim()))
    }

    /// "field=value" strings → a value id per field (−1 where unconstrained).
    pub fn targets(&self, specs: &[String]) -> Result<Vec<i64>> {
        let mut out = vec![-1i64; self.fields.len()];
        for spec in specs {
            let (field, value) = split_target(spec)?;
            let (fi, (_, values)) = self
                .fields
                .iter()
                .enumerate()
                .find(|(_, (n, _))| n.eq_ignore_ascii_case(field.trim()))
                .ok_or_else(|| {
                    Error::invalid(
                        "controls.targets",
                        format!(
                            "guide `{}` has no field `{}` (fields: {})",
                            self.name,
                            clip(field.trim()),
                            self.fields
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?;
            let vi = values
                .iter()
                .position(|v| v.eq_ignore_ascii_case(value.trim()))
                .ok_or_else(|| {
                    Error::invalid(
                        "controls.targets",
                        format!(
                            "field `{}` has no value `{}` (values: {})",
                            field.trim(),
                            clip(value.trim()),
                            values.join(", ")
                        ),
                    )
                })?;
            out[fi] = vi as i64;
        }
        Ok(out)
    }
}
