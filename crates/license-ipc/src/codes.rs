//! Stable wire codes: closed sets of snake_case strings that both ends match on (validation
//! reasons, management errors, the server's API errors in `license-protocol`). One macro makes
//! each of them the same way: serde as the code string, `as_str`, `Display`, the list of codes
//! a peer may send, and a catch-all `Unrecognized` so that an older reader takes a newer
//! writer's code as a refusal it does not know rather than a parse error.

/// Declares a stable code enum: `Variant => "code",` per code (doc comments allowed), plus
/// `Unrecognized` (`"unrecognized"`, read but never sent). Codes are never renamed or reused.
///
/// ```
/// license_ipc::stable_codes! {
///     /// What went wrong.
///     pub enum Fault {
///         /// Too hot.
///         Hot => "hot",
///         Cold => "cold",
///     }
/// }
/// assert_eq!(Fault::Hot.as_str(), "hot");
/// assert_eq!(Fault::SENT, [Fault::Hot, Fault::Cold]);
/// let newer: Fault = serde_json::from_str("\"lukewarm\"").unwrap();
/// assert_eq!(newer, Fault::Unrecognized);
/// assert_eq!(serde_json::to_string(&Fault::Cold).unwrap(), "\"cold\"");
/// ```
#[macro_export]
macro_rules! stable_codes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $code:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[non_exhaustive]
        $vis enum $name {
            $( $(#[$vmeta])* #[serde(rename = $code)] $variant, )+
            /// A code this version does not know, sent by a newer peer: still a refusal. Never
            /// sent.
            #[serde(other, rename = "unrecognized")]
            Unrecognized,
        }

        impl $name {
            /// Every code a peer may send (all but `Unrecognized`).
            pub const SENT: &'static [$name] = &[$($name::$variant),+];

            /// The code as it appears on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $code, )+
                    $name::Unrecognized => "unrecognized",
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
