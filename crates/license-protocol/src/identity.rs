//! Machine identities: client and machine UUIDs, and the certificate CN that binds them.
//!
//! Seed 004: every machine certificate has `CN = {client_id}:{machine_id}`. The server parses
//! that CN on every agent request; a CN that is not exactly two canonical UUIDs joined by one
//! colon is refused.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a CN (or an id) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("certificate has no common name")]
    NoCommonName,
    #[error("common name must be `client_id:machine_id`")]
    MissingSeparator,
    #[error("client_id in common name is not a UUID")]
    BadClientId,
    #[error("machine_id in common name is not a UUID")]
    BadMachineId,
}

macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new random id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Always the canonical lowercase hyphenated form, the one stored and put in CNs.
                write!(f, "{}", self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_newtype!(
    /// A vendor's customer (an organisation owning POS machines).
    ClientId
);
uuid_newtype!(
    /// One enrolled machine.
    MachineId
);

/// The identity of a machine as written in its certificate's CN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MachineIdentity {
    pub client_id: ClientId,
    pub machine_id: MachineId,
}

impl fmt::Display for MachineIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.client_id, self.machine_id)
    }
}

impl FromStr for MachineIdentity {
    type Err = IdentityError;

    fn from_str(cn: &str) -> Result<Self, Self::Err> {
        let (client, machine) = cn.split_once(':').ok_or(IdentityError::MissingSeparator)?;
        // Only the canonical 36-character form: no braces, no URNs, no simple form, so that
        // one machine has exactly one spelling.
        let canonical = |s: &str| s.len() == 36 && s.as_bytes()[8] == b'-';
        if !canonical(client) {
            return Err(IdentityError::BadClientId);
        }
        if !canonical(machine) {
            return Err(IdentityError::BadMachineId);
        }
        Ok(Self {
            client_id: client.parse().map_err(|_| IdentityError::BadClientId)?,
            machine_id: machine.parse().map_err(|_| IdentityError::BadMachineId)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: &str = "550e8400-e29b-41d4-a716-446655440000";
    const M: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";

    #[test]
    fn round_trips() {
        let id: MachineIdentity = format!("{C}:{M}").parse().unwrap();
        assert_eq!(id.to_string(), format!("{C}:{M}"));
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "".to_string(),
            C.to_string(),
            format!("{C}:"),
            format!(":{M}"),
            format!("{C}:{M}:x"),
            format!("{C}::{M}"),
            format!("{{{C}}}:{M}"),
            format!("{C}:{}", M.replace('-', "")),
            format!("{C} :{M}"),
        ] {
            assert!(bad.parse::<MachineIdentity>().is_err(), "{bad:?} accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = s.parse::<MachineIdentity>();
        }
    }
}
