fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: builds need no system protobuf compiler and no network.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let descriptor = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("dlm_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_protos(
            &[
                "dlm/v1/generator.proto",
                "dlm/v1/guide.proto",
                "inference/grpc_service.proto",
            ],
            &["."],
        )?;
    // Proto3 JSON (serde) for the generator's public API, for the HTTP/JSON gateway.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptor)?)?
        .build(&[".dlm.v1"])?;
    println!("cargo:rerun-if-changed=dlm");
    println!("cargo:rerun-if-changed=inference");
    Ok(())
}
