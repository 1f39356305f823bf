//! The teacher LM: a causal (left-to-right) word-level transformer language model of E2E
//! references, the fluency judge of Li et al. (2022) §6 (theirs a fine-tuned GPT-2; ours trained
//! from scratch by `dlm-generator train-teacher`). It never steers sampling; it only scores text.
//!
//! ids [B, L] (START w₁ … END PAD…) → word embedding + learned positions → causal pre-LN blocks →
//! LN → logits h·Eᵀ + b (tied to the word embedding) for the next word at every position.
//!
//! A directory holds `teacher.json` (this config), `model.safetensors` and `tokenizer.json`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::diffusion_lm::{load_tokenizer, load_weights, plain_weights, WEIGHTS_FILE};
use super::init::SeededVarMap;
use super::layers::LayerNorm;
use super::ops::{bias_add, token_cross_entropy};
use super::transformer::{Block, BlockConfig};
use crate::text::WordTokenizer;
use crate::{Error, Result};

pub const TEACHER_CONFIG_FILE: &str = "teacher.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherConfig {
    /// Words in the vocabulary, special tokens included.
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// MLP width as a multiple of `hidden`.
    pub mlp_ratio: usize,
    /// Longest sequence (START, words, END); longer texts are cut.
    pub seq_len: usize,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            vocab_size: 0,
            hidden: 128,
            layers: 3,
            heads: 4,
            mlp_ratio: 4,
            seq_len: 64,
        }
    }
}

