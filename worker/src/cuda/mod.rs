//! Routed experts on a CUDA GPU (`--device cuda[:N]`, the `cuda` feature).
//!
//! The CUDA libraries are loaded at run time (cudarc's dynamic loading), so
//! this builds everywhere and [`check`] says what is missing on a machine
//! without them. Expert weights are uploaded once, in their stored format,
//! and shared with later placement versions on the same GPU like the CPU
//! backend shares its tensors. The kernels (`experts.cu`) compute every
//! output in the canonical order of ADR 0001 with the CPU's exact weight
//! expansion and its own `exp`, so a batch's contributions are the bits
//! the CPU backend gives, whatever the batch or placement.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use myriad_model::kernels::{EXP_CLAMP, EXP_LN2, EXP_TAYLOR, Weights};
use myriad_model::weights::load_expert;
use myriad_model::{ModelConfig, quant};
use myriad_proto::expert::{ExpertBatch, ExpertId};
use myriad_proto::spec::ExpertSpec;

use crate::backend::{ExpertBackend, ExpertMap, Hosted, load_hosted};
use crate::device::Device;
use crate::error::WorkerError;

pub mod bench;
#[cfg(test)]
mod emulate;

const SOURCE: &str = include_str!("experts.cu");
/// The kernels' block: 16 lanes by 16 weight rows, and tokens per block
/// row of the grid (`ROWS` and `TOKENS` in `experts.cu`).
const LANES: u32 = 16;
const ROWS: u32 = 16;
const TOKENS: u32 = 8;

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
    f32: CudaFunction,
    bf16: CudaFunction,
    f16: CudaFunction,
    fp8: CudaFunction,
    fp4: CudaFunction,
    swiglu: CudaFunction,
    weigh: CudaFunction,
    e4m3: CudaSlice<f32>,
    e2m1: CudaSlice<f32>,
    e8m0: CudaSlice<f32>,
}

/// The kernels' source with the CPU's `exp` constants prepended, as bits.
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
    prelude + SOURCE
}

/// [`source`] compiled to PTX so that no operation is contracted or
/// flushed. Needs NVRTC, not a GPU.
fn ptx() -> Result<Ptx, WorkerError> {
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

impl Kernels {
    fn compile(ctx: &Arc<CudaContext>) -> Result<Self, WorkerError> {
        let ptx = ptx()?;
        let module = ctx.load_module(ptx).map_err(|e| device_error("load the kernels", e))?;
        let function = |name: &str| module.load_function(name).map_err(|e| device_error(name, e));
        let stream = ctx.default_stream();
        let upload = |values: Vec<f32>| stream.clone_htod(&values).map_err(|e| device_error("upload a table", e));
        let kernels = Kernels {
            f32: function("matmul_f32")?,
            bf16: function("matmul_bf16")?,
            f16: function("matmul_f16")?,
            fp8: function("matmul_fp8")?,
            fp4: function("matmul_fp4")?,
            swiglu: function("swiglu")?,
            weigh: function("weigh")?,
            e4m3: upload((0..=255u8).map(quant::e4m3).collect())?,
            e2m1: upload((0..16u8).map(quant::e2m1).collect())?,
            e8m0: upload((0..=255u8).map(|c| quant::e8m0(c).unwrap_or(f32::NAN)).collect())?,
        };
        stream.synchronize().map_err(|e| device_error("upload the tables", e))?;
        Ok(kernels)
    }
}

/// One weight matrix `[n, k]` on the GPU, in its stored format.
enum Matrix {
    F32(CudaSlice<f32>),
    Half { bytes: CudaSlice<u16>, bf16: bool },
    Fp8 { codes: CudaSlice<u8>, scales: CudaSlice<f32> },
    Fp4 { packed: CudaSlice<u8>, scales: CudaSlice<u8> },
}

impl Matrix {
    fn upload(stream: &Arc<CudaStream>, w: Weights<'_>) -> Result<Self, DriverError> {
        Ok(match w {
            Weights::F32(v) => Matrix::F32(stream.clone_htod(v)?),
            Weights::Half { bytes, bf16 } => {
                let halves: Vec<u16> = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                Matrix::Half { bytes: stream.clone_htod(&halves)?, bf16 }
            }
            Weights::Fp8 { codes, scales, .. } => {
                Matrix::Fp8 { codes: stream.clone_htod(codes)?, scales: stream.clone_htod(scales)? }
            }
            Weights::Fp4 { packed, scales } => {
                Matrix::Fp4 { packed: stream.clone_htod(packed)?, scales: stream.clone_htod(scales)? }
            }
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Matrix::F32(w) => w.num_bytes(),
            Matrix::Half { bytes, .. } => bytes.num_bytes(),
            Matrix::Fp8 { codes, scales } => codes.num_bytes() + scales.num_bytes(),
            Matrix::Fp4 { packed, scales } => packed.num_bytes() + scales.num_bytes(),
        }
    }

    /// Launches `y[rows, n] = x[rows, k] · selfᵀ` on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        kernels: &Kernels,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, f32>,
        rows: usize,
        n: usize,
        k: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), DriverError> {
        let (rows_i, n_i, k_i) = (rows as i32, n as i32, k as i32);
        let config = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(ROWS), (rows as u32).div_ceil(TOKENS), 1),
            block_dim: (LANES, ROWS, 1),
            shared_mem_bytes: 0,
        };
        let function = match self {
            Matrix::F32(_) => &kernels.f32,
            Matrix::Half { bf16: true, .. } => &kernels.bf16,
            Matrix::Half { bf16: false, .. } => &kernels.f16,
            Matrix::Fp8 { .. } => &kernels.fp8,
            Matrix::Fp4 { .. } => &kernels.fp4,
        };
        let mut call = stream.launch_builder(function);
        call.arg(x).arg(&rows_i);
        match self {
            Matrix::F32(w) => call.arg(w),
            Matrix::Half { bytes, .. } => call.arg(bytes),
            Matrix::Fp8 { codes, scales } => call.arg(codes).arg(scales).arg(&kernels.e4m3),
            Matrix::Fp4 { packed, scales } => call.arg(packed).arg(scales).arg(&kernels.e2m1).arg(&kernels.e8m0),
        };
        call.arg(&n_i).arg(&k_i).arg(y);
        // SAFETY: the arguments match the kernel's parameters in number,
        // order and type, and every buffer holds the extent the grid reads
        // or writes (checked by the caller's shapes).
        unsafe { call.launch(config) }.map(drop)
    }
}

