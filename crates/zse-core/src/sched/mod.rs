//! The scheduler: which sequences run at the next step, with how many tokens each,
//! within the KV blocks there are.
//!
//! - Every step has a token budget. Sequences that are decoding get their one token
//!   first; sequences still reading their prompt share what is left, oldest first, in
//!   chunks, so a long prompt never freezes the streams around it.
//! - Waiting requests start in arrival order while there are sequence slots, budget
//!   and blocks for their whole prompt. Full blocks of their prompt found in the prefix
//!   index are reused as they are, and not computed again.
//! - When a running sequence needs a block and none is left, the newest sequence is
//!   preempted: its blocks are released and it goes back to the head of the queue
//!   with every token it has so far, to be recomputed (often from the prefix index)
//!   later. Nothing is truncated, and since a sequence's results do not depend on
//!   the batch, its tokens are the same as if it had never been preempted.
//! - A shared, partly filled block is copied before a sequence writes into it
//!   (copy on write), so forks (`n > 1`) can share their prompt's blocks.
//! - Where some layers attend within a sliding window, their keys and values live in
//!   blocks of their own (`WindowConfig`): a sequence holds there only the blocks
//!   its next query sees, and gives back the older ones as it advances. Those are
//!   kept in the prefix index too, so a prefix is reused when the full layers'
//!   blocks of it and the windowed layers' blocks of its last window are cached.
//!
//! The scheduler knows nothing of sampling or text: the engine keeps that in `T`.
//! Its interface is closed: sequences are named by the `SeqId` `enqueue` and `fork`
//! return, plans and results are keyed by it, and the queues themselves are private.

use std::collections::{HashSet, VecDeque};

use crate::kv::{chain_hash, BlockAllocator, BlockId, BlockTable, WindowTable, ROOT_HASH};

/// The cache-side state of one sequence.
#[derive(Debug, Clone, Default)]
pub struct SeqState {
    /// Every token known so far: the prompt, then each sampled token.
    pub tokens: Vec<u32>,
    /// Positions whose keys and values are in the cache.
    pub computed: usize,
    pub table: BlockTable,
    /// Its blocks in the windowed layers' pool (empty where the model has none).
    pub window: WindowTable,
    arrival: u64,
}

impl SeqState {
    pub fn new(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            ..Default::default()
        }
    }

    /// Tokens still to feed through the model.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

/// A sequence's name in the scheduler, for as long as it is there.
pub type SeqId = u64;

pub struct Entry<T> {
    pub id: SeqId,
    pub seq: SeqState,
    pub data: T,
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_running: usize,
    /// Tokens per step (at least `max_running`, so every decode fits).
    pub max_batch_tokens: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// The longest sequence (prompt plus completion) a request may reach.
    pub max_positions: usize,
    /// The windowed layers' pool, where the model has such layers.
    pub window: Option<WindowConfig>,
}

/// The blocks of the layers that attend within a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// A query at position p sees keys `p + 1 - window ..= p`.
    pub window: usize,
    pub num_blocks: usize,
}

/// A block copy to make before a step: in the windowed layers' pool or the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub windowed: bool,
    pub from: BlockId,
    pub to: BlockId,
    /// Filled rows to copy.
    pub rows: usize,
}

/// What the scheduler did for one step.
#[derive(Debug, Default)]
pub struct Plan {
    /// Every running sequence, oldest first, with the tokens it feeds this step (0:
    /// none).
    pub work: Vec<(SeqId, usize)>,
    /// Sequences started from the queue this step.
    pub admitted: Vec<SeqId>,
    /// Blocks to copy before the step.
    pub copies: Vec<BlockCopy>,
    /// Sequences moved back to the queue this step.
    pub preempted: usize,
}

impl Plan {
    /// The sequences that feed tokens this step, with how many.
    pub fn chunks(&self) -> impl Iterator<Item = (SeqId, usize)> + '_ {
        self.work.iter().copied().filter(|&(_, n)| n > 0)
    }

    /// Takes sequence `id`'s work out of the plan (its forward pass failed):
    /// nothing it computed is committed.
    pub fn drop_work(&mut self, id: SeqId) {
        for w in self.work.iter_mut().filter(|w| w.0 == id) {
            w.1 = 0;
        }
    }
}

/// What `admit` made of a waiting sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Started,
    /// Not blocks enough for it yet.
    NoRoom,
    /// Its next prefix block is one a running sequence is about to compute (requests
    /// with one system prompt arriving together): it starts once that block is in
    /// the cache, and computes only what follows, instead of computing the same
    /// positions beside it.
    AwaitsPrefix,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct SchedStats {
    /// Prompt positions looked up in the prefix index, and those found.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
}

pub struct Scheduler<T> {
    cfg: SchedulerConfig,
    blocks: BlockAllocator,
    /// The windowed layers' blocks (`cfg.window`).
    window_blocks: Option<BlockAllocator>,
    waiting: VecDeque<Entry<T>>,
    /// In the order of `Plan::work` (admission order, forks at the end).
    running: Vec<Entry<T>>,
    next_arrival: u64,
    next_id: SeqId,
    pub stats: SchedStats,
}

