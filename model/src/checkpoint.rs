//! A Hugging Face model folder on disk: `config.json` plus `model.safetensors`
//! or shards listed in `model.safetensors.index.json`, memory-mapped.
//!
//! Tensors are found by their *canonical* name (DeepSeek's own naming without
//! the `model.` prefix, e.g. `layers.0.attn.wq_a.weight`); [`canonical_name`]
//! maps the `transformers` naming onto it, so both kinds of checkpoint load.
//! All dtype handling lives in [`Checkpoint::f32_rows`] (tensors used as
//! f32) and [`Checkpoint::linear`] (projections, kept as stored).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
use crate::quant;
use crate::stored::{Stored, StoredMatrix};
use crate::tensor::{MappedBytes, Tensor, widen_half};

/// Where one tensor lives: which mapped shard, which bytes.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the shard's mapping.
    start: usize,
    end: usize,
}

/// One memory-mapped shard file.
struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Canonical name -> entry.
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Maps every shard of the folder and indexes its tensors. Headers are
    /// validated here (sizes, offsets, dtypes), so later reads cannot go
    /// out of bounds.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (shard, path) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::io(format!("open {}", path.display()), e))?;
            // SAFETY: the mapping is read-only; a checkpoint rewritten under a
            // running process is outside what any loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(format!("map {}", path.display()), e))?;
            let bad = |message: String| ModelError::Checkpoint { path: path.clone(), message };
            let parsed =
                SafeTensors::deserialize(&map).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
            let base = map.as_ptr() as usize;
            for (name, view) in parsed.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                let entry =
                    Entry { shard, dtype: view.dtype(), shape: view.shape().to_vec(), start, end: start + data.len() };
                let canonical = canonical_name(&name);
                if entries.insert(canonical.clone(), entry).is_some() {
                    return Err(bad(format!("tensor `{canonical}` appears twice")));
                }
            }
            shards.push(Shard { path, map: Arc::new(map) });
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor's canonical name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| ModelError::tensor(name, format!("missing from the checkpoint in {}", self.dir.display())))
    }

    /// The tensor `name` as f32 with exactly `shape`.
    pub fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.f32_rows(name, shape, 0..shape.first().copied().unwrap_or(1))
    }

    /// Rows `rows` of the leading dimension of `name` (whose full shape must
    /// be `shape`) as f32, touching only their bytes: a worker reads its own
    /// experts out of a packed `[experts, ...]` tensor this way.
    ///
    /// This is the one place that knows dtypes: aligned F32 is used where it
    /// lies in the mapping; BF16 and F16 are converted here, once.
    pub fn f32_rows(&self, name: &str, shape: &[usize], rows: std::ops::Range<usize>) -> Result<Tensor> {
        let entry = self.entry(name)?;
        check_shape(name, entry, shape)?;
        let shard = &self.shards[entry.shard];
        let width = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(ModelError::tensor(
                    name,
                    format!(
                        "dtype {other:?} is not supported for weights (F32, BF16, F16) in {}",
                        shard.path.display()
                    ),
                ));
            }
        };
        let inner: usize = shape.iter().skip(1).product();
        let start = entry.start + rows.start * inner * width;
        let bytes = &shard.map[start..entry.start + rows.end * inner * width];
        let mut out_shape = shape.to_vec();
        if let Some(first) = out_shape.first_mut() {
            *first = rows.len();
        }
        Ok(match entry.dtype {
            Dtype::F32 => Tensor::from_mapped(shard.map.clone(), start, out_shape.clone()).unwrap_or_else(|| {
                Tensor::owned(
                    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                    out_shape,
                )
            }),
            dtype => Tensor::owned(widen_half(bytes, dtype == Dtype::BF16).collect(), out_shape),
        })
    }

    /// The projection weight `name` (`[out, inp]`) as stored: F32 (in place
    /// when aligned), BF16/F16 and block-FP8 (`F8_E4M3`) or MXFP4
    /// (`I8`/`U8` `[out, inp/2]`) kept as their mapped bytes, the quantized
    /// ones with their decoded `….scale` sibling (see [`crate::quant`]).
    pub fn linear(&self, name: &str, out: usize, inp: usize) -> Result<StoredMatrix> {
        let entry = self.entry(name)?;
        let mapped = |e: &Entry| {
            MappedBytes::new(self.shards[e.shard].map.clone(), e.start, e.end - e.start)
                .ok_or_else(|| ModelError::tensor(name, "lies outside its shard".to_string()))
        };
        let stored = match entry.dtype {
            Dtype::BF16 | Dtype::F16 => {
                check_shape(name, entry, &[out, inp])?;
                Stored::Half { bytes: mapped(entry)?, bf16: entry.dtype == Dtype::BF16 }
            }
            Dtype::F8_E4M3 | Dtype::I8 | Dtype::U8 => {
                let fp4 = entry.dtype != Dtype::F8_E4M3;
                let (scale_entry, decoded) = self.scales(name, entry, fp4, out, inp)?;
                let codes = mapped(entry)?;
                match decoded {
                    None => {
                        let packed = quant::fp4_kernel_order(codes.as_slice());
                        codes.release();
                        Stored::Fp4 { packed, scales: mapped(scale_entry)? }
                    }
                    Some(scales) => {
                        let nan = |c: &u8| c & 0x7F == 0x7F;
                        if codes.as_slice().chunks(4096).any(|chunk| chunk.iter().fold(false, |any, c| any | nan(c))) {
                            let k = codes.as_slice().iter().position(nan).unwrap_or_default();
                            return Err(ModelError::tensor(name, format!("code {k} is NaN")));
                        }
                        if scales.iter().all(|s| s.abs() < quant::FP8_KERNEL_SCALE_LIMIT) {
                            Stored::Fp8 { codes, scales }
                        } else {
                            tracing::warn!(tensor = name, "block-FP8 scales of 2^8 and up: kept as f32 weights");
                            let mut weights = Vec::with_capacity(out * inp);
                            quant::expand_fp8(codes.as_slice(), &scales, inp, 0, &mut weights);
                            codes.release();
                            Stored::F32(Tensor::owned(weights, vec![out, inp]))
                        }
                    }
                }
            }
            _ => Stored::F32(self.f32_tensor(name, &[out, inp])?),
        };
        Ok(StoredMatrix { stored, out, inp })
    }

    /// The `….scale` sibling of quantized `name`, after checking both
    /// shapes, the scale dtype and that no scale is NaN; for block-FP8 also
    /// its scales decoded (MXFP4 keeps its E8M0 bytes as stored).
    fn scales(
        &self,
        name: &str,
        entry: &Entry,
        fp4: bool,
        out: usize,
        inp: usize,
    ) -> Result<(&Entry, Option<Vec<f32>>)> {
        let bad = |message: String| ModelError::tensor(name, message);
        let scale_name = format!("{}.scale", name.strip_suffix(".weight").unwrap_or(name));
        let scale = self
            .entries
            .get(&scale_name)
            .ok_or_else(|| bad(format!("is quantized ({:?}) but its scale `{scale_name}` is missing", entry.dtype)))?;
        let (codes_shape, scale_shape) = if fp4 {
            if !inp.is_multiple_of(quant::FP4_GROUP) {
                return Err(bad(format!("is MXFP4 with {inp} inputs, not a multiple of {}", quant::FP4_GROUP)));
            }
            ([out, inp / 2], [out, inp / quant::FP4_GROUP])
        } else {
            ([out, inp], [out.div_ceil(quant::FP8_BLOCK), inp.div_ceil(quant::FP8_BLOCK)])
        };
        check_shape(name, entry, &codes_shape)?;
        check_shape(&scale_name, scale, &scale_shape)?;
        let raw = &self.shards[scale.shard].map[scale.start..scale.end];
        let decoded: Vec<f32> = match scale.dtype {
            Dtype::F8_E8M0 => {
                if let Some(k) = raw.iter().position(|&e| quant::e8m0(e).is_none()) {
                    return Err(bad(format!("scale {k} of `{scale_name}` is NaN (255)")));
                }
                if fp4 {
                    return Ok((scale, None));
                }
                raw.iter().filter_map(|&e| quant::e8m0(e)).collect()
            }
            Dtype::F32 if !fp4 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            other => {
                let allowed = if fp4 { "F8_E8M0" } else { "F8_E8M0 or F32" };
                return Err(bad(format!("scale `{scale_name}` has dtype {other:?}, not {allowed}")));
            }
        };
        if let Some(k) = decoded.iter().position(|s| !s.is_finite()) {
            return Err(bad(format!("scale {k} of `{scale_name}` is not finite")));
        }
        if let Some(k) = decoded.iter().position(|s| s.abs() >= quant::FP8_SCALE_LIMIT) {
            return Err(bad(format!(
                "scale {k} of `{scale_name}` is {}: block-FP8 scales must be below 2^120",
                decoded[k]
            )));
        }
        Ok((scale, Some(decoded)))
    }

    /// An integer table (`tid2eid`) as `i64`, from I64 or I32 storage.
    pub fn int_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
        let entry = self.entry(name)?;
        check_shape(name, entry, shape)?;
        let bytes = &self.shards[entry.shard].map[entry.start..entry.end];
        match entry.dtype {
            Dtype::I64 => {
                Ok(bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect())
            }
            Dtype::I32 => {
                Ok(bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect())
            }
            other => Err(ModelError::tensor(name, format!("dtype {other:?} is not an integer table (I64 or I32)"))),
        }
    }
}

