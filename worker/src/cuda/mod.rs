//! Routed experts on a CUDA GPU (`--device cuda[:N]`, the `cuda` feature).
//!
//! The CUDA libraries are loaded at run time (cudarc's dynamic loading), so
//! this builds everywhere and [`check`] says what is missing on a machine
//! without them. Expert weights are uploaded once, in their stored format,
//! and shared with later placement versions on the same GPU like the CPU
//! backend shares its tensors. A batch is one upload from pinned memory, two
//! grouped launches per stored format (every expert of the batch in each:
//! gate/up with SwiGLU, then down with the route weights) and one download,
//! on a queue of its own (`queue.rs`), so batches in flight overlap. The
//! kernels (`experts.cu`) compute every output in the canonical order of
//! ADR 0001 with the CPU's exact weight expansion and its own `exp`, so a
//! batch's contributions are the bits the CPU backend gives, whatever the
//! batch or placement.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use myriad_model::ModelConfig;
use myriad_model::kernels::{EXP_CLAMP, EXP_LN2, EXP_TAYLOR, Weights};
use myriad_model::weights::load_expert;
use myriad_proto::expert::ExpertBatch;
use myriad_proto::spec::ExpertSpec;

use crate::backend::{ExpertBackend, ExpertMap, Hosted, load_hosted};
use crate::device::Device;
use crate::error::WorkerError;

pub mod batch;
pub mod bench;
#[cfg(test)]
mod emulate;
mod queue;

use batch::{At, Format, Kind, Launch, Place, Plan};
use queue::{Queue, Shape};

const SOURCE: &str = include_str!("experts.cu");
/// Thread pairs of a block, tokens of a run, rows a pair of `down_*` owns:
/// `PAIRS`, `TOKENS` and `DOWN_ROWS` in `experts.cu`, defined there from
/// these ([`source`]).
const PAIRS: u32 = 64;
const TOKENS: u32 = 4;
const DOWN_ROWS: u32 = 2;
/// Blocks along the grid's y (runs of `TOKENS` tokens) at most, CUDA's
/// limit: past it a block takes several runs.
const MAX_BLOCKS_Y: u32 = 65535;

/// The grid and block of `launch`, whose outputs are `n` wide, with at
/// most `most_y` blocks along y (runs of tokens).
fn dims(launch: &Launch, n: usize, most_y: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
    let rows = match launch.kind {
        Kind::GateUp => PAIRS,
        Kind::Down => PAIRS * DOWN_ROWS,
    };
    let runs = launch.rows.div_ceil(TOKENS as usize).min(most_y as usize) as u32;
    (((n as u32).div_ceil(rows), runs, launch.count as u32), (2 * PAIRS, 1, 1))
}

/// Fails, saying what is missing, unless CUDA GPU `ordinal` can run experts
/// here: the driver library, NVRTC (the kernels are compiled at start-up)
/// and the GPU itself.
pub fn check(ordinal: usize) -> Result<(), WorkerError> {
    // SAFETY: only looks for the shared libraries, calling nothing in them.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(WorkerError::Device(
            "no CUDA driver on this machine (libcuda.so was not found): CUDA needs an NVIDIA GPU and its driver".into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(WorkerError::Device(
            "NVRTC (libnvrtc.so, part of the CUDA toolkit) was not found: the worker compiles its kernels \
             with it at start-up"
                .into(),
        ));
    }
    let count = CudaContext::device_count().map_err(|e| device_error("count the CUDA devices", e))?;
    if ordinal >= count.max(0) as usize {
        return Err(WorkerError::Device(format!("no CUDA device {ordinal} (this machine has {count})")));
    }
    Ok(())
}

/// Bytes of memory GPU `ordinal` has.
pub fn memory_bytes(ordinal: usize) -> Result<u64, WorkerError> {
    check(ordinal)?;
    let ctx = CudaContext::new(ordinal).map_err(|e| device_error(&format!("open device {ordinal}"), e))?;
    Ok(ctx.total_mem().map_err(|e| device_error("read the device's memory", e))? as u64)
}

fn device_error(what: &str, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Device(format!("CUDA: {what}: {e}"))
}

/// The compiled kernels and the value tables they read, once per GPU.
struct Kernels {
    /// `gate_up_*` and `down_*` by [`Format`], in [`Format::ALL`]'s order.
    gate_up: Vec<CudaFunction>,
    down: Vec<CudaFunction>,
    /// The tables' device addresses: e4m3, e2m1, e8m0.
    tables: [u64; 3],
    _tables: [CudaSlice<f32>; 3],
}

