//! Where revocation is checked: the licenses the server revoked for this machine, as last
//! fetched (and kept in `state.json` for offline days). A revoked license answers `revoked`
//! even though its token still opens.

use std::collections::HashSet;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revocations {
    ids: HashSet<uuid::Uuid>,
}

impl Revocations {
    pub fn new(ids: impl IntoIterator<Item = uuid::Uuid>) -> Self {
        Self {
            ids: ids.into_iter().collect(),
        }
    }

    pub fn is_revoked(&self, license: &uuid::Uuid) -> bool {
        self.ids.contains(license)
    }
}
