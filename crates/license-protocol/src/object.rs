//! Request bodies are JSON objects, never arrays.
//!
//! Why: serde's derived `Deserialize` of a struct also accepts a sequence of its fields in
//! declaration order (`["token", "host", …]` for a [`BootstrapRequest`](crate::enroll::BootstrapRequest)),
//! a second, undocumented body format that skips `deny_unknown_fields` and that the OpenAPI
//! document does not describe. [`objects_only!`] gives a request type a `Deserialize` that
//! asks the format for a map (`deserialize_map`, which serde_json refuses for anything but an
//! object) and then runs the derived impl on it. The type derives with
//! `#[serde(remote = "Self")]`, which turns the derived impls into inherent functions that
//! the macro's trait impls call.

/// Implements `Deserialize` (objects only) and `Serialize` for types deriving both with
/// `#[serde(remote = "Self")]`.
macro_rules! objects_only {
    ($($ty:ident),+ $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Object;
                impl<'de> serde::de::Visitor<'de> for Object {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str(concat!("a JSON object (", stringify!($ty), ")"))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                        $ty::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                deserializer.deserialize_map(Object)
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                $ty::serialize(self, serializer)
            }
        }
    )+};
}

pub(crate) use objects_only;

#[cfg(test)]
mod tests {
    use crate::agent_api::HealthReport;
    use crate::enroll::{BootstrapRequest, RecoverRequest};
    use crate::rotation::{AckRequest, RotateSecretRequest};

    #[test]
    fn bodies_given_as_arrays_are_refused() {
        let machine = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
        let nonce = "00112233445566778899aabbccddeeff";
        let bootstrap = r#"["tok", "host", "hw-1", "x86_64"]"#;
        let err = serde_json::from_str::<BootstrapRequest>(bootstrap).unwrap_err();
        assert!(err.to_string().contains("a JSON object"), "{err}");
        let recover = format!(r#"["{machine}", "recovery", "csr"]"#);
        assert!(serde_json::from_str::<RecoverRequest>(&recover).is_err());
        let rotate = format!(r#"[1, "{machine}", 1700000000, "{nonce}", "sig"]"#);
        assert!(serde_json::from_str::<RotateSecretRequest>(&rotate).is_err());
        assert!(serde_json::from_str::<AckRequest>("[3]").is_err());
        let health =
            r#"["0.1.0", "tpm", true, true, "inactive", null, null, 0, null, true, 1700000000, 3]"#;
        assert!(serde_json::from_str::<HealthReport>(health).is_err());

        // The same bodies as objects are read, and written back as objects.
        let ack: AckRequest = serde_json::from_str(r#"{"secret_version": 3}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"secret_version":3}"#
        );
        let rotate = format!(
            r#"{{"current_secret_version":1,"agent_id":"{machine}","timestamp":1700000000,"nonce":"{nonce}","signature":"sig"}}"#
        );
        let request: RotateSecretRequest = serde_json::from_str(&rotate).unwrap();
        assert_eq!(serde_json::to_string(&request).unwrap(), rotate);
        // Unknown fields are still refused inside an object.
        let extra = r#"{"secret_version": 3, "x": 1}"#;
        assert!(serde_json::from_str::<AckRequest>(extra).is_err());
    }
}
