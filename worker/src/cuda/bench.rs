//! How fast the expert matmul runs on a GPU, per stored format, next to
//! cuBLAS's BF16 GEMM on the same shapes: what `worker/examples/cuda_gemm.rs`
//! prints for `scripts/gpu_check.sh`. Weights are pseudo-random codes (no
//! NaN); only the time is measured.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaContext, CudaStream, sys::CUevent_flags};
use myriad_model::kernels::Weights;

use super::{Kernels, Matrix, device_error};
use crate::error::WorkerError;

/// A stored format the benchmark can fill with random codes.
#[derive(Debug, Clone, Copy)]
pub enum Format {
    F32,
    Bf16,
    Fp8,
    Fp4,
}

impl Format {
    /// Bytes a weight takes in memory, scales included.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Format::F32 => 4.0,
            Format::Bf16 => 2.0,
            Format::Fp8 => 1.0 + 4.0 / (128.0 * 128.0),
            Format::Fp4 => 0.5 + 1.0 / 32.0,
        }
    }
}

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

/// One GPU with the kernels compiled, for timing.
pub struct Bench {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
}

impl Bench {
    pub fn new(ordinal: usize) -> Result<Self, WorkerError> {
        super::check(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| device_error("open the device", e))?;
        let kernels = Kernels::compile(&ctx)?;
        let stream = ctx.new_stream().map_err(|e| device_error("create a stream", e))?;
        Ok(Bench { ctx, stream, kernels })
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

    /// Seconds per `[tokens, k] · [n, k]ᵀ` product through our kernel, the
    /// mean of `reps` after a warm-up.
    pub fn matmul(&self, format: Format, n: usize, k: usize, tokens: usize, reps: usize) -> Result<f64, WorkerError> {
        let codes = random_bytes(n * k * 2, 7);
        match format {
            Format::F32 => {
                let w: Vec<f32> =
                    codes.chunks_exact(2).map(|b| f32::from(b[0]) / 256.0 - f32::from(b[1]) / 256.0).collect();
                self.time_weights(Weights::F32(&w), n, k, tokens, reps)
            }
            Format::Bf16 => self.time_weights(Weights::Half { bytes: &codes, bf16: true }, n, k, tokens, reps),
            Format::Fp8 => {
                let scales = vec![1.0f32 / 256.0; n.div_ceil(128) * k.div_ceil(128)];
                let w = Weights::Fp8 { codes: &codes[..n * k], scales: &scales, first: 0 };
                self.time_weights(w, n, k, tokens, reps)
            }
            Format::Fp4 => {
                let scales = vec![120u8; n * k / 32];
                self.time_weights(Weights::Fp4 { packed: &codes[..n * k / 2], scales: &scales }, n, k, tokens, reps)
            }
        }
    }

    fn time_weights(&self, w: Weights<'_>, n: usize, k: usize, tokens: usize, reps: usize) -> Result<f64, WorkerError> {
        let cuda = |e| device_error("time a matmul", e);
        let matrix = Matrix::upload(&self.stream, w).map_err(cuda)?;
        let x = self.stream.clone_htod(&vec![0.5f32; tokens * k]).map_err(cuda)?;
        let mut y = self.stream.alloc_zeros::<f32>(tokens * n).map_err(cuda)?;
        self.time(reps, || {
            matrix.launch(&self.kernels, &self.stream, &x.as_view(), tokens, n, k, &mut y.as_view_mut()).map_err(cuda)
        })
    }

    /// Seconds per the same product through cuBLAS in BF16 (BF16 inputs
    /// and output, f32 accumulation), the mean of `reps` after a warm-up.
    pub fn cublas_bf16(&self, n: usize, k: usize, tokens: usize, reps: usize) -> Result<f64, WorkerError> {
        let cuda = |e| device_error("time cuBLAS", e);
        let blas = CudaBlas::new(self.stream.clone()).map_err(|e| device_error("start cuBLAS", e))?;
        let w = self.stream.clone_htod(&vec![half::bf16::from_f32(0.01); n * k]).map_err(cuda)?;
        let x = self.stream.clone_htod(&vec![half::bf16::from_f32(0.5); tokens * k]).map_err(cuda)?;
        let mut y = self.stream.alloc_zeros::<half::bf16>(tokens * n).map_err(cuda)?;
        // Column-major: y (n × tokens) = wᵀ (w stored k × n) · x (k × tokens).
        let config = GemmConfig {
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
        };
        self.time(reps, || {
            // SAFETY: `w`, `x` and `y` hold the extents the config names.
            unsafe { blas.gemm(config, &w, &x, &mut y) }.map_err(|e| device_error("cuBLAS GEMM", e))
        })
    }

    /// Mean seconds of `reps` calls of `once` after one warm-up call, by
    /// events on the stream.
    fn time(&self, reps: usize, mut once: impl FnMut() -> Result<(), WorkerError>) -> Result<f64, WorkerError> {
        let cuda = |e| device_error("time on the stream", e);
        once()?;
        let start = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda)?;
        let end = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda)?;
        start.record(&self.stream).map_err(cuda)?;
        for _ in 0..reps {
            once()?;
        }
        end.record(&self.stream).map_err(cuda)?;
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
