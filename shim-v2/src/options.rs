//! The runtime options of a Create: which husk configuration file to use.
//! CRI sends `runtimeoptions.v1.Options` (decoded with the type generated
//! from protocols/protos/runtimeoptions.proto); runc's options carry no path.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::shim::oci::Options as RuncOptions;
use husk_protocols::protobuf::Message;

pub use husk_protocols::runtimeoptions::Options as RuntimeOptions;

/// The configuration file the options name, if they name one.
pub fn config_path(any: &Any) -> Option<String> {
    if any.type_url.ends_with("runtimeoptions.v1.Options") {
        return match RuntimeOptions::parse_from_bytes(&any.value) {
            Ok(o) if !o.config_path.is_empty() => Some(o.config_path),
            Ok(_) => None,
            Err(e) => {
                log::warn!(
                    "runtime options of type {} do not decode: {e}",
                    any.type_url
                );
                None
            }
        };
    }
    // Decoded only to say so in the log if they are not runc's.
    if any.type_url.ends_with("containerd.runc.v1.Options")
        && RuncOptions::parse_from_bytes(&any.value).is_err()
    {
        log::warn!("runtime options of type {} do not decode", any.type_url);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value;
        a
    }

    #[test]
    fn config_path_from_runtime_options() {
        let mut o = RuntimeOptions::new();
        o.type_url = "io.containerd.husk.v1.Config".into();
        o.config_path = "/etc/husk/other.toml".into();
        let a = any("runtimeoptions.v1.Options", o.write_to_bytes().unwrap());
        assert_eq!(config_path(&a).as_deref(), Some("/etc/husk/other.toml"));

        let mut o = RuntimeOptions::new();
        o.config_body = b"vcpus = 2".to_vec();
        let a = any(
            "types.googleapis.com/runtimeoptions.v1.Options",
            o.write_to_bytes().unwrap(),
        );
        assert_eq!(config_path(&a), None);

        let mut r = RuncOptions::new();
        r.binary_name = "/usr/bin/runc".into();
        let a = any("containerd.runc.v1.Options", r.write_to_bytes().unwrap());
        assert_eq!(config_path(&a), None);

        // Field 2 says 0x50 bytes follow; there is one.
        let bad = any("runtimeoptions.v1.Options", vec![0x12, 0x50, b'a']);
        assert_eq!(config_path(&bad), None);
    }
}
