//! ONNX Runtime: finding the shared library, sessions, and a guide model's graph checked against
//! the tensor contract (`dlm_proto::guide_contract`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::value::{Tensor, TensorElementType};

use crate::card::{GuideCard, CARD_KEY};
use crate::{GuideError, Result};

pub use dlm_proto::guide_contract::{
    GuideBatch, GuideOutputs, GRAD, LATENTS, LOG_PROB, TARGETS, TIMESTEPS,
};

/// Where `deploy/setup.sh` installs ONNX Runtime (the PyPI wheel's library), relative to the repository.
const SETUP_GLOB_DIR: &str = ".venv/lib/python3.11/site-packages/onnxruntime/capi";

static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// The ONNX Runtime library: `explicit`, else `ORT_DYLIB_PATH`, else the project's set-up location
/// (searched from the working directory and from the executable's directory upwards).
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
    {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(GuideError::FailedPrecondition(format!(
                "ONNX Runtime library {} does not exist",
                p.display()
            )))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(Path::to_path_buf));
    }
    for root in roots {
        let dir = root.join(SETUP_GLOB_DIR);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut libs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            libs.sort();
            if let Some(lib) = libs.pop() {
                return Ok(lib);
            }
        }
    }
    Err(GuideError::FailedPrecondition(
        "ONNX Runtime library not found: set ORT_DYLIB_PATH to libonnxruntime.so, or run `deploy/setup.sh` \
         (installs onnxruntime==1.31.1 from PyPI into .venv)"
            .into(),
    ))
}

/// Loads ONNX Runtime once per process.
pub fn init(library: Option<&Path>) -> Result<()> {
    if ENVIRONMENT.get().is_some() {
        return Ok(());
    }
    let path = find_library(library)?;
    let env = ort::init_from(&path)
        .map_err(|e| {
            GuideError::FailedPrecondition(format!(
                "cannot load ONNX Runtime from {}: {e}",
                path.display()
            ))
        })?
        .with_name("dlm-guide")
        .build()?;
    let _ = ENVIRONMENT.set(env);
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    pub intra_threads: usize,
    pub inter_threads: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        // FINDINGS: one intra-op thread beat two at small batches.
        Self {
            intra_threads: 1,
            inter_threads: 1,
        }
    }
}

/// A loaded guide model: its ONNX Runtime session, the same graph specialised to one row, and its
/// card.
pub struct GuideSession {
    session: Session,
    /// The graph with its batch dimension fixed at 1, so ONNX Runtime folds the shape arithmetic
    /// of a dynamic-batch export (a third of its nodes): a one-row call, the common case for a
    /// one-text request, runs on it (README, Guided cost). None when the batch dimension has no
    /// name to override.
    single_row: Option<Session>,
    pub card: GuideCard,
}

fn tensor_spec(outlet: &ort::value::Outlet) -> (Option<TensorElementType>, Vec<i64>) {
    let dtype = outlet.dtype();
    (
        dtype.tensor_type(),
        dtype
            .tensor_shape()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default(),
    )
}

impl GuideSession {
    /// Loads `model.onnx` and checks it against the contract and its own card; errors name the
    /// model as `shown` (a repository-relative path: no absolute paths reach clients).
    pub fn load(path: &Path, shown: &str, options: SessionOptions) -> Result<Self> {
        let env = ENVIRONMENT.get().ok_or_else(|| {
            GuideError::FailedPrecondition("ONNX Runtime is not initialised".into())
        })?;
        let fail = |m: String| GuideError::FailedPrecondition(format!("{shown}: {m}"));
        let build = |batch_of_one: Option<&str>| -> Result<Session> {
            let mut builder = Session::builder(env)?
                .with_intra_threads(options.intra_threads)
                .map_err(|e| fail(e.to_string()))?
                .with_inter_threads(options.inter_threads)
                .map_err(|e| fail(e.to_string()))?;
            if let Some(name) = batch_of_one {
                builder = builder
                    .with_dimension_override(name, 1)
                    .map_err(|e| fail(e.to_string()))?;
            }
            builder
                .commit_from_file(path)
                .map_err(|e| fail(format!("ONNX Runtime cannot load it: {e}")))
        };
        let session = build(None)?;
        let card_json = session
            .metadata()?
            .custom(CARD_KEY)
            .ok_or_else(|| fail(format!("no guide card (metadata_props `{CARD_KEY}`)")))?;
        let card = GuideCard::parse(&card_json).map_err(fail)?;
        let (l, d, f) = (
            card.seq_len as i64,
            card.embed_dim as i64,
            card.fields.len() as i64,
        );
        let want: [(&str, TensorElementType, Vec<i64>); 3] = [
            (LATENTS, TensorElementType::Float32, vec![-1, l, d]),
            (TIMESTEPS, TensorElementType::Int64, vec![-1]),
            (TARGETS, TensorElementType::Int64, vec![-1, f]),
        ];
        let check = |kind: &str,
                     outlets: &[ort::value::Outlet],
                     want: &[(&str, TensorElementType, Vec<i64>)]|
         -> Result<()> {
            for (name, ty, shape) in want {
                let outlet = outlets
                    .iter()
                    .find(|o| o.name() == *name)
                    .ok_or_else(|| fail(format!("missing {kind} `{name}`")))?;
                let (got_ty, got_shape) = tensor_spec(outlet);
                let shape_ok = got_shape.len() == shape.len()
                    && got_shape.iter().zip(shape).all(|(g, w)| *w == -1 || g == w);
                if got_ty != Some(*ty) || !shape_ok {
                    return Err(fail(format!(
                        "{kind} `{name}` is {got_ty:?} {got_shape:?}, the contract wants {ty:?} {shape:?}"
                    )));
                }
            }
            Ok(())
        };
        check("input", session.inputs(), &want)?;
        check(
            "output",
            session.outputs(),
            &[
                (LOG_PROB, TensorElementType::Float32, vec![-1]),
                (GRAD, TensorElementType::Float32, vec![-1, l, d]),
            ],
        )?;
        let batch_dim = session
            .inputs()
            .iter()
            .find(|o| o.name() == LATENTS)
            .and_then(|o| match o.dtype() {
                ort::value::ValueType::Tensor {
                    dimension_symbols, ..
                } => dimension_symbols.first().filter(|s| !s.is_empty()).cloned(),
                _ => None,
            });
        let single_row = batch_dim.as_deref().map(|n| build(Some(n))).transpose()?;
        Ok(Self {
            session,
            single_row,
            card,
        })
    }

