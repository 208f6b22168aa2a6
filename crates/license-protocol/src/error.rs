//! The JSON error body of every server endpoint: a stable machine code and a human sentence.

use serde::{Deserialize, Serialize};

/// `{"error": "<code>", "message": "<sentence>"}`. Codes are stable; messages may change and
/// never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    /// Stable code, e.g. `token_already_used`, `invalid_csr`, `machine_revoked`.
    pub error: String,
    /// One human-readable sentence naming the problem.
    pub message: String,
}
