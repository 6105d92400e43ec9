//! `containerd-shim-husk-v2`: containerd's runtime `io.containerd.husk.v2`.
//!
//! Not implemented yet (see the shim issue); it refuses to run rather than
//! pretending to be a shim.

fn main() {
    eprintln!("containerd-shim-husk-v2: not implemented yet");
    std::process::exit(1);
}
