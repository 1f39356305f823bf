//! The model repository, laid out as Triton's: `DIR/<model>/<version>/model.onnx`.
//!
//! Hot swap: a new version is loaded beside the served one and becomes the served one in a single
//! map update; requests already holding the old version finish on it (it is dropped when the last
//! one is done). A version that fails to load is refused with its reason in the index, and what was
//! serving keeps serving. Version policy: the newest `keep_versions` versions stay loaded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::batcher::{BatchOptions, Batcher};
use crate::card::GuideCard;
use crate::runtime::{GuideSession, SessionOptions};
use crate::{GuideError, Result};

pub const MODEL_FILE: &str = "model.onnx";

#[derive(Debug, Clone, Copy)]
pub struct RepositoryOptions {
    pub keep_versions: usize,
    pub session: SessionOptions,
    pub batch: BatchOptions,
}

/// A model version in service.
pub struct LoadedVersion {
    pub name: String,
    pub version: u64,
    pub card: GuideCard,
    pub batcher: Batcher,
}

#[derive(Default)]
struct ModelState {
    loaded: BTreeMap<u64, Arc<LoadedVersion>>,
    /// Versions that failed to load: (file modification time, reason). Not retried by the poller
    /// until the file changes.
    failed: BTreeMap<u64, (Option<SystemTime>, String)>,
    /// Unloaded on request: the poller leaves it alone until it is loaded again.
    unloaded: bool,
}

pub struct Repository {
    dir: PathBuf,
    options: RepositoryOptions,
    models: RwLock<HashMap<String, ModelState>>,
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

/// A model name is a plain name: `[A-Za-z0-9_.-]+`, not `.` or `..` (it becomes a path).
pub fn check_model_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name != "."
        && name != "..";
    if plain {
        Ok(())
    } else {
        Err(GuideError::invalid(format!(
            "model_name `{}` is not a plain name ([A-Za-z0-9_.-], not `.` or `..`)",
            dlm_proto::guide_contract::clip(name, 64)
        )))
    }
}

/// The versions of a model whose files, links resolved, lie inside `root`.
fn versions_on_disk(root: &Path, model_dir: &Path) -> BTreeMap<u64, PathBuf> {
    let Ok(entries) = std::fs::read_dir(model_dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u64 = e.file_name().to_str()?.parse().ok()?;
            let file = e.path().join(MODEL_FILE);
            let inside = file.canonicalize().ok()?.starts_with(root);
            if !inside {
                tracing::warn!(model = %file.strip_prefix(root).unwrap_or(&file).display(),
                    "ignored: resolves outside the repository");
            }
            (file.is_file() && inside).then_some((version, file))
        })
        .collect()
}

/// A loaded version's card: (version, card).
type CardOf = (u64, GuideCard);

