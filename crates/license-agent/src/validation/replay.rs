//! The replay window: nonces seen within `replay_window` seconds are refused
//! (`replayed_nonce`). Bounded in memory: past [`MAX_REMEMBERED_NONCES`] the oldest are
//! forgotten first.

use std::collections::{HashSet, VecDeque};

/// Nonces remembered at most.
pub const MAX_REMEMBERED_NONCES: usize = 1_000_000;

#[derive(Debug, Default)]
pub struct ReplayWindow {
    seen: HashSet<[u8; 16]>,
    order: VecDeque<(i64, [u8; 16])>,
}

impl ReplayWindow {
    /// Records a nonce; false when it was seen within the window.
    pub fn record(&mut self, nonce: [u8; 16], now: i64, window: i64) -> bool {
        while let Some(&(at, old)) = self.order.front() {
            if at + window > now && self.order.len() < MAX_REMEMBERED_NONCES {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if !self.seen.insert(nonce) {
            return false;
        }
        self.order.push_back((now, nonce));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_old_nonces() {
        let mut w = ReplayWindow::default();
        assert!(w.record([1; 16], 100, 10));
        assert!(!w.record([1; 16], 105, 10));
        assert!(w.record([1; 16], 111, 10));
    }
}
