//! Where expert FFNs run. The transport (gRPC today, NCCL later) never sees
//! anything but this trait.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use myriad_model::checkpoint::Checkpoint;
use myriad_model::weights::{ExpertWeights, load_expert};
use myriad_model::{ModelConfig, moe};
use myriad_proto::expert::{ExpertBatch, ExpertId, LayerId};
use myriad_proto::spec::ExpertSpec;

use crate::device::Device;
use crate::error::WorkerError;

/// The model shape a backend serves and the experts it hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct Hosted {
    /// The checkpoint's fingerprint: routers refuse workers of another model.
    pub model_id: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_experts: usize,
    /// Sorted `(layer, expert)` pairs.
    pub experts: Vec<(LayerId, ExpertId)>,
}

/// Runs hosted experts on batches of tokens.
pub trait ExpertBackend: Send + Sync + 'static {
    fn hosted(&self) -> &Hosted;

    /// Bytes its experts' weights hold on its device, in their stored formats.
    fn bytes(&self) -> usize;

    /// Where its experts live.
    fn device(&self) -> Device;

    /// The backend itself, so that a later placement version on the same
    /// device can take experts it has already loaded.
    fn as_any(&self) -> &dyn std::any::Any;

    /// One weighted output row per `(token, expert)` pair of `batch`, in the
    /// batch's pair order. Fails with `InvalidArgument` on anything it cannot
    /// serve; never panics on a batch that passed `TryFrom`.
    fn run(&self, batch: &ExpertBatch) -> Result<Vec<f32>, WorkerError>;
}

/// Experts in host memory, computed with the model crate's batch-invariant
/// kernels (so results are bit-identical to the single-process path).
pub struct CpuBackend {
    config: ModelConfig,
    /// Shared with the backends of other placement versions that host the
    /// same expert, so a rollout does not hold two copies of it.
    experts: ExpertMap<ExpertWeights>,
    hosted: Hosted,
}

/// The model in `dir` as a worker describes it, hosting nothing yet.
pub fn model_shape(dir: &Path) -> Result<Hosted, WorkerError> {
    let (config, config_bytes) = ModelConfig::read(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    Ok(Hosted {
        model_id: ckpt.fingerprint(&config_bytes),
        hidden_size: config.hidden_size,
        num_layers: config.num_hidden_layers,
        num_experts: config.n_routed_experts,
        experts: Vec::new(),
    })
}

impl CpuBackend {
    /// Maps the checkpoint in `dir` and loads only the experts `spec` names.
    pub fn load(dir: &Path, spec: &ExpertSpec) -> Result<Self, WorkerError> {
        Self::load_reusing(dir, spec, &[])
    }

    /// Like [`CpuBackend::load`], taking experts `loaded` already holds from
    /// there instead of loading them again.
    pub fn load_reusing(dir: &Path, spec: &ExpertSpec, loaded: &[&CpuBackend]) -> Result<Self, WorkerError> {
        let (config, experts, hosted) = load_hosted(dir, spec, |ckpt, config, id| {
            Ok(match loaded.iter().find_map(|b| b.experts.get(&id)) {
                Some(w) => w.clone(),
                None => Arc::new(load_expert(ckpt, config, id.0.0 as usize, id.1.0 as usize)?),
            })
        })?;
        Ok(CpuBackend { config, experts, hosted })
    }
}

/// The experts of one backend, by `(layer, expert)`.
pub(crate) type ExpertMap<E> = HashMap<(LayerId, ExpertId), Arc<E>>;

/// Reads the model in `dir` and gets each expert `spec` names from `get`
/// (loaded from the checkpoint, or taken from an earlier backend): the
/// model's config, the experts, and what the backend hosts. Fails on a spec
/// that names none of the model's experts.
pub(crate) fn load_hosted<E>(
    dir: &Path,
    spec: &ExpertSpec,
    mut get: impl FnMut(&Checkpoint, &ModelConfig, (LayerId, ExpertId)) -> Result<Arc<E>, WorkerError>,
) -> Result<(ModelConfig, ExpertMap<E>, Hosted), WorkerError> {
    let (config, config_bytes) = ModelConfig::read(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let mut experts = HashMap::new();
    for layer in 0..config.num_hidden_layers as u32 {
        for expert in 0..config.n_routed_experts as u32 {
            if spec.contains(layer, expert) {
                let id = (LayerId(layer), ExpertId(expert));
                experts.insert(id, get(&ckpt, &config, id)?);
            }
        }
    }
    if experts.is_empty() {
        return Err(WorkerError::InvalidArgument(format!(
            "expert spec `{spec}` names none of the model's {} layers x {} experts",
            config.num_hidden_layers, config.n_routed_experts
        )));
    }
    let mut list: Vec<_> = experts.keys().copied().collect();
    list.sort();
    let hosted = Hosted {
        model_id: ckpt.fingerprint(&config_bytes),
        hidden_size: config.hidden_size,
        num_layers: config.num_hidden_layers,
        num_experts: config.n_routed_experts,
        experts: list,
    };
    Ok((config, experts, hosted))
}

impl ExpertBackend for CpuBackend {
    fn hosted(&self) -> &Hosted {
        &self.hosted
    }

    fn bytes(&self) -> usize {
        self.experts.values().map(|e| e.bytes()).sum()
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn run(&self, batch: &ExpertBatch) -> Result<Vec<f32>, WorkerError> {
        let layer = batch.layer;
        check_batch(batch, &self.config, |e| self.experts.contains_key(&(layer, e)))?;
        let routes: Vec<moe::Route> =
            batch.routes.iter().map(|r| r.iter().map(|(e, w)| (e.0 as usize, *w)).collect()).collect();
        let experts = &self.experts;
        moe::contributions(
            |e| experts.get(&(layer, ExpertId(e as u32))).map(|w| &**w),
            &self.config,
            &batch.hidden,
            &routes,
        )
        .map_err(|e| WorkerError::Internal(e.to_string()))
    }
}

/// Refuses a batch a backend of `config` that hosts the experts `hosts`
/// accepts cannot run: a layer the model lacks, another hidden width, an
/// expert not hosted here.
pub(crate) fn check_batch(
    batch: &ExpertBatch,
    config: &ModelConfig,
    hosts: impl Fn(ExpertId) -> bool,
) -> Result<(), WorkerError> {
    let layer = batch.layer;
    if layer.0 as usize >= config.num_hidden_layers {
        return Err(WorkerError::InvalidArgument(format!(
            "layer {} does not exist (the model has {})",
            layer.0, config.num_hidden_layers
        )));
    }
    if batch.width != config.hidden_size {
        return Err(WorkerError::InvalidArgument(format!(
            "hidden states are {} wide, the model's are {}",
            batch.width, config.hidden_size
        )));
    }
    if let Some((e, _)) = batch.routes.iter().flatten().find(|(e, _)| !hosts(*e)) {
        return Err(WorkerError::InvalidArgument(format!("expert {} of layer {} is not hosted here", e.0, layer.0)));
    }
    Ok(())
}
