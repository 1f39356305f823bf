//! Fused CPU kernels with hand-written backward passes, for the ops that dominate a training step
//! when composed from candle's element-wise primitives (each primitive is a full pass over memory,
//! and candle's own fused kernels have no backward). On other devices the differentiable
//! compositions are used instead.
//!
//! The loops live in the kernel functions below, each compiled for AVX-512 and AVX2 (NEON on arm)
//! besides the baseline (multiversion's "simd" preset leaves AVX-512 out, hence the explicit list)
//! and picked at run time (`multiversion`), with reductions written in independent lanes so that
//! they vectorise (one running float sum is a serial chain the compiler must keep in order).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use multiversion::multiversion;

use super::matmul::{matmul, View};

const LN_EPS: f32 = 1e-5;

pub(super) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: only f32 is supported"),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f` on the f32 data of N contiguous CPU tensors, read in place (inference kernels that
/// take more operands than candle's custom ops carry).
pub(super) fn with_cpu_f32<const N: usize, R>(
    tensors: &[&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = [&[][..]; N];
    for (slice, (storage, layout)) in slices.iter_mut().zip(&guards) {
        match &**storage {
            candle_core::Storage::Cpu(s) => *slice = contiguous_f32(s, layout, "inference")?,
            _ => candle_core::bail!("inference kernels take CPU tensors only"),
        }
    }
    f(slices)
}

const LANES: usize = 16;

/// Σ f(x) over xs, accumulated in 16 independent lanes. Whole chunks are fixed-size arrays, so
/// the compiler sees no bounds checks and keeps the lanes in one vector register.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let (chunks, tail) = xs.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

/// Σ a·b, in 16 independent lanes.
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let (ac, at) = a.as_chunks::<LANES>();
    let (bc, bt) = b.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (x, y) in ac.iter().zip(bc) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += u * v;
        }
    }
    acc.iter().sum::<f32>() + at.iter().zip(bt).map(|(&u, &v)| u * v).sum::<f32>()
}

/// max of xs, in 16 independent lanes.
#[inline(always)]
fn lane_max(xs: &[f32]) -> f32 {
    let (chunks, tail) = xs.as_chunks::<LANES>();
    let mut acc = [f32::NEG_INFINITY; LANES];
    let tail = (!tail.is_empty()).then(|| padded(tail, f32::NEG_INFINITY));
    for c in chunks.iter().chain(tail.as_ref()) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// A tail of fewer than 16 values as one full vector, the rest set to `fill`.
#[inline(always)]
fn padded(tail: &[f32], fill: f32) -> [f32; LANES] {
    let mut v = [fill; LANES];
    v[..tail.len()].copy_from_slice(tail);
    v
}

#[inline(always)]
fn row_stats(row: &[f32]) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + LN_EPS).sqrt())
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
    let h = w.len();
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let (mean, rstd) = row_stats(row);
        for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * rstd * w + b;
        }
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn layer_norm_backward_rows(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let h = w.len();
    let nf = h as f32;
    let (dw, db) = (&mut dw[..h], &mut db[..h]); // lengths the compiler can see: no bounds checks below
    let mut xhat = vec![0f32; h];
    let mut gw = vec![0f32; h];
    for ((xr, gr), o) in x
        .chunks_exact(h)
        .zip(g.chunks_exact(h))
        .zip(dx.chunks_exact_mut(h))
    {
        let (mean, rstd) = row_stats(xr);
        for j in 0..h {
            xhat[j] = (xr[j] - mean) * rstd;
            gw[j] = gr[j] * w[j];
            dw[j] += gr[j] * xhat[j];
            db[j] += gr[j];
        }
        let g_mean = lane_sum(&gw, |v| v) / nf;
        let gx_mean = lane_dot(&gw, &xhat) / nf;
        for ((o, &g), &xh) in o.iter_mut().zip(gw.iter()).zip(xhat.iter()) {
            *o = rstd * (g - g_mean - xh * gx_mean);
        }
    }
}

/// Softmax of each row of n values.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(super) fn softmax_rows(x: &[f32], n: usize, out: &mut [f32]) {
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        softmax_row(row, o);
    }
}

