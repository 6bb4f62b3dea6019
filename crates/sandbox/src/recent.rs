//! The last few requests a sandbox server saw, kept for tests to inspect.

use parking_lot::{Mutex, MutexGuard};
use std::collections::VecDeque;

/// How many requests each sandbox server keeps.
pub(crate) const KEPT: usize = 64;

/// A bounded log of the last [`KEPT`] items, oldest first; pushing past the bound drops the
/// oldest. Shared between a server's handler and its test-facing accessors.
pub(crate) struct Recent<T> {
    items: Mutex<VecDeque<T>>,
}

impl<T: Clone> Recent<T> {
    pub(crate) fn new() -> Self {
        Recent {
            items: Mutex::new(VecDeque::with_capacity(KEPT)),
        }
    }

    /// Appends `item`, dropping the oldest when [`KEPT`] are held.
    pub(crate) fn push(&self, item: T) {
        let mut items = self.lock();
        if items.len() == KEPT {
            items.pop_front();
        }
        items.push_back(item);
    }

    /// The newest item.
    pub(crate) fn last(&self) -> Option<T> {
        self.lock().back().cloned()
    }

    /// Every item held, oldest first.
    pub(crate) fn all(&self) -> Vec<T> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<T>> {
        // A panicking test thread must not hide what the server saw.
        self.items.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_kept_items_oldest_first() {
        let recent = Recent::new();
        assert_eq!(recent.last(), None::<usize>);
        for i in 0..KEPT + 3 {
            recent.push(i);
        }
        let all = recent.all();
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0], 3);
        assert_eq!(recent.last(), Some(KEPT + 2));
    }
}
