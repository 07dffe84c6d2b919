//! Compiles broker.v1 with protox (no system protoc) and generates tonic code.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/broker/v1/broker.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