/// A routed expert's three projections on the GPU.
struct Expert {
    w1: Matrix,
    w2: Matrix,
    w3: Matrix,
}

/// Experts in one GPU's memory.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    kernels: Arc<Kernels>,
    config: ModelConfig,
    experts: ExpertMap<Expert>,
    hosted: Hosted,
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
        check(ordinal)?;
        let same_gpu = loaded.iter().find(|b| b.ctx.ordinal() == ordinal);
        let (ctx, kernels) = match same_gpu {
            Some(b) => (b.ctx.clone(), b.kernels.clone()),
            None => {
                let ctx = CudaContext::new(ordinal).map_err(|e| device_error(&format!("open device {ordinal}"), e))?;
                let kernels = Arc::new(Kernels::compile(&ctx)?);
                (ctx, kernels)
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
            Ok(Arc::new(on_gpu))
        })?;
        stream.synchronize().map_err(|e| device_error("upload the experts", e))?;
        Ok(CudaBackend { ctx, kernels, config, experts, hosted })
    }

    /// The batch's weighted contributions, computed on a stream of its own.
    fn contributions(&self, batch: &ExpertBatch) -> Result<Vec<f32>, DriverError> {
        let (hidden, inter) = (self.config.hidden_size, self.config.moe_intermediate_size);
        // Each expert's tokens, in the order the CPU backend gathers them.
        let mut by_expert: BTreeMap<ExpertId, Vec<(usize, usize, f32)>> = BTreeMap::new();
        let mut slots = 0;
        for (r, route) in batch.routes.iter().enumerate() {
            for &(e, weight) in route {
                by_expert.entry(e).or_default().push((r, slots, weight));
                slots += 1;
            }
        }
        let members: usize = by_expert.values().map(Vec::len).sum();
        if members == 0 {
            return Ok(Vec::new());
        }
        let mut x = Vec::with_capacity(members * hidden);
        let (mut slot, mut weight) = (Vec::with_capacity(members), Vec::with_capacity(members));
        for rows in by_expert.values() {
            for &(r, s, w) in rows {
                x.extend_from_slice(&batch.hidden[r * hidden..(r + 1) * hidden]);
                slot.push(s as i32);
                weight.push(w);
            }
        }
        let stream = self.ctx.new_stream()?;
        let x = stream.clone_htod(&x)?;
        let mut y = stream.alloc_zeros::<f32>(members * hidden)?;
        let mut offset = 0;
        for (e, rows) in &by_expert {
            let expert = &self.experts[&(batch.layer, *e)];
            let m = rows.len();
            let xe = x.slice(offset * hidden..(offset + m) * hidden);
            let mut gate = stream.alloc_zeros::<f32>(m * inter)?;
            let mut up = stream.alloc_zeros::<f32>(m * inter)?;
            expert.w1.launch(&self.kernels, &stream, &xe, m, inter, hidden, &mut gate.as_view_mut())?;
            expert.w3.launch(&self.kernels, &stream, &xe, m, inter, hidden, &mut up.as_view_mut())?;
            let len = (m * inter) as i64;
            let mut call = stream.launch_builder(&self.kernels.swiglu);
            call.arg(&mut gate).arg(&up).arg(&len).arg(&self.config.swiglu_limit);
            // SAFETY: `gate` and `up` hold `len` values; the grid covers them once.
            unsafe { call.launch(LaunchConfig::for_num_elems(len as u32)) }?;
            let mut ye = y.slice_mut(offset * hidden..(offset + m) * hidden);
            expert.w2.launch(&self.kernels, &stream, &gate.as_view(), m, hidden, inter, &mut ye)?;
            offset += m;
        }
        let (slot, weight) = (stream.clone_htod(&slot)?, stream.clone_htod(&weight)?);
        let mut out = stream.alloc_zeros::<f32>(slots * hidden)?;
        let (rows_i, width_i) = (members as i32, hidden as i32);
        let mut call = stream.launch_builder(&self.kernels.weigh);
        call.arg(&y).arg(&slot).arg(&weight).arg(&rows_i).arg(&width_i).arg(&mut out);
        // SAFETY: `y` holds `members` rows, `slot` and `weight` one entry
        // each, every slot is below `slots`, and `out` holds `slots` rows.
        unsafe { call.launch(LaunchConfig::for_num_elems((members * hidden) as u32)) }?;
        stream.clone_dtoh(&out)
    }
}

impl ExpertBackend for CudaBackend {
    fn hosted(&self) -> &Hosted {
        &self.hosted
    }

    fn bytes(&self) -> usize {
        self.experts.values().map(|e| e.w1.bytes() + e.w2.bytes() + e.w3.bytes()).sum()
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
        for name in ["matmul_f32", "matmul_bf16", "matmul_f16", "matmul_fp8", "matmul_fp4", "swiglu", "weigh"] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} is not in the PTX");
        }
        // No contraction: every fused multiply-add is one the source asks for.
        assert!(!ptx.contains("mad.f32"), "the PTX contracts a multiply and an add");
    }
}
