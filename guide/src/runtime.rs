//! ONNX Runtime: finding the shared library, sessions, and the tensor contract of a guide model.
//!
//! Contract. Inputs: `latents` FP32 [B, L, D], `timesteps` INT64 [B] (training-schedule units),
//! `targets` INT64 [B, F] (a value id per field, −1 = unconstrained). Outputs: `log_prob` FP32 [B]
//! (summed over constrained fields) and `grad` FP32 [B, L, D] = ∂ log_prob / ∂ latents.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::value::{Tensor, TensorElementType};

use crate::card::{GuideCard, CARD_KEY};
use crate::{GuideError, Result};

pub const LATENTS: &str = "latents";
pub const TIMESTEPS: &str = "timesteps";
pub const TARGETS: &str = "targets";
pub const LOG_PROB: &str = "log_prob";
pub const GRAD: &str = "grad";

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

/// A batch in the contract's layout, row-major.
#[derive(Debug, Clone, Default)]
pub struct GuideBatch {
    pub batch: usize,
    pub latents: Vec<f32>,
    pub timesteps: Vec<i64>,
    pub targets: Vec<i64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuideOutputs {
    pub log_prob: Vec<f32>,
    pub grad: Vec<f32>,
}

/// A loaded guide model: its ONNX Runtime session and its card.
pub struct GuideSession {
    session: Session,
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
    /// Loads `model.onnx` and checks it against the contract and its own card.
    pub fn load(path: &Path, options: SessionOptions) -> Result<Self> {
        let env = ENVIRONMENT.get().ok_or_else(|| {
            GuideError::FailedPrecondition("ONNX Runtime is not initialised".into())
        })?;
        let fail = |m: String| GuideError::FailedPrecondition(format!("{}: {m}", path.display()));
        let session = Session::builder(env)?
            .with_intra_threads(options.intra_threads)
            .map_err(|e| fail(e.to_string()))?
            .with_inter_threads(options.inter_threads)
            .map_err(|e| fail(e.to_string()))?
            .commit_from_file(path)
            .map_err(|e| fail(format!("ONNX Runtime cannot load it: {e}")))?;
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
        Ok(Self { session, card })
    }

    /// Runs one batch.
    pub fn run(&mut self, b: &GuideBatch) -> Result<GuideOutputs> {
        let (l, d, f) = (
            self.card.seq_len,
            self.card.embed_dim,
            self.card.fields.len(),
        );
        let latents = Tensor::from_array(([b.batch, l, d], b.latents.clone()))?;
        let timesteps = Tensor::from_array(([b.batch], b.timesteps.clone()))?;
        let targets = Tensor::from_array(([b.batch, f], b.targets.clone()))?;
        let outputs = self.session.run(ort::inputs![
            LATENTS => latents,
            TIMESTEPS => timesteps,
            TARGETS => targets,
        ])?;
        let (_, log_prob) = outputs[LOG_PROB].try_extract_tensor::<f32>()?;
        let (_, grad) = outputs[GRAD].try_extract_tensor::<f32>()?;
        Ok(GuideOutputs {
            log_prob: log_prob.to_vec(),
            grad: grad.to_vec(),
        })
    }
}