impl<T> Scheduler<T> {
    pub fn new(mut cfg: SchedulerConfig) -> Self {
        cfg.max_running = cfg.max_running.max(1);
        cfg.max_batch_tokens = cfg.max_batch_tokens.max(cfg.max_running);
        Self {
            blocks: BlockAllocator::new(cfg.num_blocks, cfg.block_size),
            window_blocks: (cfg.window).map(|w| BlockAllocator::new(w.num_blocks, cfg.block_size)),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            next_id: 0,
            stats: SchedStats::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn blocks(&self) -> &BlockAllocator {
        &self.blocks
    }

    /// The windowed layers' blocks, where the model has such layers.
    pub fn window_blocks(&self) -> Option<&BlockAllocator> {
        self.window_blocks.as_ref()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queues a sequence; its name from now on.
    pub fn enqueue(&mut self, seq: SeqState, data: T) -> SeqId {
        let mut seq = seq;
        seq.arrival = self.arrival();
        let id = self.new_id();
        self.waiting.push_back(Entry { id, seq, data });
        id
    }

    fn new_id(&mut self) -> SeqId {
        self.next_id += 1;
        self.next_id
    }

    /// The running sequences, in plan order.
    pub fn running(&self) -> &[Entry<T>] {
        &self.running
    }

    /// The waiting sequences, next first.
    pub fn waiting(&self) -> impl Iterator<Item = &Entry<T>> {
        self.waiting.iter()
    }

    /// A running sequence.
    pub fn get(&self, id: SeqId) -> Option<&Entry<T>> {
        self.running.iter().find(|e| e.id == id)
    }

    /// A running sequence, to append its sampled tokens or change its data.
    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut Entry<T>> {
        self.running.iter_mut().find(|e| e.id == id)
    }

    /// Every sequence's data, running then waiting.
    pub fn data_mut(&mut self) -> impl Iterator<Item = &mut T> {
        (self.running.iter_mut())
            .chain(self.waiting.iter_mut())
            .map(|e| &mut e.data)
    }

    fn arrival(&mut self) -> u64 {
        self.next_arrival += 1;
        self.next_arrival
    }

    /// Plans the next step: which running sequences feed how many tokens, after
    /// admitting what fits and preempting what must give way.
    pub fn schedule(&mut self) -> Plan {
        let mut chunks = vec![0; self.running.len()];
        let mut plan = Plan::default();
        let mut preempt = vec![false; self.running.len()];
        let mut budget = self.cfg.max_batch_tokens;
        // Decoding sequences first (one token each), then prompts, oldest first.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| {
            (
                self.running[i].seq.pending() > 1,
                self.running[i].seq.arrival,
            )
        });
        for i in order {
            if preempt[i] || budget == 0 {
                continue;
            }
            let chunk = self.running[i].seq.pending().min(budget);
            loop {
                if self.reserve(i, chunk, &mut plan.copies) {
                    chunks[i] = chunk;
                    budget -= chunk;
                    break;
                }
                // Out of blocks: the newest sequence not yet given work gives way.
                let victim = (0..self.running.len())
                    .filter(|&j| j != i && !preempt[j] && chunks[j] == 0)
                    .max_by_key(|&j| self.running[j].seq.arrival)
                    .filter(|&j| self.running[j].seq.arrival > self.running[i].seq.arrival)
                    .unwrap_or(i);
                self.release_blocks(victim);
                preempt[victim] = true;
                if victim == i {
                    break;
                }
            }
        }
        // Move the preempted to the head of the queue, oldest first.
        let mut kept = Vec::with_capacity(self.running.len());
        let mut kept_chunks = Vec::with_capacity(self.running.len());
        let mut back = Vec::new();
        for (entry, (chunk, gone)) in self.running.drain(..).zip(chunks.iter().zip(&preempt)) {
            if *gone {
                back.push(entry);
            } else {
                kept.push(entry);
                kept_chunks.push(*chunk);
            }
        }
        back.sort_by_key(|e| std::cmp::Reverse(e.seq.arrival));
        plan.preempted = back.len();
        self.stats.preemptions += back.len() as u64;
        for e in back {
            self.waiting.push_front(e);
        }
        self.running = kept;
        let mut chunks = kept_chunks;
        // Then admissions, in arrival order, while everything allows (not right after
        // a preemption: the space just freed is what running sequences need next).
        // A sequence whose next prefix block a running one is about to compute waits
        // for it (see `Admission::AwaitsPrefix`); those behind it go on.
        let mut pending = None;
        let mut awaiting = Vec::new();
        while plan.preempted == 0 && budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(mut entry) = self.waiting.pop_front() else {
                break;
            };
            let pending = pending.get_or_insert_with(|| self.pending_blocks());
            match self.admit(&mut entry.seq, pending, &mut plan.copies) {
                Admission::Started => {}
                Admission::AwaitsPrefix => {
                    awaiting.push(entry);
                    continue;
                }
                Admission::NoRoom => {
                    self.waiting.push_front(entry);
                    break;
                }
            }
            pending.extend(self.uncomputed_blocks(&entry.seq));
            let i = self.running.len();
            self.running.push(entry);
            let chunk = self.running[i].seq.pending().min(budget);
            // `admit` checked that blocks for the whole prompt are there.
            let reserved = self.reserve(i, chunk, &mut plan.copies);
            debug_assert!(reserved);
            chunks.push(if reserved { chunk } else { 0 });
            budget -= chunks[i];
            plan.admitted.push(self.running[i].id);
        }
        for entry in awaiting.into_iter().rev() {
            self.waiting.push_front(entry);
        }
        plan.work = self.running.iter().map(|e| e.id).zip(chunks).collect();
        plan
    }

