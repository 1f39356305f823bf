//! The whole Diffusion-LM: embedding, denoiser and tied rounding head, and its directory on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use super::config::ModelConfig;
use super::denoiser::Denoiser;
use super::init::SeededVarMap;
use crate::text::WordTokenizer;
use crate::{Error, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, Clone)]
pub struct DiffusionLm {
    pub config: ModelConfig,
    /// E [V, D]: word embeddings, also the rounding head's weight.
    embedding: Tensor,
    /// b [V]: the rounding head's bias.
    lm_bias: Tensor,
    denoiser: Denoiser,
}

impl DiffusionLm {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let embedding = vb.get_with_hints(
            (config.vocab_size, config.embed_dim),
            "embedding.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let lm_bias = vb.get_with_hints(config.vocab_size, "lm_head.bias", Init::Const(0.0))?;
        Ok(Self {
            config: config.clone(),
            embedding,
            lm_bias,
            denoiser: Denoiser::new(config, vb.pp("denoiser"))?,
        })
    }

    pub fn device(&self) -> &Device {
        self.embedding.device()
    }

    pub fn embedding(&self) -> &Tensor {
        &self.embedding
    }

    /// sha256 of the embedding table as little-endian f32, row-major: the fingerprint a guide
    /// records of the generator it was trained for.
    pub fn embedding_sha256(&self) -> candle_core::Result<String> {
        use sha2::Digest;
        let values = self.embedding.flatten_all()?.to_vec1::<f32>()?;
        let mut hasher = sha2::Sha256::new();
        for v in values {
            hasher.update(v.to_le_bytes());
        }
        Ok(hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// Word ids [B, L] (u32) → latents [B, L, D].
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        self.embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, self.config.embed_dim))
    }

    /// x0 prediction [B, L, D] from x_t [B, L, D] and per-sequence timesteps [B] (f32); `previous`
    /// is the last x0 estimate for self-conditioning models (ignored otherwise).
    pub fn predict_x0(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        previous: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.denoiser.forward(x_t, t, previous)
    }

    /// Rounding logits x0·Eᵀ + b: [B, L, D] → [B, L, V].
    pub fn logits(&self, x0: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, d) = x0.dims3()?;
        x0.reshape((b * l, d))?
            .matmul(&self.embedding.t()?)?
            .broadcast_add(&self.lm_bias)?
            .reshape((b, l, self.config.vocab_size))
    }

    /// The most likely word at every position.
    pub fn round(&self, x0: &Tensor) -> candle_core::Result<Vec<Vec<u32>>> {
        self.logits(x0)?.argmax(D::Minus1)?.to_vec2::<u32>()
    }

    /// The clamping trick: replaces every vector by its nearest word embedding (L2).
    pub fn clamp_to_embeddings(&self, x0: &Tensor) -> candle_core::Result<Tensor> {
        clamp_to_rows(x0, &self.embedding)
    }

    /// The embedding with the rows of `excluded` moved out of reach of the clamp: a table whose
    /// nearest row to any estimate is a word outside `excluded`.
    pub fn embedding_without(&self, excluded: &[u32]) -> candle_core::Result<Tensor> {
        let mut rows = self.embedding.to_vec2::<f32>()?;
        for &id in excluded {
            if let Some(row) = rows.get_mut(id as usize) {
                row.fill(1e4);
            }
        }
        let (v, d) = self.embedding.dims2()?;
        Tensor::from_vec(rows.concat(), (v, d), self.embedding.device())
    }
}

/// Each vector of x0 [B, L, D] replaced by its nearest row of `table` [V, D] (L2).
pub fn clamp_to_rows(x0: &Tensor, table: &Tensor) -> candle_core::Result<Tensor> {
    if x0.device().is_cpu() {
        return super::ops::nearest_rows(x0, table);
    }
    let (b, l, d) = x0.dims3()?;
    let nearest = distances_to_rows(x0, table)?.argmin(1)?;
    table.index_select(&nearest, 0)?.reshape((b, l, d))
}

/// ‖x − e‖² − ‖x‖² for every vector x of x0 [B, L, D] and row e of `table` [V, D]: [B·L, V].
/// ‖x‖² is the same for every e, so it is left out: the order of a vector's rows is unchanged.
pub fn distances_to_rows(x0: &Tensor, table: &Tensor) -> candle_core::Result<Tensor> {
    let (b, l, d) = x0.dims3()?;
    x0.reshape((b * l, d))?
        .matmul(&table.t()?)?
        .affine(-2.0, 0.0)?
        .broadcast_add(&table.sqr()?.sum(1)?)
}

/// A model directory loaded for inference: weights, config and tokenizer.
pub struct LoadedModel {
    pub model: DiffusionLm,
    pub tokenizer: WordTokenizer,
    pub dir: PathBuf,
}

impl LoadedModel {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = ModelConfig::load(&dir.join(CONFIG_FILE))?;
        let tokenizer = load_tokenizer(dir, config.vocab_size, CONFIG_FILE)?;
        let (_, varmap) = build(&config, device, 0)?;
        load_weights(&varmap, &dir.join(WEIGHTS_FILE))?;
        let model = inference_model(&config, &varmap, device)?;
        Ok(Self {
            model,
            tokenizer,
            dir: dir.to_path_buf(),
        })
    }
}

