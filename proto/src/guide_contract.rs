//! The guide tensor contract over the Open Inference Protocol, written out once: the generator
//! encodes requests and decodes replies with it, the guide decodes requests and encodes replies,
//! the tests build both sides with it.
//!
//! Inputs: `latents` FP32 [B, L, D], `timesteps` INT64 [B] (training-schedule units), `targets`
//! INT64 [B, F] (a value id per field, −1 = unconstrained). Outputs: `log_prob` FP32 [B] (summed
//! over constrained fields) and `grad` FP32 [B, L, D] = ∂ log_prob / ∂ latents. A row whose
//! latents are not finite is answered with log_prob NaN and a zero gradient; its batch-mates are
//! computed as usual. Tensor data may travel as `raw_*_contents` or as typed `contents`; both are
//! legal OIP and both are read.

use crate::card::GuideCard;
use crate::inference::{
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    InferTensorContents, ModelInferRequest, ModelInferResponse,
};

pub const LATENTS: &str = "latents";
pub const TIMESTEPS: &str = "timesteps";
pub const TARGETS: &str = "targets";
pub const LOG_PROB: &str = "log_prob";
pub const GRAD: &str = "grad";

/// The fixed dimensions of a guide's tensors (from its card).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub seq_len: usize,
    pub embed_dim: usize,
    pub fields: usize,
}

impl Dims {
    pub fn of(card: &GuideCard) -> Self {
        Self {
            seq_len: card.seq_len,
            embed_dim: card.embed_dim,
            fields: card.fields.len(),
        }
    }

    /// Latent values per row, L·D.
    pub fn per_row(&self) -> usize {
        self.seq_len * self.embed_dim
    }
}

/// A batch in the contract's layout, row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuideBatch {
    pub rows: usize,
    pub latents: Vec<f32>,
    pub timesteps: Vec<i64>,
    pub targets: Vec<i64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuideOutputs {
    pub log_prob: Vec<f32>,
    pub grad: Vec<f32>,
}

impl GuideBatch {
    /// Rows whose latents hold a NaN or an infinity.
    pub fn non_finite_rows(&self) -> Vec<usize> {
        let per = self.latents.len() / self.rows.max(1);
        (0..self.rows)
            .filter(|&r| {
                self.latents[r * per..(r + 1) * per]
                    .iter()
                    .any(|v| !v.is_finite())
            })
            .collect()
    }
}

/// A contract violation, with a message that names the tensor at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct ContractError(pub String);

impl std::fmt::Display for ContractError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ContractError {}

type Result<T> = std::result::Result<T, ContractError>;

fn fail<T>(message: String) -> Result<T> {
    Err(ContractError(message))
}

fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The generator's side: one ModelInfer for `model` carrying `batch`.
pub fn encode_request(model: &str, dims: Dims, batch: &GuideBatch) -> ModelInferRequest {
    let (b, l, d, f) = (
        batch.rows as i64,
        dims.seq_len as i64,
        dims.embed_dim as i64,
        dims.fields as i64,
    );
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![
            input(LATENTS, "FP32", vec![b, l, d]),
            input(TIMESTEPS, "INT64", vec![b]),
            input(TARGETS, "INT64", vec![b, f]),
        ],
        raw_input_contents: vec![
            f32_bytes(&batch.latents),
            i64_bytes(&batch.timesteps),
            i64_bytes(&batch.targets),
        ],
        ..Default::default()
    }
}

