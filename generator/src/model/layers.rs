//! Differentiable building blocks. candle's fused layer norm and softmax drop gradients
//! (FINDINGS); ours ([`super::ops`]) carry their own backward. Beside them, the CPU inference
//! kernels (`*_inference`), which keep nothing for a backward pass and fold bias and residual sums
//! into the matrix products; the denoiser takes them when nothing records a graph.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::matmul::{matmul, View};
use super::ops::{
    add_rows, bias_add, contiguous_f32, gelu_in_place, layer_norm, unpack_gradients, with_cpu_f32,
};

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
        let x2 = x.reshape((rows, last))?;
        let y = if x.device().is_cpu() {
            x2.contiguous()?
                .apply_op3(&self.weight, &self.bias, Dense)?
        } else {
            bias_add(&x2.matmul(&self.weight.t()?)?, &self.bias)?
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out_dims)
    }
}

impl Linear {
    fn out_features(&self) -> Result<usize> {
        self.weight.dim(0)
    }

    /// One layer whose outputs are those of `layers` side by side (their weights stacked).
    pub fn stacked(layers: &[&Linear]) -> Result<Linear> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Vec<&Tensor> = layers.iter().map(|l| &l.bias).collect();
        Ok(Linear {
            weight: Tensor::cat(&weights, 0)?,
            bias: Tensor::cat(&biases, 0)?,
        })
    }
}

/// Rows per block of the inference MLP: a block's [rows, 4H] hidden activations (512 KB at
/// H = 128) stay in the core's L2 between the two products.
const MLP_BLOCK_ROWS: usize = 256;

/// `residual + fc_out(gelu(fc_in(x)))` over [N, H] rows, for inference on the CPU (no gradients):
/// the rows go through in blocks, so the [N, 4H] hidden layer is never written out whole, GELU
/// runs on it in place while it is in cache, and the output starts as residual + bias.
pub fn mlp_residual_inference(
    x: &Tensor,
    fc_in: &Linear,
    fc_out: &Linear,
    residual: &Tensor,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let n = x.elem_count() / inp;
    let (hid, out) = (fc_in.out_features()?, fc_out.out_features()?);
    let (x, residual) = (x.contiguous()?, residual.contiguous()?);
    if residual.elem_count() != n * out {
        candle_core::bail!(
            "mlp: residual {:?} does not fit {n} rows of {out}",
            residual.shape()
        );
    }
    let operands = [
        &x,
        &fc_in.weight,
        &fc_in.bias,
        &fc_out.weight,
        &fc_out.bias,
        &residual,
    ];
    let y = with_cpu_f32(&operands, |[x, w1, b1, w2, b2, res]| {
        let mut y = residual_plus_bias(res, b2);
        let mut hidden = vec![0f32; MLP_BLOCK_ROWS.min(n) * hid];
        for start in (0..n).step_by(MLP_BLOCK_ROWS) {
            let rows = MLP_BLOCK_ROWS.min(n - start);
            let h = &mut hidden[..rows * hid];
            for row in h.chunks_exact_mut(hid) {
                row.copy_from_slice(b1);
            }
            let x = &x[start * inp..(start + rows) * inp];
            dense_onto(h, x, w1, rows, inp, hid);
            gelu_in_place(h);
            dense_onto(
                &mut y[start * out..(start + rows) * out],
                h,
                w2,
                rows,
                hid,
                out,
            );
        }
        Ok(y)
    })?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = out;
    Tensor::from_vec(y, out_dims, &Device::Cpu)
}

/// `residual + fc(x)` over [N, H] rows, for inference on the CPU: the output starts as
/// residual + bias and the product accumulates onto it (no separate sum).
pub fn dense_residual_inference(x: &Tensor, fc: &Linear, residual: &Tensor) -> Result<Tensor> {
    let dims = residual.dims().to_vec();
    let (n, inp, out) = (
        residual.elem_count() / dims[dims.len() - 1],
        x.dim(D::Minus1)?,
        fc.out_features()?,
    );
    let (x, residual) = (x.contiguous()?, residual.contiguous()?);
    if x.elem_count() != n * inp || residual.elem_count() != n * out {
        candle_core::bail!(
            "dense: x {:?} and residual {:?} do not fit",
            x.shape(),
            residual.shape()
        );
    }
    let y = with_cpu_f32(&[&x, &fc.weight, &fc.bias, &residual], |[x, w, b, res]| {
        let mut y = residual_plus_bias(res, b);
        dense_onto(&mut y, x, w, n, inp, out);
        Ok(y)
    })?;
    Tensor::from_vec(y, dims, &Device::Cpu)
}

