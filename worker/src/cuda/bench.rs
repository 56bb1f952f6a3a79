//! How fast the grouped expert FFN runs on a GPU, per stored format, next
//! to cuBLAS's BF16 GEMMs on the same shapes: what
//! `worker/examples/cuda_gemm.rs` prints for `scripts/gpu_check.sh`. Weights
//! are pseudo-random codes (no NaN); only the time is measured, of the
//! kernels alone (the batch's inputs are already on the GPU).

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaContext, CudaStream, sys::CUevent_flags};
use myriad_model::kernels::Weights;
use myriad_proto::expert::{ExpertBatch, ExpertId, LayerId};

use super::batch::{Format, Plan};
use super::queue::{Queue, Shape};
use super::{Expert, Kernels, Matrix, device_error};
use crate::error::WorkerError;

/// What the GPU can do at most, from its attributes: FP32 lanes and dense
/// BF16 tensor-core work per SM per clock as on Hopper (128 and 1024
/// fused multiply-adds), at its highest clock.
pub struct Peaks {
    pub name: String,
    pub sms: i32,
    pub clock_ghz: f64,
    pub fp32_tflops: f64,
    pub bf16_tflops: f64,
    pub memory_tbs: f64,
}

/// One GPU with the kernels compiled, for timing expert FFNs of one shape.
pub struct Bench {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    shape: Shape,
}

impl Bench {
    /// Experts `hidden` wide with `inter`-wide FFNs, on GPU `ordinal`.
    pub fn new(ordinal: usize, hidden: usize, inter: usize) -> Result<Self, WorkerError> {
        let (ctx, kernels) = super::open(ordinal)?;
        Ok(Bench { ctx, kernels, shape: Shape { hidden, inter, limit: 7.0 } })
    }

    pub fn peaks(&self) -> Result<Peaks, WorkerError> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let attribute = |a| self.ctx.attribute(a).map_err(|e| device_error("read a device attribute", e));
        let sms = attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let clock_ghz = f64::from(attribute(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?) / 1e6;
        let memory_khz = f64::from(attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?);
        let bus_bits = f64::from(attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?);
        let per_clock = f64::from(sms) * clock_ghz * 1e9 * 2.0 / 1e12;
        Ok(Peaks {
            name: self.ctx.name().map_err(|e| device_error("read the device name", e))?,
            sms,
            clock_ghz,
            fp32_tflops: per_clock * 128.0,
            bf16_tflops: per_clock * 1024.0,
            memory_tbs: 2.0 * memory_khz * 1e3 * bus_bits / 8.0 / 1e12,
        })
    }

    /// Seconds per grouped FFN (the gate/up and the down launches) of
    /// `experts` experts in `format` with `tokens` tokens each, the mean of
    /// `reps` after a warm-up.
    pub fn experts(&self, format: Format, experts: usize, tokens: usize, reps: usize) -> Result<f64, WorkerError> {
        let cuda = |e| device_error("time the expert FFN", e);
        let (h, i) = (self.shape.hidden, self.shape.inter);
        let mut queue = Queue::new(&self.ctx).map_err(cuda)?;
        let stream = queue.stream().clone();
        let matrix = |n: usize, k: usize, seed: u64| -> Result<Matrix, WorkerError> {
            let codes = random_bytes(n * k * 2, seed);
            let upload = |w: Weights<'_>| Matrix::upload(&stream, w).map_err(cuda);
            match format {
                Format::F32 => {
                    let w: Vec<f32> =
                        codes.chunks_exact(2).map(|b| f32::from(b[0]) / 256.0 - f32::from(b[1]) / 256.0).collect();
                    upload(Weights::F32(&w))
                }
                Format::Bf16 | Format::F16 => upload(Weights::Half { bytes: &codes, bf16: format == Format::Bf16 }),
                Format::Fp8 => {
                    let scales = vec![1.0f32 / 256.0; n.div_ceil(128) * k.div_ceil(128)];
                    upload(Weights::Fp8 { codes: &codes[..n * k], scales: &scales, first: 0 })
                }
                Format::Fp4 => upload(Weights::Fp4 { packed: &codes[..n * k / 2], scales: &vec![120u8; n * k / 32] }),
            }
        };
        let all: Vec<Expert> = (0..experts as u64)
            .map(|e| {
                Ok(Expert { w1: matrix(i, h, 3 * e)?, w2: matrix(h, i, 3 * e + 1)?, w3: matrix(i, h, 3 * e + 2)? })
            })
            .collect::<Result<_, WorkerError>>()?;
        // Token t goes to expert t / tokens alone, with weight 1.
        let batch = ExpertBatch {
            layer: LayerId(0),
            width: h,
            hidden: vec![0.5; experts * tokens * h],
            routes: (0..experts * tokens).map(|t| vec![(ExpertId((t / tokens) as u32), 1.0)]).collect(),
        };
        let plan = Plan::new(&batch, |e| all[e.0 as usize].place());
        queue.stage(self.shape, &plan, &batch).map_err(cuda)?;
        self.time(&stream, reps, || queue.launch(&self.kernels, self.shape, &plan).map_err(cuda))
    }