/// The kernels' source with the launch geometry and the CPU's `exp`
/// constants (as bits) prepended.
fn source() -> String {
    let bits = |v: f32| format!("__uint_as_float(0x{:08x}u)", v.to_bits());
    let mut prelude = String::new();
    let mut define = |name: &str, v: f32| prelude.push_str(&format!("#define {name} {}\n", bits(v)));
    define("EXP_CLAMP_LO", EXP_CLAMP[0]);
    define("EXP_CLAMP_HI", EXP_CLAMP[1]);
    define("EXP_LOG2_E", std::f32::consts::LOG2_E);
    define("EXP_LN2_HI", EXP_LN2[0]);
    define("EXP_LN2_LO", EXP_LN2[1]);
    for (i, c) in EXP_TAYLOR.iter().enumerate() {
        define(&format!("EXP_TAYLOR_{i}"), *c);
    }
    for (name, v) in [("PAIRS", PAIRS), ("TOKENS", TOKENS), ("DOWN_ROWS", DOWN_ROWS)] {
        prelude.push_str(&format!("#define {name} {v}\n"));
    }
    prelude + SOURCE
}

/// [`source`] compiled to PTX so that no operation is contracted or
/// flushed, once per process (`myriad up` runs several workers in one).
/// Needs NVRTC, not a GPU.
fn ptx() -> Result<Ptx, WorkerError> {
    static PTX: OnceLock<Result<Ptx, String>> = OnceLock::new();
    PTX.get_or_init(|| compile().map_err(|e| e.to_string())).clone().map_err(WorkerError::Device)
}