/// A freshly initialised model (weights drawn from `seed`) and the variables that own its weights.
pub fn build(config: &ModelConfig, device: &Device, seed: u64) -> Result<(DiffusionLm, VarMap)> {
    config.validate()?;
    let varmap = VarMap::new();
    let backend: Box<dyn SimpleBackend> = Box::new(SeededVarMap {
        varmap: varmap.clone(),
        seed,
    });
    let vb = VarBuilder::from_backend(backend, DType::F32, device.clone());
    let model = DiffusionLm::new(config, vb)?;
    Ok((model, varmap))
}

/// The model over plain-tensor copies of `varmap`'s weights (sharing their storage): inference
/// needs no gradients, and without variables candle records no graph and the CPU takes its
/// inference kernels.
pub fn inference_model(
    config: &ModelConfig,
    varmap: &VarMap,
    device: &Device,
) -> Result<DiffusionLm> {
    Ok(DiffusionLm::new(config, plain_weights(varmap, device))?)
}

/// A builder over plain-tensor copies of `varmap`'s weights (sharing their storage): without
/// variables candle records no graph, and the CPU takes its inference kernels.
pub fn plain_weights(varmap: &VarMap, device: &Device) -> VarBuilder<'static> {
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    VarBuilder::from_tensors(weights, DType::F32, device)
}

/// The tokenizer of a model directory, checked against the vocabulary size its `config_file`
/// says.
pub fn load_tokenizer(dir: &Path, vocab_size: usize, config_file: &str) -> Result<WordTokenizer> {
    let tokenizer = WordTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
    if tokenizer.vocab_size() != vocab_size {
        return Err(Error::format(
            dir.join(TOKENIZER_FILE),
            format!(
                "vocabulary has {} words but {config_file} says vocab_size = {vocab_size}",
                tokenizer.vocab_size()
            ),
        ));
    }
    Ok(tokenizer)
}

/// Overwrites every variable of `varmap` with the tensor of the same name in a safetensors file.
pub fn load_weights(varmap: &VarMap, path: &Path) -> Result<()> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        ));
    }
    let mut varmap = varmap.clone();
    varmap
        .load(path)
        .map_err(|e| Error::format(path, e.to_string()))
}

/// Writes named tensors as safetensors, atomically (see [`replace_file`]).
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    replace_file(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(|e| Error::format(path, e.to_string()))
    })
}

/// Replaces `path` by what `write` puts in a temporary file beside it, renamed over `path`: a
/// reader, or a resume after a kill mid-save, sees the old file or the new one, never half of one.
/// The temporary file is removed if `write` fails.
pub fn replace_file(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    write(tmp.path())?;
    // Temporary files (and safetensors' own writes) are private, 0600; a model file is read by
    // whoever serves it.
    #[cfg(unix)]
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes a complete model directory (config, tokenizer, weights) that [`LoadedModel::load`] reads.
pub fn save_model_dir(
    dir: &Path,
    config: &ModelConfig,
    tokenizer: &WordTokenizer,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    config.save(&dir.join(CONFIG_FILE))?;
    tokenizer.save(&dir.join(TOKENIZER_FILE))?;
    save_weights(dir, weights)
}

/// Writes `model.safetensors` in `dir`, atomically.
pub fn save_weights(dir: &Path, weights: &HashMap<String, Tensor>) -> Result<()> {
    save_tensors(weights, &dir.join(WEIGHTS_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A save that fails half-way leaves the old file whole and no temporary file beside it.
    #[test]
    fn a_failed_save_keeps_the_old_file_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        let old: HashMap<String, Tensor> = [(
            "w".to_string(),
            Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
        )]
        .into();
        save_tensors(&old, &path).unwrap();
        let failed = replace_file(&path, |tmp| {
            std::fs::write(tmp, b"half a file").unwrap();
            Err(Error::format(&path, "killed mid-save"))
        });
        assert!(failed.is_err());
        let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.safetensors")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644, "{mode:o}");
        }
    }

    /// What positions before a fixed END clamp to: never an excluded row, and where the nearest
    /// row is excluded, the nearest of the others.
    #[test]
    fn a_table_without_some_rows_never_clamps_to_them() {
        let config = ModelConfig {
            vocab_size: 30,
            ..Default::default()
        };
        let (model, _) = build(&config, &Device::Cpu, 0).unwrap();
        let excluded = [0u32, 1, 2, 3];
        let table = model.embedding_without(&excluded).unwrap();
        let e = model.embedding().to_vec2::<f32>().unwrap();
        let d = e[0].len();
        // Each excluded embedding itself (its nearest row is excluded), then random points.
        let mut rows: Vec<f32> = excluded
            .iter()
            .flat_map(|&i| e[i as usize].clone())
            .collect();
        let random = Tensor::randn(0f32, 1.0, (1, 12, d), &Device::Cpu).unwrap();
        rows.extend(random.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let n = rows.len() / d;
        let x = Tensor::from_vec(rows.clone(), (1, n, d), &Device::Cpu).unwrap();
        let got = clamp_to_rows(&x, &table).unwrap().squeeze(0).unwrap();
        let got = got.to_vec2::<f32>().unwrap();
        let dist =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q).powi(2)).sum::<f32>();
        for (k, g) in got.iter().enumerate() {
            let x = &rows[k * d..(k + 1) * d];
            let best = (0..e.len())
                .filter(|i| !excluded.contains(&(*i as u32)))
                .min_by(|&a, &b| dist(x, &e[a]).total_cmp(&dist(x, &e[b])))
                .unwrap();
            assert_eq!(g, &e[best], "row {k}");
        }
    }
}
