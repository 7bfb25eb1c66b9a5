//! Compiles FAR's Flintlock protos with protox (pure Rust): no system protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/types/microvm.proto",
        "proto/services/microvm/v1alpha1/microvms.proto",
        "proto/far/host/v1/guests.proto",
        "proto/far/listing/v1/listing.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Ordered maps: deterministic encoding, so equal specs encode to equal bytes.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
