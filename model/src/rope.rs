//! Rotary position embedding as DeepSeek-V4 uses it: *interleaved* pairs
//! `(2i, 2i+1)` rotated by `θ_i`, on the trailing `dim` channels of a head.
//! Two parameter sets: `main` (sliding-only layers) and `compress` (CSA/HCA
//! layers, their compressors and the lightning indexer; YaRN where configured).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    /// Rotated channels at the end of each head (`qk_rope_head_dim`).
    pub dim: usize,
    /// One inverse frequency per rotated pair, `dim / 2` of them.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub scaling: f32,
}

impl RopeParams {
    /// `(cos, sin)` per pair at `position`, computed in f32 like the reference
    /// (`position * inv_freq`, then cos/sin, then the scaling).
    pub fn cos_sin(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = position as f32 * f;
            cos[i] = angle.cos() * self.scaling;
            sin[i] = angle.sin() * self.scaling;
        }
    }

    /// Rotates the trailing `self.dim` channels of every `head_dim`-wide row of
    /// `x` to `position`; `inverse` rotates by `-position` (the output fix-up).
    pub fn apply(&self, x: &mut [f32], head_dim: usize, position: usize, inverse: bool) {
        let half = self.dim / 2;
        let mut cos = vec![0.0; half];
        let mut sin = vec![0.0; half];
        self.cos_sin(position, &mut cos, &mut sin);
        if inverse {
            sin.iter_mut().for_each(|s| *s = -*s);
        }
        for head in x.chunks_exact_mut(head_dim) {
            let rope = &mut head[head_dim - self.dim..];
            for i in 0..half {
                let (a, b) = (rope[2 * i], rope[2 * i + 1]);
                rope[2 * i] = a * cos[i] + (-b) * sin[i];
                rope[2 * i + 1] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// Builds `(main, compress)` from the config's rope settings, mirroring the
/// reference's `DeepseekV4Config.__post_init__`:
///
/// * nested `{"main": {...}, "compress": {...}}` is taken as it is;
/// * otherwise the flat dict (`rope_parameters` or legacy `rope_scaling`)
///   applies to `compress` only, with `compress_rope_theta`; `main` is plain
///   RoPE with `rope_theta`. A flat YaRN gets `attention_factor = 1`.
pub fn from_config(
    params: Option<&Value>,
    rope_theta: f64,
    compress_rope_theta: f64,
    partial: f64,
    head_dim: usize,
) -> Result<(RopeParams, RopeParams), String> {
    let empty = serde_json::Map::new();
    let params = match params {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(other) => return Err(format!("rope_parameters must be an object, got {other}")),
    };
    let build = |sub: &serde_json::Map<String, Value>, label: &str, default_theta: f64, flat: bool| {
        RopeSpec::parse(sub, default_theta, partial, flat)
            .and_then(|spec| spec.build(head_dim))
            .map_err(|e| format!("rope_parameters.{label}: {e}"))
    };
    match (params.get("main"), params.get("compress")) {
        (Some(Value::Object(main)), Some(Value::Object(compress))) => {
            Ok((build(main, "main", rope_theta, false)?, build(compress, "compress", compress_rope_theta, false)?))
        }
        _ => {
            let flat: serde_json::Map<String, Value> = params
                .iter()
                .filter(|(k, _)| *k != "main" && *k != "compress")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let main = RopeSpec { theta: rope_theta, partial, yarn: None }.build(head_dim)?;
            Ok((main, build(&flat, "compress", compress_rope_theta, true)?))
        }
    }
}

struct Yarn {
    factor: f64,
    original_max_position_embeddings: f64,
    beta_fast: f64,
    beta_slow: f64,
    attention_factor: f64,
}

struct RopeSpec {
    theta: f64,
    partial: f64,
    yarn: Option<Yarn>,
}

impl RopeSpec {
    /// `flat` marks the flat form, where the theta is always the config's and a
    /// YaRN attention factor defaults to 1 (the V4 reference forces it).
    fn parse(
        sub: &serde_json::Map<String, Value>,
        default_theta: f64,
        partial: f64,
        flat: bool,
    ) -> Result<Self, String> {
        let num = |key: &str| -> Result<Option<f64>, String> {
            match sub.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => Ok(n.as_f64()),
                Some(other) => Err(format!("`{key}` must be a number, got {other}")),
            }
        };
        let theta = if flat { default_theta } else { num("rope_theta")?.unwrap_or(default_theta) };
        // Nested dicts carry their own factor (the reference defaults it to 1.0).
        let partial = if flat { partial } else { num("partial_rotary_factor")?.unwrap_or(1.0) };
        let kind = sub.get("rope_type").or(sub.get("type")).and_then(Value::as_str).unwrap_or("default");
        let yarn = match kind {
            "default" => None,
            "yarn" => {
                let factor = num("factor")?.ok_or("yarn needs `factor`")?;
                let original =
                    num("original_max_position_embeddings")?.ok_or("yarn needs `original_max_position_embeddings`")?;
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
                };
                let attention_factor = match (num("attention_factor")?, num("mscale")?, num("mscale_all_dim")?) {
                    (Some(a), _, _) => a,
                    (None, _, _) if flat => 1.0,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
                    (None, _, _) => mscale(factor, 1.0),
                };
                // `or 32` / `or 1` in the reference: zero also means the default.
                let nonzero = |v: Option<f64>, d: f64| v.filter(|x| *x != 0.0).unwrap_or(d);
                Some(Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: nonzero(num("beta_fast")?, 32.0),
                    beta_slow: nonzero(num("beta_slow")?, 1.0),
                    attention_factor,
                })
            }
            other => {
                return Err(format!("rope_type `{other}` is not supported (default or yarn)"));
            }
        };
        Ok(RopeSpec { theta, partial, yarn })
    }

    fn build(&self, head_dim: usize) -> Result<RopeParams, String> {
        let in_range = self.theta > 0.0 && self.partial > 0.0 && self.partial <= 1.0;
        if !in_range {
            return Err(format!("rope_theta {} / partial_rotary_factor {} out of range", self.theta, self.partial));
        }
        let dim = (head_dim as f64 * self.partial) as usize;
        if dim < 2 {
            return Err(format!("rope dim {dim} is too small"));
        }
        // base ** (arange(0, dim, 2) / dim), in f32 as torch computes it.
        let pos_freqs: Vec<f32> = (0..dim / 2).map(|i| (self.theta as f32).powf((2 * i) as f32 / dim as f32)).collect();
        let Some(yarn) = &self.yarn else {
            return Ok(RopeParams { dim, inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(), scaling: 1.0 });
        };
        if !(yarn.factor > 0.0 && yarn.original_max_position_embeddings > 0.0) {
            return Err("yarn factor and original_max_position_embeddings must be positive".into());
        }
        let correction_dim = |rotations: f64| {
            (dim as f64 * (yarn.original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * self.theta.ln())
        };
        // The reference always truncates (its `truncate` lookup reads the nested top level).
        let low = correction_dim(yarn.beta_fast).floor().max(0.0);
        let high = correction_dim(yarn.beta_slow).ceil().min(dim as f64 - 1.0);
        let high = if low == high { high + 0.001 } else { high };
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let interpolated = 1.0 / (yarn.factor as f32 * p);
                interpolated * (1.0 - extrapolation) + (1.0 / p) * extrapolation
            })
            .collect();
        Ok(RopeParams { dim, inv_freq, scaling: yarn.attention_factor as f32 })
    }
}
