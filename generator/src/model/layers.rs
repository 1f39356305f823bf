//! Differentiable building blocks. candle's fused layer norm and softmax drop gradients
//! (FINDINGS), so these compose plain ops that `backward` understands.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(inp, out, vb)
}

/// Applies a linear layer to `[.., inp]` by flattening to a 2-D matrix product.
pub fn apply_2d(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let last = dims[dims.len() - 1];
    let rows = x.elem_count() / last;
    let y = layer.forward(&x.reshape((rows, last))?)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = y.dim(1)?;
    y.reshape(out_dims)
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, 1e-5)
    }
}

/// Sinusoidal embedding of (possibly fractional) timesteps `t` [B] → [B, dim].
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}
