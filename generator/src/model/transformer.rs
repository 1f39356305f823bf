//! The pre-LN transformer block both networks are made of: LN → multi-head self-attention,
//! LN → GELU MLP, each with a residual. The denoiser's attention sees the whole canvas; the teacher
//! LM's is causal.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{multi_head_attention, packed_attention_inference};
use super::config::ModelConfig;
use super::layers::{dense_residual_inference, linear, mlp_residual_inference, LayerNorm, Linear};
use super::ops::gelu;

/// The sizes of one block.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub hidden: usize,
    pub heads: usize,
    /// MLP width as a multiple of `hidden`.
    pub mlp_ratio: usize,
    /// Each position attends to itself and the positions before it only.
    pub causal: bool,
}

impl BlockConfig {
    /// The denoiser's blocks: attention over the whole canvas.
    pub fn encoder(cfg: &ModelConfig) -> Self {
        Self {
            hidden: cfg.hidden,
            heads: cfg.heads,
            mlp_ratio: cfg.mlp_ratio,
            causal: false,
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    causal: bool,
}

impl Attention {
    fn new(cfg: BlockConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden;
        Ok(Self {
            q: linear(h, h, vb.pp("q"))?,
            k: linear(h, h, vb.pp("k"))?,
            v: linear(h, h, vb.pp("v"))?,
            out: linear(h, h, vb.pp("out"))?,
            heads: cfg.heads,
            causal: cfg.causal,
        })
    }

    /// x: [B, L, H]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        self.out
            .forward(&multi_head_attention(&q, &k, &v, self.heads, self.causal)?)
    }

    /// residual + forward(x) for inference on the CPU: q, k and v from one product with the
    /// stacked weights (stacked per call: 3·H² floats, and never stale in training), read in
    /// place by the attention kernel; the output projection accumulates onto residual + bias.
    fn forward_residual_inference(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let qkv = Linear::stacked(&[&self.q, &self.k, &self.v])?.forward(x)?;
        let context = packed_attention_inference(&qkv, self.heads, self.causal)?;
        dense_residual_inference(&context, &self.out, residual)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    ln_attn: LayerNorm,
    attn: Attention,
    ln_mlp: LayerNorm,
    fc_in: Linear,
    fc_out: Linear,
}

impl Block {
    pub fn new(cfg: BlockConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden;
        Ok(Self {
            ln_attn: LayerNorm::new(h, vb.pp("ln_attn"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ln_mlp: LayerNorm::new(h, vb.pp("ln_mlp"))?,
            fc_in: linear(h, h * cfg.mlp_ratio, vb.pp("fc_in"))?,
            fc_out: linear(h * cfg.mlp_ratio, h, vb.pp("fc_out"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = self.ln_attn.forward(x)?;
        if x.device().is_cpu() && !normed.track_op() {
            // Inference (plain-tensor weights, nothing recorded for a backward pass): kernels that
            // keep no intermediate for gradients and fold the residual sums into the products.
            let x = self.attn.forward_residual_inference(&normed, x)?;
            return mlp_residual_inference(
                &self.ln_mlp.forward(&x)?,
                &self.fc_in,
                &self.fc_out,
                &x,
            );
        }
        let x = (x + self.attn.forward(&normed)?)?;
        let mlp = gelu(&self.fc_in.forward(&self.ln_mlp.forward(&x)?)?)?;
        x + self.fc_out.forward(&mlp)?
    }
}
