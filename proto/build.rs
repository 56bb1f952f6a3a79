//! Compiles the .proto files with protox (pure Rust, no protoc needed) and
//! generates prost messages (with `bytes::Bytes` for bytes fields) and tonic
//! services into OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=myriad");
    let descriptors = protox::compile(["myriad/expert.proto", "myriad/admin.proto", "myriad/kvcache.proto"], ["."])?;
    tonic_prost_build::configure().bytes(".").compile_fds(descriptors)?;
    Ok(())
}
