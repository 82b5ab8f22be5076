//! [`WaiterSlot`]: one of the places [`LockLayer::max_waiters`](super::LockLayer::max_waiters)
//! allows for requests acquiring in wait mode.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A place among a layer's waiting requests, given back when dropped (the acquire finished or
/// was cancelled).
#[derive(Debug)]
pub(crate) struct WaiterSlot(Arc<AtomicUsize>);

impl WaiterSlot {
    /// Takes a place if fewer than `max` are taken.
    pub(crate) fn try_take(waiting: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < max).then_some(taken + 1)
            })
            .ok()
            .map(|_| WaiterSlot(Arc::clone(waiting)))
    }
}

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_places_are_taken_and_dropping_gives_one_back() {
        let waiting = Arc::new(AtomicUsize::new(0));
        let first = WaiterSlot::try_take(&waiting, 2).unwrap();
        let _second = WaiterSlot::try_take(&waiting, 2).unwrap();
        assert!(WaiterSlot::try_take(&waiting, 2).is_none());
        drop(first);
        assert!(WaiterSlot::try_take(&waiting, 2).is_some());
    }
}
