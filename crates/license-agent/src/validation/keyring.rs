//! The secret versions held in memory, with their dates, and the mark below which versions
//! were destroyed at the end of their grace (so their tokens answer `expired`, as the server's
//! online validation does, rather than `unknown_secret_version`).

use std::collections::BTreeMap;

use license_protocol::secret::{Secret, SecretDates};

#[derive(Debug, Default, Clone)]
pub struct Keyring {
    versions: BTreeMap<u64, (SecretDates, Secret)>,
    /// Highest version destroyed at the end of its grace (0: none).
    retired_through: u64,
}

impl Keyring {
    pub fn insert(&mut self, version: u64, dates: SecretDates, secret: Secret) {
        self.versions.insert(version, (dates, secret));
    }

    /// Forgets a version (its secret is zeroized when the last copy goes).
    pub fn remove(&mut self, version: u64) -> bool {
        self.versions.remove(&version).is_some()
    }

    /// Forgets a version at the end of its grace and remembers that it existed.
    pub fn retire(&mut self, version: u64) {
        self.remove(version);
        self.retired_through = self.retired_through.max(version);
    }

    /// Whether `version`, not held, was destroyed at the end of its grace.
    pub fn retired(&self, version: u64) -> bool {
        version <= self.retired_through && !self.versions.contains_key(&version)
    }

    /// The mark to persist (see [`Keyring::retire`]).
    pub fn retired_through(&self) -> u64 {
        self.retired_through
    }

    /// Restores the persisted mark.
    pub fn set_retired_through(&mut self, version: u64) {
        self.retired_through = self.retired_through.max(version);
    }

    pub fn newest(&self) -> Option<(u64, SecretDates)> {
        self.versions.iter().next_back().map(|(v, (d, _))| (*v, *d))
    }

    pub fn versions(&self) -> impl Iterator<Item = (u64, SecretDates)> + '_ {
        self.versions.iter().map(|(v, (d, _))| (*v, *d))
    }

    pub fn entries(&self) -> impl Iterator<Item = (u64, &SecretDates, &Secret)> {
        self.versions.iter().map(|(v, (d, s))| (*v, d, s))
    }

    pub fn get(&self, version: u64) -> Option<&(SecretDates, Secret)> {
        self.versions.get(&version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_versions_are_remembered() {
        let dates = SecretDates {
            valid_from: 0,
            valid_until: 1,
            grace_until: 2,
        };
        let mut ring = Keyring::default();
        ring.insert(1, dates, Secret::from_bytes([1; 32]));
        ring.insert(2, dates, Secret::from_bytes([2; 32]));
        ring.retire(1);
        assert!(ring.retired(1) && !ring.retired(2) && !ring.retired(3));
        assert_eq!(ring.newest().map(|(v, _)| v), Some(2));
        ring.remove(2);
        assert!(!ring.retired(2), "removed (invalidated), not retired");
    }
}