impl Checkpoint {
    /// A cheap identity of the model: FNV-1a-64 over `config` (the bytes of
    /// `config.json`), every shard's safetensors header, and 16 evenly spaced
    /// 64 KiB samples of each shard's data. Two folders with the same
    /// fingerprint serve the same model for all practical purposes; it guards
    /// against mistakes (a worker started on another checkpoint), not
    /// against an adversary.
    pub fn fingerprint(&self, config: &[u8]) -> String {
        const SAMPLE: usize = 64 << 10;
        let mut h = Fnv::new();
        h.write(config);
        for shard in &self.shards {
            let map = &shard.map[..];
            let header_end =
                map.get(..8).map_or(0, |b| 8 + u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize);
            h.write(&map[..header_end.min(map.len())]);
            let data = &map[header_end.min(map.len())..];
            for i in 0..16 {
                let start = (data.len().saturating_sub(SAMPLE)) * i / 15;
                h.write(&data[start..(start + SAMPLE).min(data.len())]);
            }
        }
        format!("{:016x}", h.0)
    }
}

/// FNV-1a, 64 bit.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn check_shape(name: &str, entry: &Entry, shape: &[usize]) -> Result<()> {
    if entry.shape != shape {
        return Err(ModelError::tensor(name, format!("has shape {:?}, the config implies {:?}", entry.shape, shape)));
    }
    Ok(())
}

