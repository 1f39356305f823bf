//! The denoiser: a pre-LN transformer encoder that predicts the clean latents x0 from (x_t, t).
//!
//! x_t [B, L, D] (with the previous x0 estimate beside it under self-conditioning) → up-projection (D→H, tanh, H→H) + learned positions + timestep MLP →
//! blocks of (LN → self-attention, LN → GELU MLP) → LN → down-projection (H→H, tanh, H→D).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::config::ModelConfig;
use super::layers::{linear, timestep_embedding, LayerNorm, Linear};
use super::ops::tanh;
use super::transformer::{Block, BlockConfig};

#[derive(Debug, Clone)]
pub struct Denoiser {
    up_in: Linear,
    up_out: Linear,
    positions: Tensor,
    time_in: Linear,
    time_out: Linear,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
    down_in: Linear,
    down_out: Linear,
    hidden: usize,
    self_condition: bool,
}

impl Denoiser {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (d, h) = (cfg.embed_dim, cfg.hidden);
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(BlockConfig::encoder(cfg), vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            up_in: linear(
                if cfg.self_condition { 2 * d } else { d },
                h,
                vb.pp("up_in"),
            )?,
            up_out: linear(h, h, vb.pp("up_out"))?,
            positions: vb.get_with_hints(
                (cfg.seq_len, h),
                "positions",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            time_in: linear(h, 4 * h, vb.pp("time_in"))?,
            time_out: linear(4 * h, h, vb.pp("time_out"))?,
            blocks,
            ln_final: LayerNorm::new(h, vb.pp("ln_final"))?,
            down_in: linear(h, h, vb.pp("down_in"))?,
            down_out: linear(h, d, vb.pp("down_out"))?,
            hidden: h,
            self_condition: cfg.self_condition,
        })
    }

    /// Predicts x0 [B, L, D] from x_t [B, L, D] and timesteps `t` [B] (training-schedule units, f32).
    /// With self-conditioning, `previous` is the last x0 estimate (zeros when there is none).
    pub fn forward(&self, x_t: &Tensor, t: &Tensor, previous: Option<&Tensor>) -> Result<Tensor> {
        let (_, l, _) = x_t.dims3()?;
        let input = if self.self_condition {
            let previous = match previous {
                Some(p) => p.clone(),
                None => x_t.zeros_like()?,
            };
            Tensor::cat(&[x_t, &previous], 2)?
        } else {
            x_t.clone()
        };
        let up = self.up_out.forward(&tanh(&self.up_in.forward(&input)?)?)?;
        let temb = timestep_embedding(t, self.hidden)?;
        let temb = self
            .time_out
            .forward(&self.time_in.forward(&temb)?.silu()?)?;
        let mut h = up
            .broadcast_add(&self.positions.narrow(0, 0, l)?.unsqueeze(0)?)?
            .broadcast_add(&temb.unsqueeze(1)?)?;
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        let h = self.ln_final.forward(&h)?;
        self.down_out.forward(&tanh(&self.down_in.forward(&h)?)?)
    }
}
