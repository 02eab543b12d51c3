//! The KV cache: fixed-size blocks of token positions in one pool per model.
//!
//! - [`blocks`]: which blocks are free, shared or cached (reference counts, a free
//!   list, and an index of full blocks by the tokens of their whole prefix);
//! - [`pool`]: the tensors the blocks live in, written and read by slot;
//! - [`BlockTable`]: one sequence's blocks, in position order;
//! - [`WindowTable`]: its blocks in the pool of the layers that attend within a
//!   sliding window (Gemma 3's five in six, Mistral's all), where only the blocks the
//!   next query can see are kept.

pub mod blocks;
pub mod pool;

pub use blocks::{chain_hash, BlockAllocator, BlockId, ROOT_HASH};
pub use pool::KvPool;

/// One sequence's blocks: block `i` holds positions `i * block_size ..`. The first
/// `hashes.len()` blocks are full and registered for prefix reuse.
#[derive(Debug, Clone, Default)]
pub struct BlockTable {
    pub blocks: Vec<BlockId>,
    pub hashes: Vec<u64>,
}

impl BlockTable {
    /// The slot of every position `0..len`.
    pub fn slots(&self, block_size: usize, len: usize) -> Vec<u32> {
        (0..len)
            .map(|p| self.blocks[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect()
    }

    /// Blocks needed to hold `len` positions.
    pub fn blocks_for(block_size: usize, len: usize) -> usize {
        len.div_ceil(block_size)
    }

    /// The hash of the prefix covered by the registered blocks.
    pub fn last_hash(&self) -> u64 {
        self.hashes.last().copied().unwrap_or(ROOT_HASH)
    }
}

/// One sequence's blocks in the windowed layers' pool: block `i` holds positions
/// `i * block_size ..`, as in `BlockTable`, but blocks wholly before what the next
/// query sees are given back (`None`).
#[derive(Debug, Clone, Default)]
pub struct WindowTable {
    pub blocks: Vec<Option<BlockId>>,
}

impl WindowTable {
    /// The first block a query at `position` sees under `window`.
    pub fn first_visible(block_size: usize, window: usize, position: usize) -> usize {
        (position + 1).saturating_sub(window) / block_size
    }

    /// The slot of every position `0..len`. A position whose block is gone gets the
    /// slot of the first position still held: attention masks it out, and that row
    /// is written, so a backend that reads every slot (candle's) reads no garbage.
    pub fn slots(&self, block_size: usize, len: usize) -> Vec<u32> {
        let live = |p: usize| self.blocks[p / block_size];
        let first = (0..len).find(|&p| live(p).is_some());
        (0..len)
            .map(|p| {
                let p = match live(p) {
                    Some(_) => p,
                    None => first.unwrap_or(p),
                };
                live(p).map_or(0, |b| b * block_size as u32 + (p % block_size) as u32)
            })
            .collect()
    }

    /// The blocks held.
    pub fn held(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.blocks.iter().flatten().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_slots_point_dropped_positions_at_the_first_held_one() {
        let t = WindowTable {
            blocks: vec![None, Some(4), Some(1)],
        };
        assert_eq!(t.slots(2, 5), vec![8, 8, 8, 9, 2]);
        assert_eq!(t.held().collect::<Vec<_>>(), vec![4, 1]);
        // Window 3: a query at 5 sees 3..=5, blocks 1 and 2 (of 2 positions).
        assert_eq!(WindowTable::first_visible(2, 3, 5), 1);
        assert_eq!(WindowTable::first_visible(2, 3, 1), 0);
    }

    #[test]
    fn slots_follow_the_block_table() {
        let t = BlockTable {
            blocks: vec![3, 0],
            hashes: vec![],
        };
        assert_eq!(t.slots(2, 3), vec![6, 7, 0]);
        assert_eq!(BlockTable::blocks_for(2, 3), 2);
        assert_eq!(BlockTable::blocks_for(2, 4), 2);
        assert_eq!(t.last_hash(), ROOT_HASH);
    }
}