/// Elements of `shape`, or None when a dimension is negative or the product overflows.
fn elements(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

/// Bytes of an input, raw or typed, checked against its shape (sizes computed without overflow).
fn input_bytes<'a>(
    req: &'a ModelInferRequest,
    name: &str,
    datatype: &str,
    expected: &[Option<i64>],
) -> Result<(std::borrow::Cow<'a, [u8]>, Vec<i64>)> {
    let Some((index, input)) = req.inputs.iter().enumerate().find(|(_, i)| i.name == name) else {
        return fail(format!("missing input `{name}`"));
    };
    if input.datatype != datatype {
        return fail(format!(
            "input `{name}`: datatype {}, expected {datatype}",
            clip(&input.datatype, 32)
        ));
    }
    let shape_ok = input.shape.len() == expected.len()
        && input
            .shape
            .iter()
            .zip(expected)
            .all(|(g, w)| *g >= 0 && w.is_none_or(|w| w == *g));
    if !shape_ok {
        let want: Vec<String> = expected
            .iter()
            .map(|d| d.map(|v| v.to_string()).unwrap_or_else(|| "B".into()))
            .collect();
        let got: Vec<i64> = input.shape.iter().take(8).copied().collect();
        return fail(format!(
            "input `{name}`: shape {got:?}, expected [{}]",
            want.join(", ")
        ));
    }
    let width = if datatype == "FP32" { 4 } else { 8 };
    let Some(want_bytes) = elements(&input.shape).and_then(|n| n.checked_mul(width)) else {
        return fail(format!(
            "input `{name}`: shape {:?} is too large",
            input.shape
        ));
    };
    let bytes: std::borrow::Cow<[u8]> = if !req.raw_input_contents.is_empty() {
        std::borrow::Cow::Borrowed(&req.raw_input_contents[index])
    } else {
        let c = input.contents.as_ref();
        std::borrow::Cow::Owned(match datatype {
            "FP32" => c.map(|c| f32_bytes(&c.fp32_contents)).unwrap_or_default(),
            _ => c.map(|c| i64_bytes(&c.int64_contents)).unwrap_or_default(),
        })
    };
    if bytes.len() != want_bytes {
        return fail(format!(
            "input `{name}`: {} bytes of data for shape {:?} ({want_bytes} expected)",
            bytes.len(),
            input.shape
        ));
    }
    Ok((bytes, input.shape.clone()))
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn ints(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// The guide's side: wire → batch, every tensor checked for name, datatype, shape, byte length
/// and values; at most `max_rows` rows. Non-finite latents are let through (see the module doc).
pub fn decode_request(
    req: &ModelInferRequest,
    card: &GuideCard,
    max_rows: usize,
) -> Result<GuideBatch> {
    for input in &req.inputs {
        if ![LATENTS, TIMESTEPS, TARGETS].contains(&input.name.as_str()) {
            return fail(format!(
                "unknown input `{}` (a guide takes {LATENTS}, {TIMESTEPS}, {TARGETS})",
                clip(&input.name, 64)
            ));
        }
    }
    if !req.raw_input_contents.is_empty() && req.raw_input_contents.len() != req.inputs.len() {
        return fail(format!(
            "raw_input_contents has {} entries for {} inputs",
            req.raw_input_contents.len(),
            req.inputs.len()
        ));
    }
    let dims = Dims::of(card);
    let (l, d, f) = (
        dims.seq_len as i64,
        dims.embed_dim as i64,
        dims.fields as i64,
    );
    // The batch size is checked before any size is computed from it.
    if let Some(lat) = req.inputs.iter().find(|i| i.name == LATENTS) {
        if let Some(&b) = lat.shape.first() {
            if b as i128 > max_rows as i128 {
                return fail(format!(
                    "input `{LATENTS}`: {b} rows; this guide takes at most {max_rows} per call"
                ));
            }
        }
    }
    let (lat, lat_shape) = input_bytes(req, LATENTS, "FP32", &[None, Some(l), Some(d)])?;
    let b = lat_shape[0];
    if b == 0 {
        return fail(format!("input `{LATENTS}`: empty batch"));
    }
    let (ts, _) = input_bytes(req, TIMESTEPS, "INT64", &[Some(b)])?;
    let (tg, _) = input_bytes(req, TARGETS, "INT64", &[Some(b), Some(f)])?;
    let timesteps = ints(&ts);
    let t_max = card.diffusion_steps as i64;
    if let Some((row, t)) = timesteps
        .iter()
        .enumerate()
        .find(|(_, t)| !(0..t_max).contains(*t))
    {
        return fail(format!(
            "input `{TIMESTEPS}`: {t} at row {row} is outside [0, {t_max})"
        ));
    }
    let targets = ints(&tg);
    for (i, &v) in targets.iter().enumerate() {
        let field = &card.fields[i % f as usize];
        if v < -1 || v >= field.values.len() as i64 {
            return fail(format!(
                "input `{TARGETS}`: {v} for field `{}` at row {} is outside [-1, {})",
                field.name,
                i / f as usize,
                field.values.len()
            ));
        }
    }
    Ok(GuideBatch {
        rows: b as usize,
        latents: floats(&lat),
        timesteps,
        targets,
    })
}

/// The guide's side: outputs → reply (the outputs `req` asked for; both when it names none).
pub fn encode_response(
    req: &ModelInferRequest,
    version: u64,
    dims: Dims,
    out: &GuideOutputs,
) -> Result<ModelInferResponse> {
    let wanted: Vec<&str> = req.outputs.iter().map(|o| o.name.as_str()).collect();
    if let Some(name) = wanted.iter().find(|n| **n != LOG_PROB && **n != GRAD) {
        return fail(format!(
            "unknown output `{}` (a guide returns {LOG_PROB}, {GRAD})",
            clip(name, 64)
        ));
    }
    let b = out.log_prob.len() as i64;
    let mut resp = ModelInferResponse {
        model_name: req.model_name.clone(),
        model_version: version.to_string(),
        id: req.id.clone(),
        ..Default::default()
    };
    let tensors: [(&str, Vec<i64>, &Vec<f32>); 2] = [
        (LOG_PROB, vec![b], &out.log_prob),
        (
            GRAD,
            vec![b, dims.seq_len as i64, dims.embed_dim as i64],
            &out.grad,
        ),
    ];
    for (name, shape, data) in tensors {
        if !wanted.is_empty() && !wanted.contains(&name) {
            continue;
        }
        resp.outputs.push(InferOutputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        });
        resp.raw_output_contents.push(f32_bytes(data));
    }
    Ok(resp)
}

/// The generator's side: reply → outputs for `rows` rows, raw or typed contents, shapes checked.
pub fn decode_response(resp: &ModelInferResponse, rows: usize, dims: Dims) -> Result<GuideOutputs> {
    let read = |name: &str, want: usize| -> Result<Vec<f32>> {
        let Some((i, out)) = resp
            .outputs
            .iter()
            .enumerate()
            .find(|(_, o)| o.name == name)
        else {
            return fail(format!("the reply has no output `{name}`"));
        };
        if out.datatype != "FP32" {
            return fail(format!(
                "output `{name}` is {}, expected FP32",
                clip(&out.datatype, 32)
            ));
        }
        let data = match resp.raw_output_contents.get(i) {
            Some(raw) => {
                if raw.len() != want * 4 {
                    return fail(format!(
                        "output `{name}`: {} bytes, expected {}",
                        raw.len(),
                        want * 4
                    ));
                }
                floats(raw)
            }
            None => out
                .contents
                .as_ref()
                .map(|c: &InferTensorContents| c.fp32_contents.clone())
                .unwrap_or_default(),
        };
        if data.len() != want {
            return fail(format!(
                "output `{name}`: {} values, expected {want}",
                data.len()
            ));
        }
        Ok(data)
    };
    Ok(GuideOutputs {
        log_prob: read(LOG_PROB, rows)?,
        grad: read(GRAD, rows * dims.per_row())?,
    })
}

/// At most `max` characters of `s` (user input echoed into an error), marked when cut.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::Field;

    fn card() -> GuideCard {
        GuideCard {
            fields: vec![Field {
                name: "food".into(),
                values: vec!["a".into(), "b".into()],
            }],
            embedding_sha256: "x".into(),
            diffusion_steps: 10,
            schedule: "sqrt".into(),
            seq_len: 2,
            embed_dim: 3,
        }
    }

    #[test]
    fn a_request_round_trips_and_typed_contents_read_the_same() {
        let c = card();
        let batch = GuideBatch {
            rows: 2,
            latents: (0..12).map(|v| v as f32).collect(),
            timesteps: vec![0, 9],
            targets: vec![-1, 1],
        };
        let mut req = encode_request("m", Dims::of(&c), &batch);
        assert_eq!(decode_request(&req, &c, 64).unwrap(), batch);
        req.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: batch.latents.clone(),
            ..Default::default()
        });
        req.inputs[1].contents = Some(InferTensorContents {
            int64_contents: batch.timesteps.clone(),
            ..Default::default()
        });
        req.inputs[2].contents = Some(InferTensorContents {
            int64_contents: batch.targets.clone(),
            ..Default::default()
        });
        req.raw_input_contents.clear();
        assert_eq!(decode_request(&req, &c, 64).unwrap(), batch);
        let e = decode_request(&req, &c, 1).unwrap_err();
        assert!(e.0.contains("at most 1"), "{e}");
    }

    #[test]
    fn sizes_that_overflow_are_refused_not_wrapped() {
        let c = card();
        let mut req = encode_request("m", Dims::of(&c), &GuideBatch::default());
        req.inputs[0].shape = vec![1 << 61, 2, 3];
        let e = decode_request(&req, &c, usize::MAX).unwrap_err();
        assert!(e.0.contains("too large"), "{e}");
    }

    #[test]
    fn replies_decode_from_raw_or_typed_contents_and_wrong_sizes_are_errors() {
        let c = card();
        let dims = Dims::of(&c);
        let out = GuideOutputs {
            log_prob: vec![-0.5],
            grad: vec![1.0; 6],
        };
        let req = encode_request("m", dims, &GuideBatch::default());
        let mut resp = encode_response(&req, 1, dims, &out).unwrap();
        assert_eq!(decode_response(&resp, 1, dims).unwrap(), out);
        assert!(decode_response(&resp, 2, dims).is_err());
        for (o, data) in resp.outputs.iter_mut().zip([&out.log_prob, &out.grad]) {
            o.contents = Some(InferTensorContents {
                fp32_contents: data.clone(),
                ..Default::default()
            });
        }
        resp.raw_output_contents.clear();
        assert_eq!(decode_response(&resp, 1, dims).unwrap(), out);
        resp.outputs.clear();
        assert!(decode_response(&resp, 1, dims).is_err());
    }

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(clip("ééé", 2), "éé…");
        assert_eq!(clip("ab", 5), "ab");
    }
}
