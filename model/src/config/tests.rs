use super::*;

fn parse(json: &str) -> std::result::Result<ModelConfig, String> {
    ModelConfig::from_json(json)
}

#[test]
fn defaults_match_the_reference() {
    let c = parse("{}").unwrap();
    assert_eq!(c.num_hidden_layers, 43);
    assert_eq!((c.csa_rate, c.hca_rate), (4, 128));
    // V4-Pro default schedule: 2× HCA, then HCA/CSA interleaved.
    assert_eq!(&c.layer_types[..4], &[LayerType::Hca, LayerType::Hca, LayerType::Hca, LayerType::Csa]);
    assert_eq!(&c.mlp_layer_types[..4], &[MlpType::Hash, MlpType::Hash, MlpType::Hash, MlpType::TopK]);
    assert_eq!(c.rope_main.dim, 64);
    assert_eq!(c.scoring_func, ScoringFunc::SqrtSoftplus);
    assert_eq!(c.eos_token_ids, vec![1]);
}

#[test]
fn legacy_names_fold_in() {
    let c = parse(
        r#"{"num_hidden_layers": 3, "head_dim": 32, "compress_ratios": [4, 128, 0], "compress_rate_hca": 32,
            "num_hash_layers": 1, "qk_rope_head_dim": 8}"#,
    )
    .unwrap();
    assert_eq!(c.layer_types, vec![LayerType::Csa, LayerType::Hca, LayerType::Sliding]);
    assert_eq!(c.hca_rate, 32);
    assert_eq!(c.mlp_layer_types, vec![MlpType::Hash, MlpType::TopK, MlpType::TopK]);
    assert_eq!(c.rope_main.dim, 8);
    assert_eq!(c.rope_compress.dim, 8);
}

#[test]
fn flat_yarn_applies_to_compress_only_with_unit_attention_factor() {
    let c = parse(
        r#"{"head_dim": 64, "partial_rotary_factor": 0.5,
            "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536}}"#,
    )
    .unwrap();
    assert_eq!(c.rope_compress.scaling, 1.0);
    assert_eq!(c.rope_main.inv_freq[0], 1.0);
    // Low frequencies are interpolated (divided by the factor), high ones kept.
    let plain = parse(r#"{"head_dim": 64, "partial_rotary_factor": 0.5}"#).unwrap();
    let last = plain.rope_compress.inv_freq.len() - 1;
    assert!((c.rope_compress.inv_freq[last] * 16.0 - plain.rope_compress.inv_freq[last]).abs() < 1e-9);
    assert_eq!(c.rope_compress.inv_freq[0], plain.rope_compress.inv_freq[0]);
}

#[test]
fn the_released_quantization_is_accepted() {
    let release = r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128], "activation_scheme": "dynamic"}, "expert_dtype": "fp4",
        "num_nextn_predict_layers": 1}"#;
    parse(release).unwrap();
    // The -Base layout: F32 scales, no scale_fmt, FP8 experts.
    parse(r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}, "expert_dtype": "fp8"}"#).unwrap();
}

#[test]
fn inconsistent_configs_are_rejected_with_a_reason() {
    let cases = [
        (r#"{"num_hidden_layers": 2, "layer_types": ["sliding_attention"]}"#, "layer_types has 1 entries"),
        (r#"{"layer_types": ["full_attention"]}"#, "unknown entry `full_attention`"),
        (r#"{"compress_ratios": [0, 8]}"#, "not one of 0, 4, 128"),
        (r#"{"num_experts_per_tok": 9, "n_routed_experts": 8}"#, "exceeds n_routed_experts"),
        (r#"{"num_key_value_heads": 2}"#, "shared-KV"),
        (r#"{"partial_rotary_factor": 0.25, "qk_rope_head_dim": 64}"#, "qk_rope_head_dim is 64"),
        (r#"{"scoring_func": "relu"}"#, "scoring_func"),
        (r#"{"o_groups": 7}"#, "not divisible by o_groups"),
        (r#"{"index_head_dim": 32}"#, "smaller than the compress rope dim"),
        (r#"{"vocab_size": 10, "eos_token_id": 12}"#, "outside the vocabulary"),
        (r#"{"hidden_size": 0}"#, "hidden_size must be positive"),
        (r#"{"rope_parameters": {"rope_type": "longrope"}}"#, "not supported"),
        (r#"{"hidden_size": "big"}"#, "not a valid config"),
        (r#"{"quantization_config": {"quant_method": "awq"}}"#, "quant_method `awq`"),
        (r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}"#, "fmt `e5m2`"),
        (r#"{"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}"#, "[64,64]"),
        (r#"{"expert_dtype": "int4"}"#, "expert_dtype `int4`"),
        ("[1, 2", "not a valid config"),
    ];
    for (json, want) in cases {
        let err = parse(json).expect_err(json);
        assert!(err.contains(want), "{json}: {err}");
    }
}
