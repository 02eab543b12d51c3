//! Admission control: which waiting requests may start running, under a limit on
//! concurrent sequences and an explicit KV-cache budget.
//!
//! The budget is counted in token positions. A sequence reserves room for its whole
//! possible context (prompt + `max_tokens`, capped by the context length) when it is
//! admitted, so a running sequence can never run out of cache and nothing is ever
//! truncated or preempted: a request that does not fit waits. Requests start in
//! arrival order (the head of the queue is never overtaken, so a large request cannot
//! starve). A block-based cache with preemption can admit more by reserving less;
//! this module is where that policy lives.

/// The KV budget in token positions, and how much of it running sequences hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBudget {
    capacity: usize,
    reserved: usize,
}

impl KvBudget {
    pub fn new(capacity_tokens: usize) -> Self {
        Self {
            capacity: capacity_tokens,
            reserved: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn reserved(&self) -> usize {
        self.reserved
    }

    fn fits(&self, tokens: usize) -> bool {
        self.reserved + tokens <= self.capacity
    }
}

/// Decides admissions; the engine thread owns it and reports every start and end.
#[derive(Debug)]
pub struct Admission {
    max_running: usize,
    running: usize,
    budget: KvBudget,
}

impl Admission {
    /// `max_running` concurrent sequences (at least 1) within `capacity_tokens`.
    pub fn new(max_running: usize, capacity_tokens: usize) -> Self {
        Self {
            max_running: max_running.max(1),
            running: 0,
            budget: KvBudget::new(capacity_tokens),
        }
    }

    /// Reserves `tokens` positions for a new sequence if both limits allow it.
    pub fn try_admit(&mut self, tokens: usize) -> bool {
        if self.running >= self.max_running || !self.budget.fits(tokens) {
            return false;
        }
        self.running += 1;
        self.budget.reserved += tokens;
        true
    }

    /// A sequence admitted with `tokens` positions has ended.
    pub fn release(&mut self, tokens: usize) {
        debug_assert!(self.running > 0 && self.budget.reserved >= tokens);
        self.running = self.running.saturating_sub(1);
        self.budget.reserved = self.budget.reserved.saturating_sub(tokens);
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn budget(&self) -> &KvBudget {
        &self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_within_both_limits_and_frees_on_release() {
        let mut a = Admission::new(2, 100);
        assert!(a.try_admit(60));
        assert!(!a.try_admit(50), "over the token budget");
        assert!(a.try_admit(40));
        assert_eq!(a.budget().reserved(), 100);
        a.release(60);
        assert!(a.try_admit(10));
        assert!(!a.try_admit(1), "two sequences already running");
        a.release(40);
        a.release(10);
        assert_eq!((a.running(), a.budget().reserved()), (0, 0));
    }

    #[test]
    fn a_request_as_large_as_the_budget_fits_alone() {
        let mut a = Admission::new(8, 100);
        assert!(a.try_admit(100));
        assert!(!a.try_admit(1));
        a.release(100);
        assert!(a.try_admit(100));
    }

    #[test]
    fn zero_max_running_still_admits_one() {
        let mut a = Admission::new(0, 10);
        assert!(a.try_admit(5));
        assert!(!a.try_admit(5));
    }
}