/// Rows of `residual` [N, O] each plus the bias [O].
fn residual_plus_bias(residual: &[f32], bias: &[f32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(residual.len());
    for r in residual.chunks_exact(bias.len()) {
        y.extend(r.iter().zip(bias).map(|(a, b)| a + b));
    }
    y
}

/// y [N, O] += x [N, I] · Wᵀ for W [O, I].
fn dense_onto(y: &mut [f32], x: &[f32], w: &[f32], n: usize, inp: usize, out: usize) {
    matmul(
        y,
        View::rows_of(n, out, out),
        x,
        View::rows_of(n, inp, inp),
        w,
        View::rows_of(out, inp, inp).t(),
        1.0,
        true,
    );
}

/// x [N, I] · Wᵀ + b for W [O, I], b [O], as one CPU kernel: the output starts as the bias rows
/// and the product accumulates onto it (no zero-filled product buffer, no separate bias pass,
/// no transposed copy of W).
struct Dense;

/// x, W and the third operand as slices, with n, inputs and outputs.
type DenseOperands<'a> = (&'a [f32], &'a [f32], &'a [f32], usize, usize, usize);

/// The operands of [`Dense`] and [`DenseBackward`] (whose third is the output gradient, not b).
fn dense_operands<'a>(
    op: &str,
    third_is_grad: bool,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> Result<DenseOperands<'a>> {
    let (n, inp) = l1.shape().dims2()?;
    let (out, w_inp) = l2.shape().dims2()?;
    let third = if third_is_grad { n * out } else { out };
    if w_inp != inp || l3.shape().elem_count() != third {
        candle_core::bail!(
            "{op}: x {:?}, weight {:?} and {:?} do not fit",
            l1.shape(),
            l2.shape(),
            l3.shape()
        );
    }
    Ok((
        contiguous_f32(s1, l1, op)?,
        contiguous_f32(s2, l2, op)?,
        contiguous_f32(s3, l3, op)?,
        n,
        inp,
        out,
    ))
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "dlm-dense"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b, n, inp, out) =
            dense_operands(self.name(), false, (s1, l1), (s2, l2), (s3, l3))?;
        let mut y = Vec::with_capacity(n * out);
        for _ in 0..n {
            y.extend_from_slice(b);
        }
        dense_onto(&mut y, x, w, n, inp, out);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &DenseBackward)?;
        unpack_gradients(&packed, [x.shape(), w.shape(), b.shape()])
    }
}

/// dx = g·W, dW = gᵀ·x, db = Σ_rows g, for the output gradient g [N, O], packed as
/// [dx (N·I), dW (O·I), db (O)].
struct DenseBackward;

impl CustomOp3 for DenseBackward {
    fn name(&self) -> &'static str {
        "dlm-dense-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g, n, inp, out) =
            dense_operands(self.name(), true, (s1, l1), (s2, l2), (s3, l3))?;
        let mut packed = vec![0f32; n * inp + out * inp + out];
        let (dx, rest) = packed.split_at_mut(n * inp);
        let (dw, db) = rest.split_at_mut(out * inp);
        let gv = View::rows_of(n, out, out);
        matmul(
            dx,
            View::rows_of(n, inp, inp),
            g,
            gv,
            w,
            View::rows_of(out, inp, inp),
            1.0,
            false,
        );
        matmul(
            dw,
            View::rows_of(out, inp, inp),
            g,
            gv.t(),
            x,
            View::rows_of(n, inp, inp),
            1.0,
            false,
        );
        for row in g.chunks_exact(out) {
            add_rows(db, row);
        }
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::max_abs_diff;
    use candle_core::{Device, Var};

    /// The fused dense kernel against matmul + broadcast add, forward and all three gradients.
    #[test]
    fn dense_matches_the_composition() {
        let dev = Device::Cpu;
        let randn = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let (x, w, b) = (randn(&[2, 5, 7]), randn(&[3, 7]), randn(&[3]));
        let layer = Linear {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
        };
        let probe = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev).unwrap();

        let fused = layer.forward(&x).unwrap();
        let composed = x
            .as_tensor()
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert_eq!(fused.dims(), &[2, 5, 3]);
        assert!(max_abs_diff(&fused, &composed) < 1e-5);
        let gf = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&composed * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let d = max_abs_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-4, "dense gradient of {name} differs by {d}");
        }
    }

    /// The blocked inference MLP against the layer-by-layer forward, over more rows than one
    /// block holds and a row count that leaves a partial last block.
    #[test]
    fn inference_mlp_matches_the_layers() {
        let dev = Device::Cpu;
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let layer = |inp: usize, out: usize| Linear {
            weight: randn(&[out, inp]),
            bias: randn(&[out]),
        };
        let (fc_in, fc_out) = (layer(8, 32), layer(32, 8));
        let rows = MLP_BLOCK_ROWS * 2 + 3;
        let (x, residual) = (randn(&[rows / 3, 3, 8]), randn(&[rows / 3, 3, 8]));
        let fused = mlp_residual_inference(&x, &fc_in, &fc_out, &residual).unwrap();
        let hidden = super::super::ops::gelu(&fc_in.forward(&x).unwrap()).unwrap();
        let layered = (&residual + fc_out.forward(&hidden).unwrap()).unwrap();
        assert_eq!(fused.dims(), &[rows / 3, 3, 8]);
        let d = max_abs_diff(&fused, &layered);
        assert!(d < 1e-4, "inference MLP differs by {d}");
    }
}
