//! The KV cache: fixed-size blocks of token positions in one pool per model.
//!
//! - [`blocks`]: which blocks are free, shared or cached (reference counts, a free
//!   list, and an index of full blocks by the tokens of their whole prefix);
//! - [`pool`]: the tensors the blocks live in, written and read by slot;
//! - [`BlockTable`]: one sequence's blocks, in position order.

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

#[cfg(test)]
mod tests {
    use super::*;

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
