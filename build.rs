//! Compiles `proto/portcullis/v1/*.proto` (and the stored record encodings
//! in `proto/portcullis/store/v1/`) with protox (pure Rust), so a fresh
//! machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/portcullis/v1/broker.proto",
        "proto/portcullis/v1/approvals.proto",
        "proto/portcullis/v1/audit.proto",
        "proto/portcullis/v1/keys.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // For gRPC server reflection (grpcurl and friends).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("portcullis_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // Stored record encodings: messages only, kept out of the reflection
    // descriptor (they are not part of the wire API).
    let store = "proto/portcullis/store/v1/records.proto";
    println!("cargo:rerun-if-changed={store}");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_fds(protox::compile([store], ["proto"])?)?;
    Ok(())
}
