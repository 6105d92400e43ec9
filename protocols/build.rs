//! Compiles protos/agent.proto (messages and the sync ttrpc client/server)
//! and protos/runtimeoptions.proto (messages) into Rust with the pure-Rust
//! protobuf parser: no protoc needed.

use std::fs;
use std::path::PathBuf;

const PROTOS: [&str; 2] = ["agent.proto", "runtimeoptions.proto"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=protos/{proto}");
    }
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .include("protos")
        .inputs(PROTOS.map(|p| format!("protos/{p}")))
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize::default())
        .run()
        .expect("compiling protos/");
    // The generated files start with inner attributes and doc comments,
    // which `include!` cannot take; lib.rs supplies its own.
    for name in ["agent.rs", "agent_ttrpc.rs", "runtimeoptions.rs"] {
        let path = out.join(name);
        let text = fs::read_to_string(&path).expect("reading generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        fs::write(&path, kept.join("\n")).expect("writing generated code");
    }
}
