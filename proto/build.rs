//! Compiles broker.v1 with protox (no system protoc) and generates tonic code.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/broker/v1/broker.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    // The descriptor set is also kept for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("broker_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