    /// Runs one batch. Rows with non-finite latents run as zeros and are answered with log_prob
    /// NaN and a zero gradient: one bad row never fails its batch-mates.
    pub fn run(&mut self, b: &GuideBatch) -> Result<GuideOutputs> {
        let (l, d, f) = (
            self.card.seq_len,
            self.card.embed_dim,
            self.card.fields.len(),
        );
        let per = l * d;
        let bad = b.non_finite_rows();
        let mut latents = b.latents.clone();
        for &r in &bad {
            latents[r * per..(r + 1) * per].fill(0.0);
        }
        let latents = Tensor::from_array(([b.rows, l, d], latents))?;
        let timesteps = Tensor::from_array(([b.rows], b.timesteps.clone()))?;
        let targets = Tensor::from_array(([b.rows, f], b.targets.clone()))?;
        let session = match &mut self.single_row {
            Some(single) if b.rows == 1 => single,
            _ => &mut self.session,
        };
        let outputs = session.run(ort::inputs![
            LATENTS => latents,
            TIMESTEPS => timesteps,
            TARGETS => targets,
        ])?;
        let (_, log_prob) = outputs[LOG_PROB].try_extract_tensor::<f32>()?;
        let (_, grad) = outputs[GRAD].try_extract_tensor::<f32>()?;
        let mut out = GuideOutputs {
            log_prob: log_prob.to_vec(),
            grad: grad.to_vec(),
        };
        if out.log_prob.len() != b.rows || out.grad.len() != b.rows * per {
            return Err(GuideError::Internal(format!(
                "the model returned {} log_prob and {} grad values for {} rows",
                out.log_prob.len(),
                out.grad.len(),
                b.rows
            )));
        }
        for &r in &bad {
            out.log_prob[r] = f32::NAN;
            out.grad[r * per..(r + 1) * per].fill(0.0);
        }
        if !bad.is_empty() {
            metrics::counter!("dlm_guide_non_finite_rows_total").increment(bad.len() as u64);
        }
        Ok(out)
    }

    /// A smoke test before a version serves: two rows (noise at t = 0 and at t = T − 1, one with
    /// every field free, one with the first value of each) must give finite outputs of the
    /// contract's shapes. Catches a graph that loads but computes garbage (corrupted weights).
    pub fn canary(&mut self) -> Result<()> {
        let (l, d, f) = (
            self.card.seq_len,
            self.card.embed_dim,
            self.card.fields.len(),
        );
        // A fixed, spread-out pattern in [-1, 1) (no random source needed).
        let latents: Vec<f32> = (0..2 * l * d)
            .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let batch = GuideBatch {
            rows: 2,
            latents,
            timesteps: vec![0, self.card.diffusion_steps as i64 - 1],
            targets: [vec![-1; f], vec![0; f]].concat(),
        };
        let out = self.run(&batch)?;
        if out.log_prob.iter().chain(&out.grad).any(|v| !v.is_finite()) {
            return Err(GuideError::FailedPrecondition(
                "canary inference gave non-finite outputs (corrupted weights?)".into(),
            ));
        }
        // The one-row graph must answer the second row as the batch did.
        let per = l * d;
        let alone = self.run(&GuideBatch {
            rows: 1,
            latents: batch.latents[per..].to_vec(),
            timesteps: batch.timesteps[1..].to_vec(),
            targets: batch.targets[f..].to_vec(),
        })?;
        let worst = std::iter::once((alone.log_prob[0], out.log_prob[1]))
            .chain(
                alone
                    .grad
                    .iter()
                    .copied()
                    .zip(out.grad[per..].iter().copied()),
            )
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        let finite = alone
            .log_prob
            .iter()
            .chain(&alone.grad)
            .all(|v| v.is_finite());
        if !finite || worst > 1e-4 {
            return Err(GuideError::FailedPrecondition(format!(
                "the one-row graph differs from the batch graph by {worst:e}"
            )));
        }
        Ok(())
    }
}