    /// The chain hashes of the full blocks that running sequences know the tokens
    /// of but have not computed yet.
    fn pending_blocks(&self) -> HashSet<u64> {
        (self.running.iter())
            .flat_map(|e| self.uncomputed_blocks(&e.seq))
            .collect()
    }

    /// The chain hashes of `seq`'s full blocks of known tokens past those in the cache.
    fn uncomputed_blocks<'a>(&self, seq: &'a SeqState) -> impl Iterator<Item = u64> + 'a {
        let bs = self.cfg.block_size;
        let mut hash = seq.table.last_hash();
        (seq.table.hashes.len()..seq.tokens.len() / bs).map(move |b| {
            hash = chain_hash(hash, &seq.tokens[b * bs..(b + 1) * bs]);
            hash
        })
    }

    /// Starts `seq` if blocks for all its known tokens (and the next one) are free,
    /// reusing cached full blocks of its prefix; otherwise leaves it as it was.
    /// `pending`: the blocks running sequences are about to compute; `copies`: the
    /// step's block copies, where rows computed by a running sequence are taken.
    fn admit(
        &mut self,
        seq: &mut SeqState,
        pending: &HashSet<u64>,
        copies: &mut Vec<BlockCopy>,
    ) -> Admission {
        debug_assert!(seq.computed == 0 && seq.table.blocks.is_empty());
        let bs = self.cfg.block_size;
        // At least one token must be computed, to have logits to sample from.
        let reusable = (seq.tokens.len() - 1) / bs;
        let mut table = BlockTable::default();
        for b in 0..reusable {
            let chunk = &seq.tokens[b * bs..(b + 1) * bs];
            match self.blocks.lookup(table.last_hash(), chunk) {
                Some((id, hash)) => {
                    table.blocks.push(id);
                    table.hashes.push(hash);
                }
                None if pending.contains(&chain_hash(table.last_hash(), chunk)) => {
                    let window = WindowTable::default();
                    return self.refuse(table, window, Admission::AwaitsPrefix);
                }
                None => break,
            }
        }
        let window = self.window_prefix(&mut table, &seq.tokens);
        let hit = table.blocks.len();
        let end = (seq.tokens.len() + 1).min(self.cfg.max_positions);
        let need = BlockTable::blocks_for(bs, end).saturating_sub(hit);
        let window_need = BlockTable::blocks_for(bs, end.min(hit * bs + self.cfg.max_batch_tokens))
            .saturating_sub(hit);
        let room = self
            .window_blocks
            .as_ref()
            .is_none_or(|w| window_need <= w.available());
        if need > self.blocks.available() || !room {
            return self.refuse(table, window, Admission::NoRoom);
        }
        seq.computed = hit * bs;
        seq.table = table;
        seq.window = window;
        if let Some(from) = self.computed_elsewhere(seq) {
            self.copy_partial(seq, from, copies);
        }
        self.stats.prefix_query_tokens += (seq.tokens.len() - 1) as u64;
        self.stats.prefix_hit_tokens += seq.computed as u64;
        Admission::Started
    }

    /// The windowed layers' blocks for a prefix hit of `table`'s blocks: the cached
    /// blocks of the window before its first uncomputed position. Where some are not
    /// cached, the hit is shortened (its last blocks given back) until they are.
    fn window_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> WindowTable {
        let (bs, mut window) = (self.cfg.block_size, WindowTable::default());
        let (Some(cfg), Some(blocks)) = (self.cfg.window, self.window_blocks.as_mut()) else {
            return window;
        };
        while !table.blocks.is_empty() {
            let hit = table.blocks.len();
            let first = WindowTable::first_visible(bs, cfg.window, hit * bs);
            window.blocks = vec![None; first];
            for b in first..hit {
                let parent = b.checked_sub(1).map_or(ROOT_HASH, |p| table.hashes[p]);
                match blocks.lookup(parent, &tokens[b * bs..(b + 1) * bs]) {
                    Some((id, _)) => window.blocks.push(Some(id)),
                    None => break,
                }
            }
            if window.blocks.len() == hit {
                return window;
            }
            window.held().for_each(|id| blocks.release(id));
            if let (Some(id), Some(_)) = (table.blocks.pop(), table.hashes.pop()) {
                self.blocks.release(id);
            }
        }
        WindowTable::default()
    }

    /// Past `seq`'s cached full blocks, the longest run of its tokens (short of the
    /// last, which must be computed for logits, and within one block) that a running
    /// sequence with the same prefix has computed: that sequence's block (and its
    /// windowed layers' block) and the rows to copy. Identical prompts arriving
    /// together then compute their last partial block once.
    fn computed_elsewhere(&self, seq: &SeqState) -> Option<(BlockId, Option<BlockId>, usize)> {
        let bs = self.cfg.block_size;
        let (hit, start) = (seq.table.blocks.len(), seq.computed);
        let want = &seq.tokens[start..seq.tokens.len() - 1];
        let want = &want[..want.len().min(bs)];
        let mut best: Option<(BlockId, Option<BlockId>, usize)> = None;
        for other in self.running.iter().map(|e| &e.seq) {
            // The same prefix up to `start`: the same chain of full blocks.
            let same_prefix =
                hit == 0 || other.table.hashes.get(hit - 1) == Some(&seq.table.last_hash());
            if !same_prefix || other.computed <= start {
                continue;
            }
            let window = other.window.blocks.get(hit).copied().flatten();
            if self.window_blocks.is_some() && window.is_none() {
                continue; // its windowed layers have moved past that block
            }
            let have = &other.tokens[start..other.computed.min(start + bs)];
            let rows = want.iter().zip(have).take_while(|(a, b)| a == b).count();
            if rows > best.map_or(0, |(_, _, r)| r) {
                best = Some((other.table.blocks[hit], window, rows));
            }
        }
        best
    }

    /// Takes `rows` computed positions of another sequence's block (`from`) into a
    /// block of `seq`'s own, in both pools; nothing where blocks are short.
    fn copy_partial(
        &mut self,
        seq: &mut SeqState,
        (from, window_from, rows): (BlockId, Option<BlockId>, usize),
        copies: &mut Vec<BlockCopy>,
    ) {
        let Some(own) = self.blocks.allocate() else {
            return;
        };
        let mut window_own = None;
        if let (Some(w), Some(_)) = (self.window_blocks.as_mut(), window_from) {
            match w.allocate() {
                Some(id) => window_own = Some(id),
                None => return self.blocks.release(own),
            }
        }
        copies.push(BlockCopy {
            windowed: false,
            from,
            to: own,
            rows,
        });
        seq.table.blocks.push(own);
        if let (Some(from), Some(to)) = (window_from, window_own) {
            copies.push(BlockCopy {
                windowed: true,
                from,
                to,
                rows,
            });
            seq.window.blocks.push(Some(to));
        }
        seq.computed += rows;
    }

    /// Gives back the cached blocks an admission had taken.
    fn refuse(&mut self, table: BlockTable, window: WindowTable, why: Admission) -> Admission {
        for id in table.blocks {
            self.blocks.release(id);
        }
        if let Some(w) = self.window_blocks.as_mut() {
            window.held().for_each(|id| w.release(id));
        }
        why
    }

    /// Makes sure running sequence `i` has blocks for its next `chunk` positions, and
    /// its own copy of a shared block it is about to write, in both pools. False: out
    /// of blocks (the blocks taken so far stay with the sequence).
    fn reserve(&mut self, i: usize, chunk: usize, copies: &mut Vec<BlockCopy>) -> bool {
        let bs = self.cfg.block_size;
        let seq = &mut self.running[i].seq;
        let need = BlockTable::blocks_for(bs, seq.computed + chunk);
        let (first, rows) = (seq.computed / bs, seq.computed % bs);
        if rows > 0 {
            let shared = seq.table.blocks[first];
            if self.blocks.is_shared(shared) {
                let Some(own) = self.blocks.allocate() else {
                    return false;
                };
                copies.push(BlockCopy {
                    windowed: false,
                    from: shared,
                    to: own,
                    rows,
                });
                self.blocks.release(shared);
                seq.table.blocks[first] = own;
            }
        }
        while seq.table.blocks.len() < need {
            match self.blocks.allocate() {
                Some(id) => seq.table.blocks.push(id),
                None => return false,
            }
        }
        let Some(w) = self.window_blocks.as_mut() else {
            return true;
        };
        if let Some(shared) = seq.window.blocks.get(first).copied().flatten() {
            if rows > 0 && w.is_shared(shared) {
                let Some(own) = w.allocate() else {
                    return false;
                };
                copies.push(BlockCopy {
                    windowed: true,
                    from: shared,
                    to: own,
                    rows,
                });
                w.release(shared);
                seq.window.blocks[first] = Some(own);
            }
        }
        while seq.window.blocks.len() < need {
            match w.allocate() {
                Some(id) => seq.window.blocks.push(Some(id)),
                None => return false,
            }
        }
        true
    }

    fn release_blocks(&mut self, i: usize) {
        let seq = &mut self.running[i].seq;
        // Last block first: under pressure the end of a prefix is evicted before its
        // start, which more requests share.
        for id in seq.table.blocks.drain(..).rev() {
            self.blocks.release(id);
        }
        if let Some(w) = self.window_blocks.as_mut() {
            for id in seq.window.blocks.drain(..).rev().flatten() {
                w.release(id);
            }
        }
        seq.table.hashes.clear();
        seq.computed = 0;
    }

    /// Records a step's work: positions computed, full blocks entered in the prefix
    /// index (in both pools), and the windowed layers' blocks that the next query
    /// no longer sees given back.
    pub fn commit(&mut self, plan: &Plan) {
        let bs = self.cfg.block_size;
        for (id, chunk) in plan.chunks() {
            let Some(entry) = self.running.iter_mut().find(|e| e.id == id) else {
                continue;
            };
            let seq = &mut entry.seq;
            seq.computed += chunk;
            while seq.table.hashes.len() < seq.computed / bs {
                let b = seq.table.hashes.len();
                let (parent, tokens) = (seq.table.last_hash(), &seq.tokens[b * bs..(b + 1) * bs]);
                let hash = self.blocks.register(seq.table.blocks[b], parent, tokens);
                seq.table.hashes.push(hash);
                let window = seq.window.blocks.get(b).copied().flatten();
                if let (Some(w), Some(id)) = (self.window_blocks.as_mut(), window) {
                    w.register(id, parent, tokens);
                }
            }
            if let (Some(cfg), Some(w)) = (self.cfg.window, self.window_blocks.as_mut()) {
                let first = WindowTable::first_visible(bs, cfg.window, seq.computed);
                for slot in seq.window.blocks.iter_mut().take(first) {
                    if let Some(id) = slot.take() {
                        w.release(id);
                    }
                }
            }
        }
    }

    /// Removes running sequence `id` and frees its blocks.
    pub fn finish(&mut self, id: SeqId) -> Option<Entry<T>> {
        let i = self.running.iter().position(|e| e.id == id)?;
        self.release_blocks(i);
        Some(self.running.remove(i))
    }

    /// Removes the sequence whose data matches, running or waiting.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> Option<Entry<T>> {
        if let Some(e) = self.running.iter().find(|e| pred(&e.data)) {
            return self.finish(e.id);
        }
        let i = self.waiting.iter().position(|e| pred(&e.data))?;
        self.waiting.remove(i)
    }

    /// Removes every sequence, running then waiting, freeing their blocks.
    pub fn drain(&mut self) -> Vec<Entry<T>> {
        for i in 0..self.running.len() {
            self.release_blocks(i);
        }
        let mut all: Vec<Entry<T>> = self.running.drain(..).collect();
        all.extend(self.waiting.drain(..));
        all
    }

    /// A new running sequence that shares everything running sequence `parent` has
    /// so far (its blocks are shared until one of them writes: copy on write).
    pub fn fork(&mut self, parent: SeqId, data: T) -> Option<SeqId> {
        let mut seq = self.get(parent)?.seq.clone();
        for &block in &seq.table.blocks {
            self.blocks.retain(block);
        }
        if let Some(w) = self.window_blocks.as_mut() {
            seq.window.held().for_each(|id| w.retain(id));
        }
        seq.arrival = self.arrival();
        let id = self.new_id();
        self.running.push(Entry { id, seq, data });
        Some(id)
    }

    /// Positions in the cache over all running sequences.
    pub fn computed_tokens(&self) -> usize {
        self.running.iter().map(|e| e.seq.computed).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_running: usize, budget: usize, blocks: usize) -> Scheduler<u32> {
        Scheduler::new(SchedulerConfig {
            max_running,
            max_batch_tokens: budget,
            num_blocks: blocks,
            block_size: 4,
            max_positions: 64,
            window: None,
        })
    }

    /// Runs a step as the engine would: commit, then "sample" a token for every
    /// sequence whose known tokens are all computed.
    fn step(s: &mut Scheduler<u32>) -> Plan {
        let plan = s.schedule();
        s.commit(&plan);
        push_where_computed(s, 99);
        plan
    }

    fn push_where_computed(s: &mut Scheduler<u32>, token: u32) {
        let ids: Vec<SeqId> = s.running().iter().map(|e| e.id).collect();
        for id in ids {
            let e = s.get_mut(id).unwrap();
            if e.seq.pending() == 0 {
                e.seq.tokens.push(token);
            }
        }
    }

    /// Each running sequence's tokens in the plan, in plan order.
    fn chunks(plan: &Plan) -> Vec<usize> {
        plan.work.iter().map(|w| w.1).collect()
    }

    /// Finishes the running sequence at position `i`.
    fn finish_at(s: &mut Scheduler<u32>, i: usize) {
        let id = s.running()[i].id;
        s.finish(id).unwrap();
    }

    #[test]
    fn long_prompts_are_chunked_and_decodes_go_first() {
        let mut s = sched(4, 8, 16);
        s.enqueue(SeqState::new(vec![1; 3]), 0);
        assert_eq!(chunks(&step(&mut s)), vec![3]);
        s.enqueue(SeqState::new(vec![2; 20]), 1);
        // The decode gets its token; the new prompt gets the rest of the budget.
        assert_eq!(chunks(&step(&mut s)), vec![1, 7]);
        assert_eq!(chunks(&step(&mut s)), vec![1, 7]);
        assert_eq!(chunks(&step(&mut s)), vec![1, 6]);
        assert_eq!(chunks(&step(&mut s)), vec![1, 1]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
        // 4 blocks of 4 positions; two sequences of 6 tokens take 2 blocks each.
        let mut s = sched(4, 64, 4);
        s.enqueue(SeqState::new(vec![1; 6]), 0);
        s.enqueue(SeqState::new(vec![2; 6]), 1);
        assert_eq!(chunks(&step(&mut s)), vec![6, 6]);
        // Both decode within their two blocks up to 8 positions; then the older one
        // needs a third block: the newer gives its blocks up and waits at the head.
        assert_eq!(step(&mut s).preempted, 0);
        assert_eq!(step(&mut s).preempted, 0);
        let plan = step(&mut s);
        assert_eq!((plan.preempted, chunks(&plan)), (1, vec![1]));
        assert_eq!(s.running().len(), 1);
        assert_eq!(s.running()[0].data, 0);
        let back = s.waiting().next().unwrap();
        assert_eq!(
            (back.data, back.seq.computed, back.seq.tokens.len()),
            (1, 0, 9)
        );
        assert_eq!(s.blocks().in_use(), 3);
        // The older one took the newer one's last block (evicted first); when it
        // finishes, the newer one comes back from its cached first block.
        finish_at(&mut s, 0);
        let plan = step(&mut s);
        assert_eq!(chunks(&plan), vec![5]);
        assert_eq!(s.stats.prefix_hit_tokens, 4);
    }

    #[test]
    fn a_repeated_prefix_is_reused() {
        let mut s = sched(4, 64, 16);
        s.enqueue(SeqState::new((0..10).collect()), 0);
        step(&mut s);
        finish_at(&mut s, 0);
        assert_eq!(s.blocks().in_use(), 0);
        // Same first 8 tokens (two full blocks), different tail.
        let mut tokens: Vec<u32> = (0..8).collect();
        tokens.extend([50, 51, 52]);
        s.enqueue(SeqState::new(tokens), 1);
        assert_eq!(chunks(&step(&mut s)), vec![3]);
        assert_eq!(s.stats.prefix_hit_tokens, 8);
        assert_eq!(s.running()[0].seq.computed, 11);
    }

    #[test]
    fn a_prefix_about_to_be_computed_is_waited_for_not_computed_twice() {
        let mut s = sched(4, 64, 16);
        // Two requests with one two-block prefix, arriving together; an unrelated one.
        let shared: Vec<u32> = (0..8).collect();
        s.enqueue(SeqState::new([&shared[..], &[50, 51]].concat()), 0);
        s.enqueue(SeqState::new([&shared[..], &[60, 61, 62]].concat()), 1);
        s.enqueue(SeqState::new(vec![7; 5]), 2);
        let data = |v: &mut dyn Iterator<Item = &Entry<u32>>| v.map(|e| e.data).collect::<Vec<_>>();
        // The second waits at the head of the queue; the one behind it starts.
        assert_eq!(chunks(&step(&mut s)), vec![10, 5]);
        assert_eq!(data(&mut s.running().iter()), vec![0, 2]);
        assert_eq!(data(&mut s.waiting()), vec![1]);
        // Then it starts from the first one's cached blocks and computes its own tail.
        assert_eq!(chunks(&step(&mut s)), vec![1, 1, 3]);
        assert_eq!(s.stats.prefix_hit_tokens, 8);
        assert_eq!(
            s.running()[2].seq.table.blocks[..2],
            s.running()[0].seq.table.blocks[..2]
        );
        // A prompt whose prefix is computed over several chunks waits chunk by chunk.
        let mut s = sched(4, 4, 16);
        s.enqueue(SeqState::new((0..12).collect()), 0);
        s.enqueue(SeqState::new((0..12).collect()), 1);
        assert_eq!(chunks(&step(&mut s)), vec![4]);
        assert_eq!(chunks(&step(&mut s)), vec![4]);
        assert_eq!(chunks(&step(&mut s)), vec![4]);
        // Then it takes the two cached blocks, and copies the three rows of the
        // partial third that the first computed: its last token is all it computes.
        let plan = step(&mut s);
        assert_eq!(chunks(&plan), vec![1, 1]);
        let (first, second) = (&s.running()[0].seq.table, &s.running()[1].seq.table);
        let copy = BlockCopy {
            windowed: false,
            from: first.blocks[2],
            to: second.blocks[2],
            rows: 3,
        };
        assert_eq!(plan.copies, vec![copy]);
        assert_ne!(first.blocks[2], second.blocks[2]);
        assert_eq!(s.stats.prefix_hit_tokens, 11);
    }

    #[test]
    fn a_partial_block_is_copied_only_from_the_same_prefix_and_short_of_the_last_token() {
        let mut s = sched(8, 64, 16);
        s.enqueue(SeqState::new(vec![1, 2, 3, 4, 5, 6, 7]), 0);
        step(&mut s);
        // Same first block, then two of three tokens in common: two rows copied.
        s.enqueue(SeqState::new(vec![1, 2, 3, 4, 5, 6, 9, 9]), 1);
        let plan = step(&mut s);
        assert_eq!((chunks(&plan), plan.copies.len()), (vec![1, 2], 1));
        assert_eq!(plan.copies[0].rows, 2);
        // A prompt ending where the other's computed rows go on: its last token is
        // still computed.
        s.enqueue(SeqState::new(vec![1, 2, 3, 4, 5, 6]), 2);
        let plan = step(&mut s);
        assert_eq!(chunks(&plan), vec![1, 1, 1]);
        assert_eq!(plan.copies[0].rows, 1);
        // A cached first block of other tokens: the rows after it are not the first
        // sequence's, though the tokens there agree.
        s.enqueue(SeqState::new(vec![9, 9, 9, 9, 0]), 3);
        step(&mut s);
        s.enqueue(SeqState::new(vec![9, 9, 9, 9, 5, 6, 7, 8]), 4);
        let plan = step(&mut s);
        assert_eq!((chunks(&plan)[4], plan.copies.len()), (4, 0));
        assert_eq!(
            s.running()[4].seq.table.hashes[0],
            s.running()[3].seq.table.hashes[0]
        );
    }

    #[test]
    fn forks_share_blocks_and_copy_the_partial_one_before_writing() {
        let mut s = sched(4, 64, 8);
        s.enqueue(SeqState::new(vec![1; 6]), 0);
        let plan = s.schedule();
        assert_eq!(chunks(&plan), vec![6]);
        s.commit(&plan);
        s.fork(s.running()[0].id, 1).unwrap();
        assert_eq!(s.blocks().in_use(), 2, "the fork shares both blocks");
        push_where_computed(&mut s, 7);
        let plan = s.schedule();
        assert_eq!(chunks(&plan), vec![1, 1]);
        // The first writer into the shared partial block got its own copy; the
        // full block stays shared.
        assert_eq!(plan.copies.len(), 1);
        assert_eq!(plan.copies[0].rows, 2);
        assert_eq!(
            s.running()[0].seq.table.blocks[0],
            s.running()[1].seq.table.blocks[0]
        );
        assert_ne!(
            s.running()[0].seq.table.blocks[1],
            s.running()[1].seq.table.blocks[1]
        );
        finish_at(&mut s, 1);
        finish_at(&mut s, 0);
        assert_eq!(s.blocks().in_use(), 0);
    }

    #[test]
    fn admission_waits_for_blocks_and_sequence_slots() {
        let mut s = sched(1, 64, 16);
        s.enqueue(SeqState::new(vec![1; 4]), 0);
        s.enqueue(SeqState::new(vec![2; 4]), 1);
        step(&mut s);
        assert_eq!((s.running().len(), s.waiting().count()), (1, 1));
        finish_at(&mut s, 0);
        step(&mut s);
        assert_eq!(s.running()[0].data, 1);
        let mut s = sched(4, 64, 2);
        s.enqueue(SeqState::new(vec![1; 6]), 0);
        s.enqueue(SeqState::new(vec![2; 6]), 1);
        step(&mut s);
        assert_eq!(
            (s.running().len(), s.waiting().count()),
            (1, 1),
            "no blocks for the second"
        );
    }

    fn windowed(max_running: usize, budget: usize, blocks: usize, window: usize) -> Scheduler<u32> {
        Scheduler::new(SchedulerConfig {
            max_running,
            max_batch_tokens: budget,
            num_blocks: blocks,
            block_size: 4,
            max_positions: 4096,
            window: Some(WindowConfig {
                window,
                num_blocks: blocks,
            }),
        })
    }

    fn window_in_use(s: &Scheduler<u32>) -> usize {
        s.window_blocks().map_or(0, BlockAllocator::in_use)
    }

    #[test]
    fn windowed_layers_hold_only_what_the_next_query_sees() {
        let mut s = windowed(2, 8, 1024, 6);
        s.enqueue(SeqState::new(vec![7; 30]), 0);
        while s.running().first().is_none_or(|e| e.seq.computed < 200) {
            step(&mut s);
            let seq = &s.running()[0].seq;
            // The next query (at `computed`) sees positions computed - 5 ..: blocks
            // from (computed - 5) / 4 on, and none before.
            let first = WindowTable::first_visible(4, 6, seq.computed);
            assert!(seq.window.blocks[..first].iter().all(Option::is_none));
            assert!(seq.window.blocks[first..].iter().all(Option::is_some));
            assert!(window_in_use(&s) <= 6usize.div_ceil(4) + 1 + 8 / 4);
            assert_eq!(s.blocks().in_use(), seq.table.blocks.len());
        }
        // Its slots there: each visible position in a held block, the older ones
        // pointing at the first held position.
        let seq = &s.running()[0].seq;
        let slots = seq.window.slots(4, seq.computed);
        let first = WindowTable::first_visible(4, 6, seq.computed) * 4;
        assert!(slots[..first].iter().all(|&x| x == slots[first]));
        finish_at(&mut s, 0);
        assert_eq!((s.blocks().in_use(), window_in_use(&s)), (0, 0));
    }

    #[test]
    fn gemma_3_at_8k_tokens_holds_under_30_percent_of_full_attention() {
        // Gemma 3 270M: 18 layers, 15 of them with a 512-position window; 256-token
        // steps, 16-position blocks.
        let mut s = Scheduler::<u32>::new(SchedulerConfig {
            max_running: 1,
            max_batch_tokens: 256,
            num_blocks: 600,
            block_size: 16,
            max_positions: 8192,
            window: Some(WindowConfig {
                window: 512,
                num_blocks: 60,
            }),
        });
        s.enqueue(SeqState::new(vec![3; 8191]), 0);
        // Blocks held at the busiest moment of each step (scheduled, not yet
        // committed), in layer-blocks, against full attention's for the same positions.
        let mut ratio = 0.0;
        while s.running().first().is_none_or(|e| e.seq.computed < 8192) {
            let plan = s.schedule();
            let held = 3 * s.blocks().in_use() + 15 * window_in_use(&s);
            s.commit(&plan);
            push_where_computed(&mut s, 99);
            let full = 18 * s.running()[0].seq.computed.div_ceil(16);
            ratio = held as f64 / full as f64;
        }
        assert!(
            ratio > 0.2 && ratio <= 0.30,
            "{ratio:.3} of full attention's KV memory"
        );
    }

    #[test]
    fn a_prefix_is_reused_with_the_windowed_blocks_of_its_last_window() {
        let mut s = windowed(4, 64, 64, 6);
        let prompt: Vec<u32> = (0..21).collect();
        s.enqueue(SeqState::new(prompt.clone()), 0);
        step(&mut s);
        finish_at(&mut s, 0);
        // All 5 full blocks are cached in the others' pool, and the windowed pool
        // still holds the last window's (nothing needed the room).
        s.enqueue(SeqState::new(prompt.clone()), 1);
        let plan = step(&mut s);
        assert_eq!(chunks(&plan), vec![1]);
        let seq = &s.running()[0].seq;
        assert_eq!(seq.table.blocks.len(), 6);
        assert!(seq.window.blocks[..3].iter().all(Option::is_none));
        finish_at(&mut s, 0);
        // With the windowed blocks evicted (other prompts took the room), the hit
        // shrinks to what both pools have: here nothing.
        let mut s2 = windowed(4, 64, 64, 6);
        s2.enqueue(SeqState::new(prompt.clone()), 0);
        step(&mut s2);
        finish_at(&mut s2, 0);
        let w = s2.window_blocks.as_mut().unwrap();
        while w.allocate().is_some() {}
        let held: Vec<BlockId> = (0..64).collect();
        held.iter().for_each(|&id| w.release(id));
        s2.enqueue(SeqState::new(prompt), 1);
        let plan = step(&mut s2);
        assert_eq!(chunks(&plan), vec![21]);
        assert_eq!(s2.stats.prefix_hit_tokens, 0);
    }

    #[test]
    fn forks_share_windowed_blocks_and_copy_the_partial_one() {
        let mut s = windowed(4, 64, 16, 6);
        s.enqueue(SeqState::new(vec![1; 6]), 0);
        let plan = s.schedule();
        s.commit(&plan);
        s.fork(s.running()[0].id, 1).unwrap();
        assert_eq!(window_in_use(&s), 2, "the fork shares both windowed blocks");
        push_where_computed(&mut s, 7);
        let plan = s.schedule();
        let windowed: Vec<&BlockCopy> = plan.copies.iter().filter(|c| c.windowed).collect();
        assert_eq!(windowed.len(), 1);
        assert_eq!(windowed[0].rows, 2);
        finish_at(&mut s, 1);
        finish_at(&mut s, 0);
        assert_eq!(window_in_use(&s), 0);
    }
}
