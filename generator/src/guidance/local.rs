//! A guide model run in this process on ONNX Runtime (dlm-guide's session and batcher): a
//! single-process deployment, and the engine's tests, need no network.

use std::path::Path;

use dlm_guide::batcher::{BatchOptions, Batcher};
use dlm_guide::runtime::{GuideSession, SessionOptions};
use dlm_proto::card::GuideCard;

use super::guide::{Dims, Guide, GuideBatch, GuideOutputs};
use crate::{Error, Result};

pub struct LocalGuide {
    path: String,
    card: GuideCard,
    batcher: Batcher,
}

impl LocalGuide {
    /// Loads `model.onnx` (its card from the model's metadata), smoke-tests it, and starts its
    /// batch worker. ONNX Runtime is found as dlm-guide finds it (ORT_DYLIB_PATH or deploy/setup.sh).
    pub fn load(path: &Path) -> Result<Self> {
        let refuse = |e: dlm_guide::GuideError| {
            Error::FailedPrecondition(format!("in-process guide {}: {e}", path.display()))
        };
        dlm_guide::runtime::init(None).map_err(refuse)?;
        let label = path.display().to_string();
        let mut session =
            GuideSession::load(path, &label, SessionOptions::default()).map_err(refuse)?;
        session.canary().map_err(refuse)?;
        let card = session.card.clone();
        Ok(Self {
            batcher: Batcher::start(session, BatchOptions::default(), label.clone()),
            path: label,
            card,
        })
    }
}

#[tonic::async_trait]
impl Guide for LocalGuide {
    async fn gradient(&self, _dims: Dims, batch: GuideBatch) -> Result<GuideOutputs> {
        self.batcher
            .infer(batch)
            .await
            .map_err(|e| Error::Unavailable(format!("in-process guide {}: {e}", self.path)))
    }

    async fn card(&self) -> Result<GuideCard> {
        Ok(self.card.clone())
    }

    async fn probe(&self) -> Result<()> {
        Ok(())
    }

    /// The model's last three path parts (model/version/model.onnx): no filesystem layout in
    /// Describe.
    fn endpoint(&self) -> String {
        let parts: Vec<&str> = self.path.rsplit('/').take(3).collect();
        let shown: Vec<&str> = parts.into_iter().rev().collect();
        format!("onnx:{}", shown.join("/"))
    }
}