fn compile() -> Result<Ptx, WorkerError> {
    let options = CompileOptions {
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(false),
        name: Some("experts.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(source(), options).map_err(|e| device_error("compile the kernels", e))
}

/// A context on GPU `ordinal` with the kernels loaded in it.
fn open(ordinal: usize) -> Result<(Arc<CudaContext>, Kernels), WorkerError> {
    check(ordinal)?;
    let ctx = CudaContext::new(ordinal).map_err(|e| device_error(&format!("open device {ordinal}"), e))?;
    // SAFETY: every user of the context orders the uses of its buffers
    // itself: weights and tables are read only after the stream that
    // uploaded them is synchronized, and a queue's buffers are used by its
    // own stream alone, one batch at a time, the host waiting for each batch
    // before the queue takes another.
    unsafe { ctx.disable_event_tracking() };
    let kernels = Kernels::compile(&ctx)?;
    Ok((ctx, kernels))
}

/// The device address of `slice`, for a group table or a kernel argument.
/// Every use of it is ordered by hand (see [`CudaBackend::load_reusing`]).
fn address<T>(slice: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    slice.device_ptr(stream).0
}

impl Kernels {
    fn compile(ctx: &Arc<CudaContext>) -> Result<Self, WorkerError> {
        let ptx = ptx()?;
        let module = ctx.load_module(ptx).map_err(|e| device_error("load the kernels", e))?;
        let function = |name: String| module.load_function(&name).map_err(|e| device_error(&name, e));
        let functions = |kind: &str| -> Result<Vec<_>, _> {
            Format::ALL.iter().map(|f| function(format!("{kind}_{}", f.name()))).collect()
        };
        let stream = ctx.default_stream();
        let upload = |values: &Vec<f32>| stream.clone_htod(values).map_err(|e| device_error("upload a table", e));
        let [e4m3, e2m1, e8m0] = batch::tables();
        let tables = [upload(&e4m3)?, upload(&e2m1)?, upload(&e8m0)?];
        stream.synchronize().map_err(|e| device_error("upload the tables", e))?;
        Ok(Kernels {
            gate_up: functions("gate_up")?,
            down: functions("down")?,
            tables: [0, 1, 2].map(|i| address(&tables[i], &stream)),
            _tables: tables,
        })
    }

    fn function(&self, launch: &Launch) -> &CudaFunction {
        let i = Format::ALL.iter().position(|f| *f == launch.format).unwrap_or_default();
        match launch.kind {
            Kind::GateUp => &self.gate_up[i],
            Kind::Down => &self.down[i],
        }
    }
}

/// One weight matrix `[n, k]` on the GPU, in its stored format: its
/// buffers (held for as long as the matrix is) and where they are.
struct Matrix {
    at: At,
    bytes: usize,
    _buffers: (CudaSlice<u8>, Option<CudaSlice<u8>>),
}

impl Matrix {
    fn upload(stream: &Arc<CudaStream>, w: Weights<'_>) -> Result<Self, DriverError> {
        let (format, weights, scales) = batch::stored(w);
        let weights = stream.clone_htod(weights)?;
        let scales = scales.map(|s| stream.clone_htod(s)).transpose()?;
        let at = At {
            format,
            weights: address(&weights, stream),
            scales: scales.as_ref().map_or(0, |s| address(s, stream)),
        };
        let bytes = weights.num_bytes() + scales.as_ref().map_or(0, |s| s.num_bytes());
        Ok(Matrix { at, bytes, _buffers: (weights, scales) })
    }
}

/// A routed expert's three projections on the GPU.
struct Expert {
    w1: Matrix,
    w2: Matrix,
    w3: Matrix,
}

impl Expert {
    fn place(&self) -> Place {
        Place { w1: self.w1.at, w2: self.w2.at, w3: self.w3.at }
    }
}

/// Experts in one GPU's memory.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    kernels: Arc<Kernels>,
    config: ModelConfig,
    experts: ExpertMap<Expert>,
    hosted: Hosted,
    /// Idle queues: one is taken by each batch in flight.
    queues: Mutex<Vec<Queue>>,
}

impl CudaBackend {
    /// Uploads the experts `spec` names from the checkpoint in `dir` to GPU
    /// `ordinal`, taking those a backend in `loaded` already holds there.
    pub fn load_reusing(
        ordinal: usize,
        dir: &Path,
        spec: &ExpertSpec,
        loaded: &[&CudaBackend],
    ) -> Result<Self, WorkerError> {
        let same_gpu = loaded.iter().find(|b| b.ctx.ordinal() == ordinal);
        let (ctx, kernels) = match same_gpu {
            Some(b) => (b.ctx.clone(), b.kernels.clone()),
            None => {
                let (ctx, kernels) = open(ordinal)?;
                (ctx, Arc::new(kernels))
            }
        };
        let stream = ctx.new_stream().map_err(|e| device_error("create a stream", e))?;
        let (config, experts, hosted) = load_hosted(dir, spec, |ckpt, config, id| {
            let earlier = loaded.iter().filter(|b| b.ctx.ordinal() == ordinal).find_map(|b| b.experts.get(&id));
            if let Some(w) = earlier {
                return Ok(w.clone());
            }
            let (layer, expert) = (id.0.0 as usize, id.1.0 as usize);
            let host = load_expert(ckpt, config, layer, expert)?;
            let upload = |m: &myriad_model::weights::Linear| Matrix::upload(&stream, m.w.weights());
            let on_gpu = (|| Ok(Expert { w1: upload(&host.w1)?, w2: upload(&host.w2)?, w3: upload(&host.w3)? }))()
                .map_err(|e: DriverError| device_error(&format!("upload expert {expert} of layer {layer}"), e))?;
            if on_gpu.w1.at.format != on_gpu.w3.at.format {
                return Err(WorkerError::InvalidArgument(format!(
                    "expert {expert} of layer {layer}: its gate projection is {:?} and its up projection {:?}; \
                     the CUDA backend needs them in one format",
                    on_gpu.w1.at.format, on_gpu.w3.at.format
                )));
            }
            Ok(Arc::new(on_gpu))
        })?;
        stream.synchronize().map_err(|e| device_error("upload the experts", e))?;
        Ok(CudaBackend { ctx, kernels, config, experts, hosted, queues: Mutex::new(Vec::new()) })
    }

    /// The batch's weighted contributions, on a queue of its own.
    fn contributions(&self, batch: &ExpertBatch) -> Result<Vec<f32>, DriverError> {
        let plan = Plan::new(batch, |e| self.experts[&(batch.layer, e)].place());
        if plan.members() == 0 {
            return Ok(Vec::new());
        }
        let idle = self.queues.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut queue = match idle {
            Some(queue) => queue,
            None => Queue::new(&self.ctx)?,
        };
        let shape = Shape::of(&self.config);
        let out = queue.run(&self.kernels, shape, &plan, batch)?;
        // A queue whose batch failed is dropped: its stream may be broken.
        self.queues.lock().unwrap_or_else(|e| e.into_inner()).push(queue);
        Ok(out)
    }
}

impl ExpertBackend for CudaBackend {
    fn hosted(&self) -> &Hosted {
        &self.hosted
    }

    fn bytes(&self) -> usize {
        self.experts.values().map(|e| e.w1.bytes + e.w2.bytes + e.w3.bytes).sum()
    }

    fn device(&self) -> Device {
        Device::Cuda(self.ctx.ordinal())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn run(&self, batch: &ExpertBatch) -> Result<Vec<f32>, WorkerError> {
        crate::backend::check_batch(batch, &self.config, |e| self.experts.contains_key(&(batch.layer, e)))?;
        self.contributions(batch).map_err(|e| device_error("run a batch", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile (NVRTC needs no GPU: scripts/test.sh installs
    /// it), and every entry point the backend loads is in the PTX.
    #[test]
    fn the_kernels_compile() {
        // SAFETY: only looks for the shared library.
        assert!(
            unsafe { cudarc::nvrtc::sys::is_culib_present() },
            "NVRTC (libnvrtc.so.12) is not on the library path: scripts/test.sh installs it with pip"
        );
        let ptx = ptx().unwrap().to_src();
        for kind in ["gate_up", "down"] {
            for format in Format::ALL {
                let name = format!("{kind}_{}", format.name());
                assert!(ptx.contains(&format!(".entry {name}(")), "{name} is not in the PTX");
            }
        }
        // No contraction: every fused multiply-add is one the source asks for.
        assert!(!ptx.contains("mad.f32"), "the PTX contracts a multiply and an add");
    }
}
