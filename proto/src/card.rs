//! The guide card: which fields and values a guide model steers, and which generator embedding,
//! schedule and canvas it was trained for. It lives in the ONNX model's `metadata_props` under
//! [`CARD_KEY`] (written by `guide/train/train_classifier.py`), and as `card.json` beside the model
//! for OIP servers that cannot serve it.

use serde::{Deserialize, Serialize};

pub const CARD_KEY: &str = "dlm.card";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuideCard {
    pub fields: Vec<Field>,
    pub embedding_sha256: String,
    pub diffusion_steps: usize,
    pub schedule: String,
    pub seq_len: usize,
    pub embed_dim: usize,
}

impl GuideCard {
    pub fn parse(json: &str) -> Result<Self, String> {
        let card: GuideCard =
            serde_json::from_str(json).map_err(|e| format!("invalid guide card: {e}"))?;
        if card.fields.is_empty() || card.fields.iter().any(|f| f.values.is_empty()) {
            return Err("invalid guide card: every field needs at least one value".into());
        }
        if card.seq_len == 0 || card.embed_dim == 0 || card.diffusion_steps == 0 {
            return Err(
                "invalid guide card: seq_len, embed_dim and diffusion_steps must be positive"
                    .into(),
            );
        }
        Ok(card)
    }

    /// The card as `dlm.v1.GuideCard` for model `name`, version `version`.
    pub fn to_wire(&self, name: &str, version: u64) -> crate::dlm::v1::GuideCard {
        crate::dlm::v1::GuideCard {
            model_name: name.into(),
            model_version: version.to_string(),
            fields: self
                .fields
                .iter()
                .map(|f| crate::dlm::v1::GuideField {
                    name: f.name.clone(),
                    values: f.values.clone(),
                })
                .collect(),
            embedding_sha256: self.embedding_sha256.clone(),
            diffusion_steps: self.diffusion_steps as u32,
            schedule: self.schedule.clone(),
            seq_len: self.seq_len as u32,
            embed_dim: self.embed_dim as u32,
        }
    }
}