/// The shard files of a model folder, from its index or the single file.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| ModelError::io(format!("read {}", index.display()), e))?;
        let bad = |message: String| ModelError::Checkpoint { path: index.clone(), message };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map =
            value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut files: Vec<String> = Vec::new();
        for file in map.values() {
            let file = file.as_str().ok_or_else(|| bad("`weight_map` values must be file names".into()))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad(format!("shard `{file}` is not a plain file name")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::Checkpoint {
        path: dir.to_path_buf(),
        message: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

/// Maps a tensor name of either convention to DeepSeek's naming without the
/// `model.` prefix. Packed `transformers` experts (`mlp.experts.gate_up_proj`)
/// keep their packed name under `ffn.experts.`; the weight builder splits them.
pub fn canonical_name(name: &str) -> String {
    let name = name.strip_prefix("model.").unwrap_or(name);
    match name {
        "embed_tokens.weight" => return "embed.weight".into(),
        "lm_head.weight" => return "head.weight".into(),
        "hc_head.hc_fn" | "hc_head_fn" => return "hc_head.fn".into(),
        "hc_head.hc_base" | "hc_head_base" => return "hc_head.base".into(),
        "hc_head.hc_scale" | "hc_head_scale" => return "hc_head.scale".into(),
        _ => {}
    }
    // Order matters: longer, more specific patterns first.
    const RENAMES: &[(&str, &str)] = &[
        (".self_attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
        (".self_attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
        (".self_attn.compressor.indexer.", ".attn.indexer.compressor."),
        (".self_attn.", ".attn."),
        (".mlp.shared_experts.gate_proj.", ".ffn.shared_experts.w1."),
        (".mlp.shared_experts.down_proj.", ".ffn.shared_experts.w2."),
        (".mlp.shared_experts.up_proj.", ".ffn.shared_experts.w3."),
        (".mlp.gate.e_score_correction_bias", ".ffn.gate.bias"),
        (".mlp.", ".ffn."),
        (".input_layernorm.", ".attn_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
        (".attn_hc.fn", ".hc_attn_fn"),
        (".attn_hc.base", ".hc_attn_base"),
        (".attn_hc.scale", ".hc_attn_scale"),
        (".ffn_hc.fn", ".hc_ffn_fn"),
        (".ffn_hc.base", ".hc_ffn_base"),
        (".ffn_hc.scale", ".hc_ffn_scale"),
        (".attn.sinks", ".attn.attn_sink"),
        (".kv_norm.", ".norm."),
        (".position_bias", ".ape"),
        (".q_a_proj.", ".wq_a."),
        (".q_b_proj.", ".wq_b."),
        (".kv_proj.", ".wkv."),
        (".gate_proj.", ".wgate."),
        (".o_a_proj.", ".wo_a."),
        (".o_b_proj.", ".wo_b."),
        (".q_a_norm.", ".q_norm."),
    ];
    let mut out = format!(".{name}");
    for (from, to) in RENAMES {
        if out.contains(from) {
            out = out.replace(from, to);
        }
    }
    out.split_off(1)
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn both_namings_meet() {
        let pairs = [
            ("model.layers.3.self_attn.q_a_proj.weight", "layers.3.attn.wq_a.weight"),
            ("model.layers.3.attn.wq_a.weight", "layers.3.attn.wq_a.weight"),
            ("layers.3.attn.wq_a.weight", "layers.3.attn.wq_a.weight"),
            ("model.layers.1.self_attn.compressor.indexer.q_b_proj.weight", "layers.1.attn.indexer.wq_b.weight"),
            (
                "model.layers.1.self_attn.compressor.indexer.kv_proj.weight",
                "layers.1.attn.indexer.compressor.wkv.weight",
            ),
            ("model.layers.1.self_attn.compressor.indexer.position_bias", "layers.1.attn.indexer.compressor.ape"),
            (
                "model.layers.1.self_attn.compressor.indexer.kv_norm.weight",
                "layers.1.attn.indexer.compressor.norm.weight",
            ),
            (
                "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
                "layers.1.attn.indexer.weights_proj.weight",
            ),
            ("model.layers.1.self_attn.compressor.gate_proj.weight", "layers.1.attn.compressor.wgate.weight"),
            ("model.layers.1.self_attn.kv_norm.weight", "layers.1.attn.norm.weight"),
            ("model.layers.1.self_attn.q_a_norm.weight", "layers.1.attn.q_norm.weight"),
            ("model.layers.1.self_attn.sinks", "layers.1.attn.attn_sink"),
            ("model.layers.1.mlp.gate.e_score_correction_bias", "layers.1.ffn.gate.bias"),
            ("model.layers.1.mlp.gate.tid2eid", "layers.1.ffn.gate.tid2eid"),
            ("model.layers.1.mlp.experts.gate_up_proj", "layers.1.ffn.experts.gate_up_proj"),
            ("model.layers.1.mlp.shared_experts.up_proj.weight", "layers.1.ffn.shared_experts.w3.weight"),
            ("model.layers.1.attn_hc.fn", "layers.1.hc_attn_fn"),
            ("model.layers.1.post_attention_layernorm.weight", "layers.1.ffn_norm.weight"),
            ("model.embed_tokens.weight", "embed.weight"),
            ("lm_head.weight", "head.weight"),
            ("hc_head_fn", "hc_head.fn"),
            ("model.hc_head.hc_scale", "hc_head.scale"),
            ("model.norm.weight", "norm.weight"),
        ];
        for (from, to) in pairs {
            assert_eq!(canonical_name(from), to, "{from}");
        }
    }
}
