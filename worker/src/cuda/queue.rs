//! A queue: a stream and the pinned host and device buffers one batch in
//! flight uses. A batch takes an idle queue (or a new one), so batches that
//! arrive together run on streams of their own and one's copies overlap
//! another's kernels; a queue's buffers grow to the largest batch it has
//! carried and are reused, so a batch allocates nothing once warm.

use std::sync::Arc;

use cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg};
use myriad_model::ModelConfig;
use myriad_proto::expert::ExpertBatch;

use super::batch::{GROUP_BYTES, Kind, Plan};
use super::{Kernels, MAX_BLOCKS_Y, address, dims};

/// The expert shape the kernels run: hidden width, expert width, SwiGLU limit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub hidden: usize,
    pub inter: usize,
    pub limit: f32,
}

impl Shape {
    pub(super) fn of(config: &ModelConfig) -> Shape {
        Shape { hidden: config.hidden_size, inter: config.moe_intermediate_size, limit: config.swiglu_limit }
    }
}

/// A device buffer with its address.
struct Buffer<T> {
    slice: CudaSlice<T>,
    at: u64,
}

pub(super) struct Queue {
    stream: Arc<CudaStream>,
    /// Write-combined: the host only writes it, and the copy reads it fastest.
    upload: PinnedHostSlice<u8>,
    download: PinnedHostSlice<f32>,
    input: Buffer<u8>,
    act: Buffer<f32>,
    out: Buffer<f32>,
}

/// Room for `len`, rounded up so that a queue grows a few times, not on
/// every larger batch.
fn room(len: usize) -> usize {
    len.max(1 << 12).next_power_of_two()
}

fn buffer<T: cudarc::driver::DeviceRepr>(stream: &Arc<CudaStream>, len: usize) -> Result<Buffer<T>, DriverError> {
    // SAFETY: the kernels write every element they later read.
    let slice = unsafe { stream.alloc::<T>(len) }?;
    let at = address(&slice, stream);
    Ok(Buffer { slice, at })
}

impl Queue {
    pub(super) fn new(ctx: &Arc<CudaContext>) -> Result<Self, DriverError> {
        let stream = ctx.new_stream()?;
        let n = room(0);
        // SAFETY: a pinned buffer is written before it is read (the upload by
        // the host, the download by the copy).
        let (upload, download) = unsafe {
            (ctx.alloc_pinned_with_flags::<u8>(n, CU_MEMHOSTALLOC_WRITECOMBINED)?, ctx.alloc_pinned_with_flags(n, 0)?)
        };
        Ok(Queue {
            input: buffer(&stream, n)?,
            act: buffer(&stream, n)?,
            out: buffer(&stream, n)?,
            stream,
            upload,
            download,
        })
    }

    /// Grows each buffer that is smaller than `plan` needs.
    fn reserve(&mut self, plan: &Plan, shape: Shape) -> Result<(), DriverError> {
        let ctx = self.stream.context().clone();
        let (act, out) = (plan.members() * shape.inter, plan.slots * shape.hidden);
        if self.upload.len() < plan.bytes {
            // SAFETY: as in `new`.
            self.upload = unsafe { ctx.alloc_pinned_with_flags(room(plan.bytes), CU_MEMHOSTALLOC_WRITECOMBINED)? };
            self.input = buffer(&self.stream, room(plan.bytes))?;
        }
        if self.act.slice.len() < act {
            self.act = buffer(&self.stream, room(act))?;
        }
        if self.download.len() < out {
            // SAFETY: as in `new`.
            self.download = unsafe { ctx.alloc_pinned_with_flags(room(out), 0)? };
            self.out = buffer(&self.stream, room(out))?;
        }
        Ok(())
    }

    pub(super) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Runs `batch`, laid out as `plan`: one upload, the plan's launches and
    /// one download, then waits for them.
    pub(super) fn run(
        &mut self,
        kernels: &Kernels,
        shape: Shape,
        plan: &Plan,
        batch: &ExpertBatch,
    ) -> Result<Vec<f32>, DriverError> {
        self.stage(shape, plan, batch)?;
        self.launch(kernels, shape, plan)?;
        let len = plan.slots * shape.hidden;
        let download = &mut self.download.as_mut_slice()?[..len];
        // SAFETY: `download` is pinned and read only after the synchronize;
        // `out` holds at least `len` values.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(download, self.out.at, self.stream.cu_stream()) }?;
        self.stream.synchronize()?;
        Ok(download.to_vec())
    }

    /// Writes `batch`'s upload (laid out as `plan`) and queues its copy.
    pub(super) fn stage(&mut self, shape: Shape, plan: &Plan, batch: &ExpertBatch) -> Result<(), DriverError> {
        self.reserve(plan, shape)?;
        let upload = &mut self.upload.as_mut_slice()?[..plan.bytes];
        plan.write(upload, batch);
        self.stream.context().bind_to_thread()?;
        // SAFETY: `upload` is pinned and stays untouched until the stream is
        // synchronized (the next `stage` on this queue comes after `run`'s
        // synchronize); `input` holds at least `plan.bytes`.
        unsafe { cudarc::driver::result::memcpy_htod_async(self.input.at, upload, self.stream.cu_stream()) }
    }

    /// Queues the plan's launches on the staged upload.
    pub(super) fn launch(&self, kernels: &Kernels, shape: Shape, plan: &Plan) -> Result<(), DriverError> {
        let input = self.input.at;
        let at = |offset: usize| input + offset as u64;
        let (x, token, slot, weight) = (at(plan.x_at), at(plan.token_at), at(plan.slot_at), at(plan.weight_at));
        let [e4m3, e2m1, e8m0] = &kernels.tables;
        let (hidden, inter) = (shape.hidden as i32, shape.inter as i32);
        for launch in &plan.launches {
            let groups = input + (launch.first * GROUP_BYTES) as u64;
            let n = match launch.kind {
                Kind::GateUp => shape.inter,
                Kind::Down => shape.hidden,
            };
            let (grid_dim, block_dim) = dims(launch, n, MAX_BLOCKS_Y);
            let grid = LaunchConfig { grid_dim, block_dim, shared_mem_bytes: 0 };
            let mut call = self.stream.launch_builder(kernels.function(launch));
            match launch.kind {
                Kind::GateUp => {
                    call.arg(&groups).arg(&x).arg(&token).arg(&hidden).arg(&inter).arg(&shape.limit);
                    call.arg(e4m3).arg(e2m1).arg(e8m0).arg(&self.act.at)
                }
                Kind::Down => {
                    call.arg(&groups).arg(&self.act.at).arg(&inter).arg(&hidden).arg(&slot).arg(&weight);
                    call.arg(e4m3).arg(e2m1).arg(e8m0).arg(&self.out.at)
                }
            };
            // SAFETY: the arguments match the kernel's parameters in number,
            // order and type; the group table's entries name this launch's
            // experts and members, whose weights the backend holds and whose
            // inputs and outputs lie inside `input`, `act` and `out` (sized
            // by `reserve` for this plan).
            unsafe { call.launch(grid) }?;
        }
        Ok(())
    }
}