impl TeacherConfig {
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("mlp_ratio", self.mlp_ratio),
            ("seq_len", self.seq_len),
        ] {
            if value == 0 {
                return Err(Error::invalid(field, "must be positive"));
            }
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(Error::invalid(
                "hidden",
                format!("{} is not divisible by heads = {}", self.hidden, self.heads),
            ));
        }
        Ok(())
    }

    fn block(&self) -> BlockConfig {
        BlockConfig {
            hidden: self.hidden,
            heads: self.heads,
            mlp_ratio: self.mlp_ratio,
            causal: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TeacherLm {
    embedding: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
    out_bias: Tensor,
    pub config: TeacherConfig,
}

impl TeacherLm {
    pub fn new(config: &TeacherConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden);
        let normal = |stdev| Init::Randn { mean: 0.0, stdev };
        Ok(Self {
            embedding: vb.get_with_hints((v, h), "embedding", normal(0.02))?,
            positions: vb.get_with_hints((config.seq_len, h), "positions", normal(0.02))?,
            blocks: (0..config.layers)
                .map(|i| Block::new(config.block(), vb.pp(format!("blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            ln_final: LayerNorm::new(h, vb.pp("ln_final"))?,
            out_bias: vb.get_with_hints(v, "out_bias", Init::Const(0.0))?,
            config: config.clone(),
        })
    }

    /// The final hidden states [B, L, H] of ids [B, L]: position i has read ids[..=i].
    pub fn hidden(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let h = self.config.hidden;
        let mut x = self
            .embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, h))?
            .broadcast_add(&self.positions.narrow(0, 0, l)?.unsqueeze(0)?)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.ln_final.forward(&x)
    }

    /// Next-word logits [N, V] of hidden rows [N, H].
    pub fn logits(&self, rows: &Tensor) -> candle_core::Result<Tensor> {
        bias_add(&rows.matmul(&self.embedding.t()?)?, &self.out_bias)
    }

    /// −log p of each predicted word, over the positions that predict one: for every sequence,
    /// the words after START up to and including END (PAD is never predicted). Returns the
    /// per-token losses [N] and, for each token, the sequence it belongs to.
    pub fn token_losses(
        &self,
        ids: &Tensor,
        pad: u32,
    ) -> candle_core::Result<(Tensor, Vec<usize>)> {
        let (b, l) = ids.dims2()?;
        let rows = ids.to_vec2::<u32>()?;
        // Position i predicts ids[i + 1]; keep those whose target is a real token.
        let (mut at, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for (s, row) in rows.iter().enumerate() {
            for i in 0..l - 1 {
                if row[i + 1] != pad {
                    at.push((s * l + i) as u32);
                    targets.push(row[i + 1]);
                    owner.push(s);
                }
            }
        }
        let device = ids.device();
        let hidden = self.hidden(ids)?.reshape((b * l, self.config.hidden))?;
        let picked = hidden.index_select(&Tensor::new(at.as_slice(), device)?, 0)?;
        let losses = token_cross_entropy(
            &self.logits(&picked)?,
            &Tensor::new(targets.as_slice(), device)?,
        )?;
        Ok((losses, owner))
    }
}

/// A fresh teacher (weights drawn from `seed`) and the variables that own its weights.
pub fn build_teacher(
    config: &TeacherConfig,
    device: &Device,
    seed: u64,
) -> Result<(TeacherLm, VarMap)> {
    config.validate()?;
    let varmap = VarMap::new();
    let backend: Box<dyn SimpleBackend> = Box::new(SeededVarMap {
        varmap: varmap.clone(),
        seed,
    });
    let model = TeacherLm::new(
        config,
        VarBuilder::from_backend(backend, DType::F32, device.clone()),
    )?;
    Ok((model, varmap))
}

/// A teacher directory loaded for scoring.
pub struct LoadedTeacher {
    pub model: TeacherLm,
    pub tokenizer: WordTokenizer,
    pub dir: PathBuf,
}

/// Perplexity of a set of texts under the teacher.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TeacherPerplexity {
    pub perplexity: f64,
    pub sentences: usize,
    /// Scored tokens, END included.
    pub tokens: usize,
}

impl LoadedTeacher {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join(TEACHER_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config: TeacherConfig =
            serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
        config.validate()?;
        let tokenizer = load_tokenizer(dir, config.vocab_size, TEACHER_CONFIG_FILE)?;
        let (_, varmap) = build_teacher(&config, device, 0)?;
        load_weights(&varmap, &dir.join(WEIGHTS_FILE))?;
        let model = TeacherLm::new(&config, plain_weights(&varmap, device))?;
        Ok(Self {
            model,
            tokenizer,
            dir: dir.to_path_buf(),
        })
    }

    /// −log p(text) in nats and the number of tokens scored, per text, each exactly as given
    /// (START-conditioned, END predicted).
    pub fn neg_log_likelihoods(&self, texts: &[String]) -> Result<Vec<(f64, usize)>> {
        const BATCH: usize = 64;
        let l = self.model.config.seq_len;
        let device = self.model.embedding.device().clone();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(BATCH) {
            let ids: Vec<u32> = chunk
                .iter()
                .map(|t| self.tokenizer.encode_padded(t, l))
                .collect::<Result<Vec<_>>>()?
                .concat();
            let ids = Tensor::from_vec(ids, (chunk.len(), l), &device)?;
            let (losses, owner) = self.model.token_losses(&ids, self.tokenizer.pad_id())?;
            let mut sums = vec![(0f64, 0usize); chunk.len()];
            for (loss, s) in losses.to_vec1::<f32>()?.into_iter().zip(owner) {
                sums[s].0 += loss as f64;
                sums[s].1 += 1;
            }
            out.extend(sums);
        }
        Ok(out)
    }

    /// Corpus perplexity: exp(total −log p / total tokens).
    pub fn perplexity(&self, texts: &[String]) -> Result<TeacherPerplexity> {
        let scores = self.neg_log_likelihoods(texts)?;
        let (nll, tokens) = scores
            .iter()
            .fold((0f64, 0usize), |(a, n), (b, m)| (a + b, n + m));
        Ok(TeacherPerplexity {
            perplexity: (nll / tokens.max(1) as f64).exp(),
            sentences: texts.len(),
            tokens,
        })
    }
}
