//! Differentiable building blocks. candle's fused layer norm and softmax drop gradients
//! (FINDINGS); ours ([`super::ops`]) carry their own backward.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::ops::{bias_add, layer_norm};

/// A dense layer y = x·Wᵀ + b over the last dimension, computed as one 2-D matrix product on the
/// flattened rows (the layout both candle and an ONNX export run fastest).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

/// A dense layer initialised as `candle_nn::linear` does (Kaiming-normal weight, uniform bias).
pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints(
        (out, inp),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bound = 1.0 / (inp as f64).sqrt();
    let bias = vb.get_with_hints(
        out,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Linear { weight, bias })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let last = dims[dims.len() - 1];
        let rows = x.elem_count() / last;
        let y = bias_add(
            &x.reshape((rows, last))?.matmul(&self.weight.t()?)?,
            &self.bias,
        )?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out_dims)
    }
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
        layer_norm(x, &self.weight, &self.bias)
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