/// The softmax backward pass in place, per row of n values: g ← y · (g − Σ g·y).
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(super) fn softmax_backward_rows(y: &[f32], g: &mut [f32], n: usize) {
    for (yr, gr) in y.chunks_exact(n).zip(g.chunks_exact_mut(n)) {
        let dot = lane_dot(yr, gr);
        gr.iter_mut()
            .zip(yr)
            .for_each(|(gv, yv)| *gv = yv * (*gv - dot));
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn gelu_forward(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = gelu_scalar(v);
    }
}

/// GELU in place, for the inference MLP whose hidden rows are overwritten where they lie.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(super) fn gelu_in_place(xs: &mut [f32]) {
    for v in xs.iter_mut() {
        *v = gelu_scalar(*v);
    }
}

#[inline(always)]
fn gelu_scalar(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2))
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn gelu_backward(x: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * fast_exp(-0.5 * v * v);
        *o = gv * (cdf + v * pdf);
    }
}

/// tanh(x) = sign(x) · (1 − e^(−2|x|)) / (1 + e^(−2|x|)): absolute error below 2e-7; libm's tanhf
/// (with the expm1f it calls) was 8% of a training step.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn tanh_forward(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        let e = fast_exp(-2.0 * v.abs());
        *o = ((1.0 - e) / (1.0 + e)).copysign(v);
    }
}

/// d tanh / dx = 1 − tanh², from y = tanh(x).
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn tanh_backward(y: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &yv), &gv) in out.iter_mut().zip(y).zip(g) {
        *o = gv * (1.0 - yv * yv);
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(super) fn add_rows(out: &mut [f32], b: &[f32]) {
    for row in out.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(o, bv)| *o += bv);
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn cross_entropy_rows(
    logits: &[f32],
    targets: &[u32],
    v: usize,
    scratch: &mut [f32],
    out: &mut [f32],
) {
    for ((row, &t), o) in logits.chunks_exact(v).zip(targets).zip(out.iter_mut()) {
        let log_z = softmax_row(row, scratch);
        *o = log_z - row[t as usize];
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn cross_entropy_backward_rows(
    logits: &[f32],
    targets: &[u32],
    g: &[f32],
    v: usize,
    out: &mut [f32],
) {
    for (((row, o), &t), &gr) in logits
        .chunks_exact(v)
        .zip(out.chunks_exact_mut(v))
        .zip(targets)
        .zip(g)
    {
        softmax_row(row, o);
        o[t as usize] -= 1.0;
        o.iter_mut().for_each(|x| *x *= gr);
    }
}

/// Layer norm with scale and shift over the last dimension: (x − mean) / √(var + ε) · w + b.
struct LayerNormOp;

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "dlm-layer-norm"
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
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        let mut out = vec![0f32; x.len()];
        layer_norm_rows(x, w, b, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBackward)?;
        unpack_gradients(&packed, [x.shape(), w.shape(), b.shape()])
    }
}

/// The gradients of a three-input op from one fused backward kernel, which returns them packed
/// end to end in a 1-D buffer: split in order and shaped as the inputs.
pub(super) fn unpack_gradients(
    packed: &Tensor,
    shapes: [&Shape; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let mut start = 0;
    let mut next = |shape: &Shape| -> Result<Option<Tensor>> {
        let n = shape.elem_count();
        let part = packed.narrow(0, start, n)?.reshape(shape)?;
        start += n;
        Ok(Some(part))
    };
    Ok((next(shapes[0])?, next(shapes[1])?, next(shapes[2])?))
}

/// With x̂ = (x − mean)·rstd and g' = g·w:  dx = rstd · (g' − mean(g') − x̂ · mean(g'·x̂)),
/// dw = Σ_rows g·x̂,  db = Σ_rows g, packed as [dx (N·H), dw (H), db (H)].
struct LayerNormBackward;

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "dlm-layer-norm-bwd"
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
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let h = w.len();
        let mut out = vec![0f32; x.len() + 2 * h];
        let (dx, rest) = out.split_at_mut(x.len());
        let (dw, db) = rest.split_at_mut(h);
        layer_norm_backward_rows(x, w, g, dx, dw, db);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// x [N, H] + b [H].
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "dlm-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let b = contiguous_f32(s2, l2, self.name())?;
        let mut out = x.to_vec();
        add_rows(&mut out, b);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad
            .contiguous()?
            .apply_op1_no_bwd(&ColumnSum(b.elem_count()))?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// Sums the rows of a row-major [N, H] buffer: H outputs. (candle's sum over dim 0 walks memory
/// with stride H and was 8% of a training step.)
struct ColumnSum(usize);

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "dlm-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, self.name())?;
        let mut out = vec![0f32; self.0];
        for row in g.chunks_exact(self.0) {
            add_rows(&mut out, row);
        }
        Ok((CpuStorage::F32(out), Shape::from(self.0)))
    }
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dlm-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let n = l.dims()[l.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        softmax_rows(x, n, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SoftmaxBackward,
        )?))
    }
}

