//! A batch laid out for the grouped kernels of `experts.cu`, on the host:
//! which expert's tokens are which rows, the group tables, and the one
//! buffer a batch uploads. Nothing here touches CUDA, so the emulation test
//! lays batches out with this same code.

use std::collections::BTreeMap;

use myriad_model::kernels::Weights;
use myriad_model::quant;
use myriad_proto::expert::{ExpertBatch, ExpertId};

/// A stored weight format, as the kernels' names spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    F32,
    Bf16,
    F16,
    Fp8,
    Fp4,
}

impl Format {
    pub const ALL: [Format; 5] = [Format::F32, Format::Bf16, Format::F16, Format::Fp8, Format::Fp4];

    /// The suffix of its kernels' names (`gate_up_fp4`, `down_fp4`).
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::Bf16 => "bf16",
            Format::F16 => "f16",
            Format::Fp8 => "fp8",
            Format::Fp4 => "fp4",
        }
    }

    /// Bytes a weight takes in memory, scales included.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Format::F32 => 4.0,
            Format::Bf16 | Format::F16 => 2.0,
            Format::Fp8 => 1.0 + 4.0 / (128.0 * 128.0),
            Format::Fp4 => 0.5 + 1.0 / 32.0,
        }
    }
}

/// A stored matrix as the kernels read it: its format, its weights' bytes
/// and its scales' bytes (none for F32, BF16 and F16), borrowed as stored:
/// f32 values in this host's byte order, the GPU's (every CUDA host is
/// little-endian).
pub fn stored(w: Weights<'_>) -> (Format, &[u8], Option<&[u8]>) {
    match w {
        Weights::F32(v) => (Format::F32, bytemuck::cast_slice(v), None),
        Weights::Half { bytes, bf16 } => (if bf16 { Format::Bf16 } else { Format::F16 }, bytes, None),
        Weights::Fp8 { codes, scales, .. } => (Format::Fp8, codes, Some(bytemuck::cast_slice(scales))),
        Weights::Fp4 { packed, scales } => (Format::Fp4, packed, Some(scales)),
    }
}

/// The value tables the kernels read, in their arguments' order: every
/// E4M3, E2M1 and E8M0 code's value as `myriad_model::quant` decodes it
/// (NaN for E8M0's NaN code).
pub fn tables() -> [Vec<f32>; 3] {
    [
        (0..=255u8).map(quant::e4m3).collect(),
        (0..16u8).map(quant::e2m1).collect(),
        (0..=255u8).map(|c| quant::e8m0(c).unwrap_or(f32::NAN)).collect(),
    ]
}

/// Where a weight matrix is: its format, and the addresses of its weights
/// and of its scales (0 for a format without).
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub format: Format,
    pub weights: u64,
    pub scales: u64,
}

/// An expert's three projections, as the kernels find them (`w1` and
/// `w3` in one format: one kernel reads both).
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub w1: At,
    pub w2: At,
    pub w3: At,
}

impl Place {
    /// The matrices a kernel of `kind` reads: gate and up, or down (twice).
    fn matrix(&self, kind: Kind) -> (At, At) {
        match kind {
            Kind::GateUp => (self.w1, self.w3),
            Kind::Down => (self.w2, self.w2),
        }
    }
}

/// The kernel a launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    GateUp,
    Down,
}

/// One grouped launch: `count` table entries from entry `first`, all of one
/// format; its grid is `(ceil(n / rows of a block), ceil(rows / TOKENS),
/// count)`, at most 65535 along y.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub kind: Kind,
    pub format: Format,
    pub first: usize,
    pub count: usize,
    /// The most tokens one of its experts has.
    pub rows: usize,
}

/// Bytes of one group table entry (`struct Group` in `experts.cu`).
pub const GROUP_BYTES: usize = 6 * 8;
/// Every section of the upload starts at a multiple of this.
const ALIGN: usize = 256;