    /// Seconds per the same three GEMMs per expert through cuBLAS in BF16
    /// (BF16 inputs and outputs, f32 accumulation; gate and up as one
    /// GEMM), batched over the experts, the mean of `reps` after a warm-up.
    pub fn cublas_bf16(&self, experts: usize, tokens: usize, reps: usize) -> Result<f64, WorkerError> {
        let cuda = |e| device_error("time cuBLAS", e);
        let stream = self.ctx.new_stream().map_err(cuda)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| device_error("start cuBLAS", e))?;
        let (h, i) = (self.shape.hidden, self.shape.inter);
        let bf16 = |v: f32, len: usize| stream.clone_htod(&vec![half::bf16::from_f32(v); len]).map_err(cuda);
        let (w13, w2) = (bf16(0.01, experts * 2 * i * h)?, bf16(0.01, experts * h * i)?);
        let x = bf16(0.5, experts * tokens * h)?;
        let (mut act, mut y) = (bf16(0.0, experts * tokens * 2 * i)?, bf16(0.0, experts * tokens * h)?);
        // Column-major, per expert: y (n × tokens) = wᵀ (w stored k × n) · x (k × tokens).
        let gemm = |n: usize, k: usize| StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: n as i32,
                n: tokens as i32,
                k: k as i32,
                alpha: half::bf16::ONE,
                lda: k as i32,
                ldb: k as i32,
                beta: half::bf16::ZERO,
                ldc: n as i32,
            },
            batch_size: experts as i32,
            stride_a: (n * k) as i64,
            stride_b: (tokens * k) as i64,
            stride_c: (tokens * n) as i64,
        };
        self.time(&stream, reps, || {
            let failed = |e| device_error("cuBLAS GEMM", e);
            // SAFETY: every buffer holds `experts` times the extent its
            // config names (the down GEMM reads the first `i` of each
            // token's `2 i` gate/up values: the same work as its product).
            unsafe {
                blas.gemm_strided_batched(gemm(2 * i, h), &w13, &x, &mut act).map_err(failed)?;
                let mut down = gemm(h, i);
                down.gemm.ldb = (2 * i) as i32;
                down.stride_b = (tokens * 2 * i) as i64;
                blas.gemm_strided_batched(down, &w2, &act, &mut y).map_err(failed)
            }
        })
    }

    /// Mean seconds of `reps` calls of `once` after one warm-up call, by
    /// events on the stream.
    fn time(
        &self,
        stream: &Arc<CudaStream>,
        reps: usize,
        mut once: impl FnMut() -> Result<(), WorkerError>,
    ) -> Result<f64, WorkerError> {
        let cuda = |e| device_error("time on the stream", e);
        once()?;
        let start = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda)?;
        let end = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda)?;
        start.record(stream).map_err(cuda)?;
        for _ in 0..reps {
            once()?;
        }
        end.record(stream).map_err(cuda)?;
        end.synchronize().map_err(cuda)?;
        Ok(f64::from(start.elapsed_ms(&end).map_err(cuda)?) / 1e3 / reps as f64)
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // No E4M3 NaN (0x7F, 0xFF), no BF16 exponent of all ones.
            (state >> 24) as u8 & 0x7E
        })
        .collect()
}