/// dx = y · (g − Σ g·y), from y and g.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "dlm-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let n = l1.dims()[l1.dims().len() - 1];
        let mut out = g.to_vec();
        softmax_backward_rows(y, &mut out, n);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// e^x with relative error below 3e-7 for x in [−87, 88] (clamped outside), written without calls or
/// branches so that loops over it vectorise: libm's expf is a scalar call per element.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2^23: adding and subtracting it rounds to an integer.
    const ROUND: f32 = 12_582_912.0;
    // max/min rather than clamp: NaN maps to a bound instead of running on through the bit tricks.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    let k = x * LOG2_E + ROUND;
    let n = k - ROUND;
    // |r| ≤ ln 2 / 2
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    // Horner's rule in fused multiply-adds (one instruction per degree where FMA exists).
    let p = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]
        .into_iter()
        .fold(1.0 / 720.0, |acc: f32, c| acc.mul_add(r, c));
    // n as an integer, read from k's low mantissa bits: `n as i32` is a saturating conversion
    // that compiles to scalar code per lane and stops the loop vectorising.
    let n_int = (k.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// erf with absolute error below 1.5e-7 (Abramowitz & Stegun 7.1.26); libm's erff was 15% of a
/// training step.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let sign = x.signum();
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = t * [-1.453_152, 1.421_413_7, -0.284_496_74, 0.254_829_6]
        .into_iter()
        .fold(1.061_405_4, |acc: f32, c| acc.mul_add(t, c));
    sign * (-poly).mul_add(fast_exp(-a * a), 1.0)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// An element-wise op whose backward pass needs only one saved tensor and the output gradient:
/// GELU (d/dx = Φ(x) + x φ(x), from its input) and tanh (1 − y², from its output).
#[derive(Clone, Copy)]
struct Elementwise {
    name: &'static str,
    backward_name: &'static str,
    forward: fn(&[f32], &mut [f32]),
    /// (saved, g, out): out = g · dy/dx, where `saved` is the input or the output (`saves_output`).
    backward: fn(&[f32], &[f32], &mut [f32]),
    saves_output: bool,
}

/// GELU with the exact (erf) form: x · Φ(x).
const GELU: Elementwise = Elementwise {
    name: "dlm-gelu",
    backward_name: "dlm-gelu-bwd",
    forward: gelu_forward,
    backward: gelu_backward,
    saves_output: false,
};

const TANH: Elementwise = Elementwise {
    name: "dlm-tanh",
    backward_name: "dlm-tanh-bwd",
    forward: tanh_forward,
    backward: tanh_backward,
    saves_output: true,
};

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name)?;
        let mut out = vec![0f32; x.len()];
        (self.forward)(x, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let saved = if self.saves_output { res } else { arg };
        Ok(Some(saved.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &ElementwiseBackward(*self),
        )?))
    }
}

/// (saved, g) → the input's gradient, for an [`Elementwise`] op.
struct ElementwiseBackward(Elementwise);

impl CustomOp2 for ElementwiseBackward {
    #[allow(clippy::misnamed_getters)] // the backward op's name is its op's `backward_name`
    fn name(&self) -> &'static str {
        self.0.backward_name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let saved = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let mut out = vec![0f32; saved.len()];
        (self.0.backward)(saved, g, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-row cross-entropy −log softmax(logits)[target]: logits [N, V] f32, targets [N] u32 → [N].
struct CrossEntropy;

fn targets_u32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("cross-entropy targets must be contiguous u32"),
    }
}

