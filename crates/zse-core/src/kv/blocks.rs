//! The KV cache's bookkeeping: fixed-size blocks with reference counts, a free list,
//! and an index of full blocks by content for prefix reuse.
//!
//! A full block is identified by a hash chained over the tokens of the whole prefix
//! up to its end (`parent hash` + its own tokens), so two sequences share a block only
//! when everything before it is the same too. Hits are verified against the stored
//! tokens and parent hash, so a hash collision can never hand out wrong contents.
//! Cached blocks that no sequence uses stay cached until the space is needed; then
//! the least recently released goes first.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

pub type BlockId = u32;

/// The hash chain's starting point (the empty prefix).
pub const ROOT_HASH: u64 = 0;

/// Chains a block's tokens onto the hash of the prefix before it.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    // 0 stays reserved for the empty prefix.
    h.finish().max(1)
}

#[derive(Debug, Clone)]
struct CachedBlock {
    hash: u64,
    parent: u64,
    tokens: Vec<u32>,
}

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    refs: Vec<u32>,
    /// Blocks with no references and no cached content.
    free: Vec<BlockId>,
    /// Blocks with no references whose content is cached: release order -> block.
    evictable: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    clock: u64,
    by_hash: HashMap<u64, BlockId>,
    cached: Vec<Option<CachedBlock>>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            // Popped from the end: hand out low ids first.
            free: (0..num_blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
            by_hash: HashMap::new(),
            cached: vec![None; num_blocks],
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free, or cached and unused).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn in_use(&self) -> usize {
        self.num_blocks() - self.available()
    }

    pub fn is_shared(&self, id: BlockId) -> bool {
        self.refs[id as usize] > 1
    }

    /// A block for new content, with one reference; evicts the least recently
    /// released cached block when no free one is left.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                self.uncache(id);
                id
            }
        };
        self.refs[id as usize] = 1;
        Some(id)
    }

    /// One more sequence uses `id` (a fork sharing its blocks).
    pub fn retain(&mut self, id: BlockId) {
        self.refs[id as usize] += 1;
    }

    /// One sequence stops using `id`.
    pub fn release(&mut self, id: BlockId) {
        let r = &mut self.refs[id as usize];
        debug_assert!(*r > 0, "block {id} released more often than taken");
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        if self.cached[id as usize].is_some() {
            self.clock += 1;
            self.released_at[id as usize] = self.clock;
            self.evictable.insert(self.clock, id);
        } else {
            self.free.push(id);
        }
    }

    /// The cached block holding `tokens` after the prefix `parent`, with a reference
    /// taken on it, and its hash.
    pub fn lookup(&mut self, parent: u64, tokens: &[u32]) -> Option<(BlockId, u64)> {
        let hash = chain_hash(parent, tokens);
        let id = *self.by_hash.get(&hash)?;
        let meta = self.cached[id as usize].as_ref()?;
        if meta.parent != parent || meta.tokens != tokens {
            return None;
        }
        if self.refs[id as usize] == 0 {
            self.evictable.remove(&self.released_at[id as usize]);
        }
        self.refs[id as usize] += 1;
        Some((id, hash))
    }

    /// Records that block `id` now holds `tokens` (a full block) after the prefix
    /// `parent`; returns the block's chain hash. A block already cached under the same
    /// hash keeps its place (this one stays private to its sequence).
    pub fn register(&mut self, id: BlockId, parent: u64, tokens: &[u32]) -> u64 {
        debug_assert_eq!(tokens.len(), self.block_size);
        let hash = chain_hash(parent, tokens);
        if self.cached[id as usize].is_none() && !self.by_hash.contains_key(&hash) {
            self.by_hash.insert(hash, id);
            self.cached[id as usize] = Some(CachedBlock {
                hash,
                parent,
                tokens: tokens.to_vec(),
            });
        }
        hash
    }

    fn uncache(&mut self, id: BlockId) {
        if let Some(meta) = self.cached[id as usize].take() {
            self.by_hash.remove(&meta.hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_then_release() {
        let mut a = BlockAllocator::new(3, 4);
        let ids: Vec<_> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(a.allocate(), None);
        assert_eq!(a.in_use(), 3);
        a.release(1);
        assert_eq!(a.allocate(), Some(1));
        for id in ids {
            a.release(id);
        }
        assert_eq!((a.in_use(), a.available()), (0, 3));
    }

    #[test]
    fn shared_blocks_free_with_the_last_reference() {
        let mut a = BlockAllocator::new(2, 4);
        let b = a.allocate().unwrap();
        a.retain(b);
        assert!(a.is_shared(b));
        a.release(b);
        assert!(!a.is_shared(b));
        assert_eq!(a.in_use(), 1);
        a.release(b);
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn prefix_hits_need_the_same_tokens_and_the_same_past() {
        let mut a = BlockAllocator::new(4, 2);
        let b0 = a.allocate().unwrap();
        let h0 = a.register(b0, ROOT_HASH, &[1, 2]);
        let b1 = a.allocate().unwrap();
        let h1 = a.register(b1, h0, &[3, 4]);
        a.release(b1);
        a.release(b0);
        assert_eq!(a.in_use(), 0);
        // The same prefix comes back, taking references again.
        assert_eq!(a.lookup(ROOT_HASH, &[1, 2]), Some((b0, h0)));
        assert_eq!(a.lookup(h0, &[3, 4]), Some((b1, h1)));
        assert_eq!(a.in_use(), 2);
        // Same tokens after a different past, or different tokens: misses.
        assert_eq!(a.lookup(ROOT_HASH, &[3, 4]), None);
        assert_eq!(a.lookup(h0, &[3, 5]), None);
    }

    #[test]
    fn cached_blocks_are_evicted_least_recently_released_first() {
        let mut a = BlockAllocator::new(2, 1);
        let x = a.allocate().unwrap();
        let y = a.allocate().unwrap();
        let hx = a.register(x, ROOT_HASH, &[7]);
        a.register(y, ROOT_HASH, &[8]);
        a.release(x);
        a.release(y);
        assert_eq!(a.available(), 2);
        // No free block left: the first one released goes, the other stays cached.
        assert_eq!(a.allocate(), Some(x));
        assert_eq!(a.lookup(ROOT_HASH, &[7]), None);
        assert!(a.lookup(ROOT_HASH, &[8]).is_some());
        assert_ne!(hx, ROOT_HASH);
    }

    #[test]
    fn a_hit_on_an_unused_cached_block_takes_it_off_the_eviction_list() {
        let mut a = BlockAllocator::new(1, 1);
        let x = a.allocate().unwrap();
        a.register(x, ROOT_HASH, &[5]);
        a.release(x);
        assert!(a.lookup(ROOT_HASH, &[5]).is_some());
        assert_eq!(a.allocate(), None, "the hit block is in use again");
    }
}