/// What differs between two cards, in a few words.
fn card_difference(old: &GuideCard, new: &GuideCard) -> String {
    if old.embedding_sha256 != new.embedding_sha256 {
        "another generator embedding".into()
    } else if old.fields != new.fields {
        "other fields or values".into()
    } else {
        "another schedule or canvas".into()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Repository {
    pub fn new(dir: &Path, options: RepositoryOptions) -> Result<Arc<Self>> {
        if !dir.is_dir() {
            return Err(GuideError::FailedPrecondition(format!(
                "model repository {} is not a directory",
                dir.display()
            )));
        }
        let dir = dir.canonicalize().map_err(|e| {
            GuideError::FailedPrecondition(format!("model repository {}: {e}", dir.display()))
        })?;
        Ok(Arc::new(Self {
            dir,
            options,
            models: RwLock::new(HashMap::new()),
        }))
    }

    fn model_names_on_disk(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Brings one model in line with the disk. `explicit` (a load request) also retries versions
    /// that failed before, and reports an error if the newest version cannot be loaded.
    pub fn sync_model(&self, name: &str, explicit: bool) -> Result<()> {
        check_model_name(name)?;
        let on_disk = versions_on_disk(&self.dir, &self.dir.join(name));
        if on_disk.is_empty() {
            if explicit {
                return Err(GuideError::NotFound(format!(
                    "no versions of model `{name}` in the repository (expected {name}/<version>/{MODEL_FILE})"
                )));
            }
            self.models.write().unwrap().remove(name);
            return Ok(());
        }
        let wanted: Vec<(u64, PathBuf)> = on_disk
            .into_iter()
            .rev()
            .take(self.options.keep_versions.max(1))
            .collect();
        let (to_load, mut reference): (Vec<(u64, PathBuf)>, Option<CardOf>) = {
            let mut models = self.models.write().unwrap();
            let state = models.entry(name.to_string()).or_default();
            if explicit {
                state.unloaded = false;
            }
            if state.unloaded {
                return Ok(());
            }
            let to_load = wanted
                .iter()
                .filter(|(v, path)| {
                    !state.loaded.contains_key(v)
                        && (explicit
                            || state
                                .failed
                                .get(v)
                                .map(|(m, _)| *m != modified(path))
                                .unwrap_or(true))
                })
                .cloned()
                .collect();
            // A new version must keep the card of the one it replaces.
            let reference = state
                .loaded
                .values()
                .next_back()
                .map(|v| (v.version, v.card.clone()));
            (to_load, reference)
        };
        let mut newest_error = None;
        let mut fresh = Vec::new();
        for (version, path) in to_load {
            let label = format!("{name}/{version}");
            let shown = format!("{name}/{version}/{MODEL_FILE}");
            let checked = GuideSession::load(&path, &shown, self.options.session).and_then(|mut session| {
                session.canary()?;
                match &reference {
                    Some((v, card)) if *card != session.card => {
                        Err(GuideError::FailedPrecondition(format!(
                            "its card differs from version {v}'s ({}): serve it under a new model name",
                            card_difference(card, &session.card)
                        )))
                    }
                    _ => Ok(session),
                }
            });
            match checked {
                Ok(session) => {
                    reference.get_or_insert((version, session.card.clone()));
                    let card = session.card.clone();
                    let batcher = Batcher::start(session, self.options.batch, label.clone());
                    tracing::info!(model = %label, "loaded");
                    fresh.push(Arc::new(LoadedVersion {
                        name: name.to_string(),
                        version,
                        card,
                        batcher,
                    }));
                }
                Err(e) => {
                    tracing::error!(model = %label, error = %e, "refused: keeps serving what it served");
                    if Some(version) == wanted.first().map(|(v, _)| *v) {
                        newest_error = Some(e.to_string());
                    }
                    self.models
                        .write()
                        .unwrap()
                        .entry(name.to_string())
                        .or_default()
                        .failed
                        .insert(version, (modified(&path), e.to_string()));
                }
            }
        }
        let wanted_set: HashSet<u64> = wanted.iter().map(|(v, _)| *v).collect();
        {
            let mut models = self.models.write().unwrap();
            let state = models.entry(name.to_string()).or_default();
            for v in fresh {
                state.failed.remove(&v.version);
                state.loaded.insert(v.version, v);
            }
            // Retire versions outside the policy, but only once a wanted version serves.
            if state.loaded.keys().any(|v| wanted_set.contains(v)) {
                let retired: Vec<u64> = state
                    .loaded
                    .keys()
                    .copied()
                    .filter(|v| !wanted_set.contains(v))
                    .collect();
                for v in retired {
                    state.loaded.remove(&v);
                    tracing::info!(model = %format!("{name}/{v}"), "unloaded (version policy)");
                }
            }
        }
        match newest_error {
            Some(e) if explicit => Err(GuideError::FailedPrecondition(e)),
            _ => Ok(()),
        }
    }

    /// Brings every model in line with the disk (the poller's job).
    pub fn sync_all(&self) {
        let mut names: HashSet<String> = self.model_names_on_disk().into_iter().collect();
        names.extend(self.models.read().unwrap().keys().cloned());
        for name in names {
            if let Err(e) = self.sync_model(&name, false) {
                tracing::warn!(model = %name, error = %e, "sync failed");
            }
        }
    }

    pub fn unload(&self, name: &str) -> Result<()> {
        check_model_name(name)?;
        let mut models = self.models.write().unwrap();
        let state = models
            .get_mut(name)
            .ok_or_else(|| GuideError::NotFound(format!("unknown model `{name}`")))?;
        state.loaded.clear();
        state.unloaded = true;
        tracing::info!(model = %name, "unloaded on request");
        Ok(())
    }

    /// The version to serve: `version` if given, else the newest loaded.
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<LoadedVersion>> {
        let models = self.models.read().unwrap();
        let state = models
            .get(name)
            .filter(|s| !s.loaded.is_empty())
            .ok_or_else(|| {
                let mut served: Vec<&String> = models
                    .iter()
                    .filter(|(_, s)| !s.loaded.is_empty())
                    .map(|(n, _)| n)
                    .collect();
                served.sort();
                GuideError::NotFound(format!(
                    "unknown or unloaded model `{name}` (serving: {served:?})"
                ))
            })?;
        if version.is_empty() {
            return Ok(state.loaded.values().next_back().unwrap().clone());
        }
        let v: u64 = version.parse().map_err(|_| {
            GuideError::invalid(format!("model_version `{version}` is not a number"))
        })?;
        state.loaded.get(&v).cloned().ok_or_else(|| {
            GuideError::NotFound(format!(
                "model `{name}` has no loaded version {v} (loaded: {:?})",
                state.loaded.keys().collect::<Vec<_>>()
            ))
        })
    }

    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let models = self.models.read().unwrap();
        let mut out = Vec::new();
        for (name, state) in models.iter() {
            for v in state.loaded.keys() {
                out.push(IndexEntry {
                    name: name.clone(),
                    version: v.to_string(),
                    state: "READY",
                    reason: String::new(),
                });
            }
            if !ready_only {
                for (v, (_, reason)) in &state.failed {
                    out.push(IndexEntry {
                        name: name.clone(),
                        version: v.to_string(),
                        state: "UNAVAILABLE",
                        reason: reason.clone(),
                    });
                }
                if state.unloaded {
                    out.push(IndexEntry {
                        name: name.clone(),
                        version: String::new(),
                        state: "UNAVAILABLE",
                        reason: "unloaded".into(),
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        out
    }

    pub fn ready(&self) -> bool {
        self.models
            .read()
            .unwrap()
            .values()
            .any(|s| !s.loaded.is_empty())
    }

    /// Re-scans the repository every `interval` (hot swap by dropping in a version directory).
    pub fn spawn_poller(self: &Arc<Self>, interval: Duration) {
        let repo = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let r = Arc::clone(&repo);
                let _ = tokio::task::spawn_blocking(move || r.sync_all()).await;
            }
        });
    }
}