/// Writes softmax(row) into `out` and returns log Σ exp(row).
#[inline(always)]
fn softmax_row(row: &[f32], out: &mut [f32]) -> f32 {
    let max = lane_max(row);
    let (rows, row_tail) = row.as_chunks::<LANES>();
    let (outs, out_tail) = out.as_chunks_mut::<LANES>();
    let mut acc = [0f32; LANES];
    let mut exp_into = |o: &mut [f32; LANES], r: &[f32; LANES]| {
        for ((o, &v), a) in o.iter_mut().zip(r).zip(acc.iter_mut()) {
            *o = fast_exp(v - max);
            *a += *o;
        }
    };
    for (o, r) in outs.iter_mut().zip(rows) {
        exp_into(o, r);
    }
    // The tail as one more vector, padded with −∞ (whose exp underflows to ~1e-38, nothing
    // beside the row maximum's 1): short rows such as attention's 40 are a third tail.
    if !row_tail.is_empty() {
        let mut e = [0f32; LANES];
        exp_into(&mut e, &padded(row_tail, f32::NEG_INFINITY));
        out_tail.copy_from_slice(&e[..out_tail.len()]);
    }
    let sum = acc.iter().sum::<f32>();
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|v| *v *= inv);
    max + sum.ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "dlm-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(s1, l1, self.name())?;
        let targets = targets_u32(s2, l2)?;
        let (n, v) = l1.shape().dims2()?;
        let mut scratch = vec![0f32; v];
        let mut out = vec![0f32; n];
        cross_entropy_rows(logits, targets, v, &mut scratch, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad =
            logits.apply_op3_no_bwd(targets, &grad_res.contiguous()?, &CrossEntropyBackward)?;
        Ok((Some(grad), None))
    }
}

/// d/dlogits = g_row · (softmax(logits) − onehot(target)).
struct CrossEntropyBackward;

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "dlm-cross-entropy-bwd"
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
        let logits = contiguous_f32(s1, l1, self.name())?;
        let targets = targets_u32(s2, l2)?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let (_, v) = l1.shape().dims2()?;
        let mut out = vec![0f32; logits.len()];
        cross_entropy_backward_rows(logits, targets, g, v, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// x [.., H] + b [H].
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op2(bias, BiasAdd)
    } else {
        x.broadcast_add(bias)
    }
}

/// GELU (erf form).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(GELU)
    } else {
        x.gelu_erf()
    }
}

/// Each row of x [.., D] replaced by its nearest row of `table` [V, D] (L2), on the CPU. Rows go
/// through in blocks, so that the block's V distances stay in cache for the argmin instead of a
/// [N, V] distance matrix making four passes through memory. No gradient (sampling only).
pub fn nearest_rows(x: &Tensor, table: &Tensor) -> Result<Tensor> {
    const BLOCK: usize = 128;
    let (v, d) = table.dims2()?;
    let shape = x.shape().clone();
    if shape.dims()[shape.rank() - 1] != d {
        candle_core::bail!("nearest_rows: rows of {shape:?} are not {d} wide");
    }
    let (x, table) = (x.contiguous()?, table.contiguous()?);
    let out = with_cpu_f32(&[&x, &table], |[xs, table_rows]| {
        let n = xs.len() / d;
        // ‖x − e‖² = ‖x‖² − 2x·e + ‖e‖²; ‖x‖² is the same for every e, so it is left out.
        let sq: Vec<f32> = table_rows
            .chunks_exact(d)
            .map(|e| e.iter().map(|a| a * a).sum())
            .collect();
        let mut dots = vec![0f32; BLOCK * v];
        let mut out = Vec::with_capacity(xs.len());
        for first in (0..n).step_by(BLOCK) {
            let rows = BLOCK.min(n - first);
            matmul(
                &mut dots,
                View::rows_of(rows, v, v),
                &xs[first * d..],
                View::rows_of(rows, d, d),
                table_rows,
                View::rows_of(v, d, d).t(),
                -2.0,
                false,
            );
            for row in dots[..rows * v].chunks_exact(v) {
                let best = nearest_index(row, &sq);
                out.extend_from_slice(&table_rows[best * d..(best + 1) * d]);
            }
        }
        Ok(out)
    })?;
    Tensor::from_vec(out, shape, x.device())
}

/// argmin over e of (−2·x·e) + ‖e‖², the first on ties.
fn nearest_index(neg2_dots: &[f32], sq: &[f32]) -> usize {
    let mut best = (0, f32::INFINITY);
    for (i, (a, b)) in neg2_dots.iter().zip(sq).enumerate() {
        let dist = a + b;
        if dist < best.1 {
            best = (i, dist);
        }
    }
    best.0
}

/// tanh.
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(TANH)
    } else {
        x.tanh()
    }
}

/// Mean cross-entropy of logits [N, V] against targets [N] (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    token_cross_entropy(logits, targets)?.mean_all()
}

