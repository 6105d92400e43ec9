//! Compiles protos/runtimeoptions.proto (the runtime options containerd
//! sends) with the pure-Rust protobuf parser: no protoc needed.

use std::fs;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=protos/runtimeoptions.proto");
    protobuf_codegen::Codegen::new()
        .pure()
        .out_dir(&out)
        .include("protos")
        .input("protos/runtimeoptions.proto")
        .run()
        .expect("compiling protos/runtimeoptions.proto");
    // The generated file starts with inner attributes and doc comments,
    // which `include!` cannot take; options.rs supplies its own.
    let path = out.join("runtimeoptions.rs");
    let text = fs::read_to_string(&path).expect("reading generated code");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
        .collect();
    fs::write(&path, kept.join("\n")).expect("writing generated code");
}
