//! Model configuration, stored as `config.json` beside the weights.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::diffusion::ScheduleKind;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Words in the vocabulary, special tokens included.
    pub vocab_size: usize,
    /// Width D of a word embedding (the diffusion happens in this space).
    pub embed_dim: usize,
    /// Transformer width H.
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// MLP width as a multiple of H.
    pub mlp_ratio: usize,
    /// Sequence length L (the canvas): every sample has exactly L positions, PAD included.
    pub seq_len: usize,
    /// Diffusion steps T of the training schedule.
    pub diffusion_steps: usize,
    pub schedule: ScheduleKind,
    /// Self-conditioning (Chen et al. 2022): the denoiser also sees its previous x0 estimate.
    #[serde(default)]
    pub self_condition: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 0,
            embed_dim: 16,
            hidden: 128,
            layers: 4,
            heads: 4,
            mlp_ratio: 4,
            seq_len: 64,
            diffusion_steps: 2000,
            schedule: ScheduleKind::Sqrt,
            self_condition: false,
        }
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("embed_dim", self.embed_dim),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("mlp_ratio", self.mlp_ratio),
            ("seq_len", self.seq_len),
            ("diffusion_steps", self.diffusion_steps),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::invalid(field, "must be positive"));
            }
        }
        if !self.hidden.is_multiple_of(self.heads) || !self.hidden.is_multiple_of(2) {
            return Err(Error::invalid(
                "hidden",
                format!(
                    "{} must be even and divisible by heads = {}",
                    self.hidden, self.heads
                ),
            ));
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Self =
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("config serializes");
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
    }
}