/// Cross-entropy of each row of logits [N, V] against its target [N] (u32): −log softmax at the
/// target, [N].
pub fn token_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    if logits.device().is_cpu() {
        logits.contiguous()?.apply_op2(&targets, CrossEntropy)
    } else {
        candle_nn::ops::log_softmax(logits, D::Minus1)?
            .gather(&targets.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .neg()
    }
}

/// Layer norm over the last dimension with a learned scale and shift.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op3(weight, bias, LayerNormOp)
    } else {
        candle_nn::ops::layer_norm_slow(x, weight, bias, LN_EPS)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::max_abs_diff;

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (want, got) = (x.exp() as f64, fast_exp(x) as f64);
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1000.0) < 1e-37 && fast_exp(-1000.0) >= 0.0);
        assert!(fast_exp(1000.0).is_finite());
    }
    use candle_core::{Device, Var};

    #[test]
    fn fused_ops_match_the_compositions_forward_and_backward() {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 16), &dev).unwrap() + 0.7).unwrap())
                .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 16, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 16, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();

        let fused = layer_norm(&x, &w, &b).unwrap();
        let slow = candle_nn::ops::layer_norm_slow(&x, &w, &b, LN_EPS).unwrap();
        assert!(max_abs_diff(&fused, &slow) < 1e-5);
        let gf = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = (&slow * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let d = max_abs_diff(gf.get(v).unwrap(), gs.get(v).unwrap());
            assert!(d < 1e-4, "layer norm gradient differs by {d}");
        }

        let fused = bias_add(&x, &b).unwrap();
        let slow = x.broadcast_add(&b).unwrap();
        assert!(max_abs_diff(&fused, &slow) < 1e-7);
        let gf = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = (&slow * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &b] {
            let d = max_abs_diff(gf.get(v).unwrap(), gs.get(v).unwrap());
            assert!(d < 1e-5, "bias-add gradient differs by {d}");
        }

        let fused = softmax_last_dim(&x).unwrap();
        let slow = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
        assert!(max_abs_diff(&fused, &slow) < 1e-6);
        let gf = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = (&slow * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_abs_diff(gf.get(&x).unwrap(), gs.get(&x).unwrap());
        assert!(d < 1e-5, "softmax gradient differs by {d}");

        let fused = gelu(&x).unwrap();
        let exact = x.as_tensor().gelu_erf().unwrap();
        assert!(max_abs_diff(&fused, &exact) < 1e-5);
        let gf = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ge = (&exact * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_abs_diff(gf.get(&x).unwrap(), ge.get(&x).unwrap());
        assert!(d < 1e-5, "gelu gradient differs by {d}");

        let fused = tanh(&x).unwrap();
        let exact = x.as_tensor().tanh().unwrap();
        assert!(max_abs_diff(&fused, &exact) < 1e-6);
        let gf = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ge = (&exact * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_abs_diff(gf.get(&x).unwrap(), ge.get(&x).unwrap());
        assert!(d < 1e-5, "tanh gradient differs by {d}");

        let logits = Var::from_tensor(&Tensor::randn(0f32, 3.0, (7, 11), &dev).unwrap()).unwrap();
        let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1, 2], &dev).unwrap();
        let fused = cross_entropy(&logits, &targets).unwrap();
        let slow = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        assert!(max_abs_diff(&fused, &slow) < 1e-5);
        let gf = fused.backward().unwrap();
        let gs = slow.backward().unwrap();
        let d = max_abs_diff(gf.get(&logits).unwrap(), gs.get(&logits).unwrap());
        assert!(d < 1e-6, "cross-entropy gradient differs by {d}");
    }

    /// The blocked nearest-row search picks what the full distance matrix picks, over more
    /// rows than one block.
    #[test]
    fn nearest_rows_matches_the_distance_matrix() {
        let dev = Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (50, 8), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 100, 8), &dev).unwrap();
        let got = nearest_rows(&x, &table).unwrap();
        let flat = x.reshape((300, 8)).unwrap();
        let dist = flat
            .unsqueeze(1)
            .unwrap()
            .broadcast_sub(&table.unsqueeze(0).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum(2)
            .unwrap();
        let want = table
            .index_select(&dist.argmin(1).unwrap(), 0)
            .unwrap()
            .reshape((3, 100, 8))
            .unwrap();
        assert_eq!(got.dims(), &[3, 100, 8]);
        assert_eq!(max_abs_diff(&got, &want), 0.0);
    }
}