/// A batch's layout: its members (one per `(token, expert)` pair) ordered
/// by expert as the CPU backend gathers them, the launches, and where each
/// part of the upload lies. The upload holds, in order: the group tables
/// (`struct Group`), the batch's hidden states `[tokens, hidden]` (f32, as
/// the batch carries them: a token routed to several experts goes up once),
/// and per member its token, its contribution slot (both i32) and its route
/// weight (f32).
#[derive(Debug)]
pub struct Plan {
    /// `(token, slot, weight)` of each member, by expert.
    members: Vec<(usize, usize, f32)>,
    /// Each expert's tokens: `(first member, members)`, and its weights.
    groups: Vec<(usize, usize, Place)>,
    pub launches: Vec<Launch>,
    /// Contribution rows the batch returns: one per `(token, expert)` pair.
    pub slots: usize,
    pub x_at: usize,
    pub token_at: usize,
    pub slot_at: usize,
    pub weight_at: usize,
    /// Bytes of the upload.
    pub bytes: usize,
}

impl Plan {
    /// Lays out `batch`, whose experts' weights `place` finds.
    pub fn new(batch: &ExpertBatch, place: impl Fn(ExpertId) -> Place) -> Plan {
        let mut by_expert: BTreeMap<ExpertId, Vec<(usize, usize, f32)>> = BTreeMap::new();
        let mut slots = 0;
        for (token, route) in batch.routes.iter().enumerate() {
            for &(e, weight) in route {
                by_expert.entry(e).or_default().push((token, slots, weight));
                slots += 1;
            }
        }
        let mut members = Vec::with_capacity(slots);
        let mut groups = Vec::with_capacity(by_expert.len());
        for (e, rows) in by_expert {
            groups.push((members.len(), rows.len(), place(e)));
            members.extend(rows);
        }
        // Entries by format so that each launch takes a run of them: the
        // gate/up entries first, then the down ones.
        let mut launches = Vec::new();
        let mut entries = 0;
        for kind in [Kind::GateUp, Kind::Down] {
            for format in Format::ALL {
                let of_format = groups.iter().filter(|g| g.2.matrix(kind).0.format == format);
                let (count, rows) = of_format.fold((0, 0), |(n, most), g| (n + 1, most.max(g.1)));
                if count > 0 {
                    launches.push(Launch { kind, format, first: entries, count, rows });
                    entries += count;
                }
            }
        }
        let align = |n: usize| n.div_ceil(ALIGN) * ALIGN;
        let x_at = align(entries * GROUP_BYTES);
        let token_at = align(x_at + batch.hidden.len() * 4);
        let slot_at = align(token_at + members.len() * 4);
        let weight_at = align(slot_at + members.len() * 4);
        let bytes = weight_at + members.len() * 4;
        Plan { members, groups, launches, slots, x_at, token_at, slot_at, weight_at, bytes }
    }

    /// `(token, expert)` pairs the batch carries.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Writes the upload of `batch` (the batch it was laid out for) into
    /// `out`, `self.bytes` long.
    pub fn write(&self, out: &mut [u8], batch: &ExpertBatch) {
        assert_eq!(out.len(), self.bytes, "the upload buffer must be the plan's size");
        let mut entry = 0;
        for launch in &self.launches {
            for (first, rows, place) in &self.groups {
                let (a, b) = place.matrix(launch.kind);
                if a.format != launch.format {
                    continue;
                }
                let fields = [*first as u64, *rows as u64, a.weights, a.scales, b.weights, b.scales];
                let at = entry * GROUP_BYTES;
                for (i, v) in fields.into_iter().enumerate() {
                    out[at + 8 * i..at + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
                }
                entry += 1;
            }
        }
        out[self.x_at..self.x_at + batch.hidden.len() * 4].copy_from_slice(bytemuck::cast_slice(&batch.hidden));
        // Section by section: the upload is write-combined memory.
        let members = &self.members;
        write_words(out, self.token_at, members.iter().map(|m| (m.0 as i32).to_le_bytes()));
        write_words(out, self.slot_at, members.iter().map(|m| (m.1 as i32).to_le_bytes()));
        write_words(out, self.weight_at, members.iter().map(|m| m.2.to_le_bytes()));
    }
}

/// `words` into `out` one after another, from `at`.
fn write_words(out: &mut [u8], at: usize, words: impl Iterator<Item = [u8; 4]>) {
    for (i, word) in words.enumerate() {
        out[at + 4 * i..at + 4 * i + 4].copy_from_slice(&word);
    }
}
