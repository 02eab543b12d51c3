//! The engine thread: takes commands between steps, runs each step (schedule, one
//! forward pass over every sequence's chunk, sampling), and keeps a failure to the
//! requests it comes from.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

use super::output::{advance, Advance, End};
use super::types::*;
use super::Command;
use crate::error::{Error, Result};
use crate::grammar::Constraint;
use crate::kv::{BlockTable, KvPool};
use crate::model::{BatchItem, Logits, Model};
use crate::sample::{log_softmax, top_n, Sampler};
use crate::sched::{Entry, Plan, Scheduler, SeqId, SeqState};
use crate::text::{IncrementalDecoder, StopMatcher, Tokenizer};

/// A choice waiting for its parent's prompt (`n > 1`): it becomes a sequence of its
/// own, sharing the parent's blocks, when the parent samples its first token.
pub(super) struct Fork {
    id: RequestId,
    sink: EventSink,
    sampler: Sampler,
    constraint: Option<Constraint>,
}

/// What the engine keeps per sequence besides its cache state (`sched::SeqState`).
pub(super) struct Request {
    pub(super) id: RequestId,
    pub(super) sink: EventSink,
    pub(super) sampler: Sampler,
    /// The grammar its output is held to, where it has one.
    pub(super) constraint: Option<Constraint>,
    /// Admitted at least once (it no longer counts as waiting, even if preempted).
    pub(super) started: bool,
    pub(super) prompt_len: usize,
    pub(super) generated: usize,
    pub(super) max_tokens: usize,
    pub(super) stop_token_ids: Vec<u32>,
    pub(super) ignore_eos: bool,
    pub(super) logprobs: Option<usize>,
    pub(super) detok: IncrementalDecoder,
    pub(super) stop: StopMatcher,
    pub(super) forks: Vec<Fork>,
}

impl Request {
    /// A sibling choice: the same request with its own id, sink and sampler.
    fn sibling(&self, fork: Fork) -> Self {
        Request {
            id: fork.id,
            sink: fork.sink,
            sampler: fork.sampler,
            constraint: fork.constraint,
            started: true,
            prompt_len: self.prompt_len,
            generated: 0,
            max_tokens: self.max_tokens,
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            detok: IncrementalDecoder::new(),
            stop: self.stop.fresh(),
            forks: Vec::new(),
        }
    }

    pub(super) fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
        }
    }

    /// Sends the last event of a request (and of its unborn siblings) that ends
    /// without a new token.
    fn end(self, reason: FinishReason) {
        let usage = self.usage();
        let last = |sink: &EventSink, usage: Usage| {
            sink.send(Event {
                finish: Some((reason.clone(), usage)),
                ..Default::default()
            });
        };
        last(&self.sink, usage);
        for f in &self.forks {
            let unborn = Usage {
                completion_tokens: 0,
                ..usage
            };
            last(&f.sink, unborn);
        }
    }
}

/// The running sequences with a logits row to sample from, in plan order.
type LogitRows = Vec<(SeqId, Vec<f32>)>;

/// A running sequence that failed, and why.
type Failure = (SeqId, String);

pub(super) struct Worker {
    pub(super) model: Model,
    pub(super) pool: KvPool,
    pub(super) sched: Scheduler<Request>,
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) eos: Vec<u32>,
    pub(super) stats: Arc<EngineStats>,
    /// Test hook (`ZSE_FAULT_TOKEN`): a forward pass over this token fails.
    pub(super) fault_token: Option<u32>,
}

impl Worker {
    pub(super) fn run(mut self, rx: Receiver<Command>) {
        loop {
            if self.sched.is_idle() {
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.finish_all(FinishReason::Cancelled);
                        return;
                    }
                }
            }
            if !self.sched.is_idle() {
                // The whole step runs on a worker of the one rayon pool, so that its
                // serial parts and the parallel kernels share the pool's threads; on
                // a thread of its own the step would compete with workers spinning
                // between kernels (one more runnable thread than cores).
                let outcome =
                    std::panic::catch_unwind(AssertUnwindSafe(|| rayon::scope(|_| self.step())));
                let failure = match outcome {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(panic) => Some(panic_message(&panic)),
                };
                if let Some(msg) = failure {
                    self.finish_running(FinishReason::Error(msg));
                }
            }
            self.publish_stats();
        }
        self.finish_all(FinishReason::Cancelled);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(ids, req, sinks, constraint) => {
                self.enqueue(ids, *req, sinks, constraint)
            }
            Command::Cancel(id) => self.cancel(id),
            Command::Score(tokens, top, reply) => {
                // On the pool like a step; `&mut` because the worker is Send, not Sync.
                let worker = &mut *self;
                let result = std::panic::catch_unwind(AssertUnwindSafe(move || {
                    rayon::scope(move |_| worker.score(&tokens, top))
                }))
                .unwrap_or_else(|p| Err(Error::Compute(panic_message(&p))));
                let _ = reply.send(result);
            }
        }
    }

    fn enqueue(
        &mut self,
        ids: Vec<RequestId>,
        req: GenerationRequest,
        sinks: Vec<EventSink>,
        constraint: Option<Constraint>,
    ) {
        let max_room = self.model.max_positions() - req.prompt.len();
        let max_tokens = req.max_tokens.unwrap_or(max_room).min(max_room);
        let sampler = |i: usize| {
            let mut params = req.sampling.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            Sampler::new(params, &req.prompt)
        };
        let mut choices = ids.into_iter().zip(sinks).enumerate();
        let Some((_, (id, sink))) = choices.next() else {
            return;
        };
        let forks = choices
            .map(|(i, (id, sink))| Fork {
                id,
                sink,
                sampler: sampler(i),
                constraint: constraint.as_ref().map(Constraint::fork),
            })
            .collect();
        let request = Request {
            id,
            sink,
            sampler: sampler(0),
            constraint,
            started: false,
            prompt_len: req.prompt.len(),
            generated: 0,
            max_tokens,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
            detok: IncrementalDecoder::new(),
            stop: StopMatcher::new(req.stop),
            forks,
        };
        self.sched.enqueue(SeqState::new(req.prompt), request);
    }

    fn cancel(&mut self, id: RequestId) {
        for req in self.sched.data_mut() {
            // A choice not yet born leaves its parent's list.
            if let Some(i) = req.forks.iter().position(|f| f.id == id) {
                let f = req.forks.remove(i);
                let usage = Usage {
                    prompt_tokens: req.prompt_len,
                    completion_tokens: 0,
                };
                f.sink.send(Event {
                    finish: Some((FinishReason::Cancelled, usage)),
                    ..Default::default()
                });
                return;
            }
            // A parent with unborn siblings: the first sibling takes its place.
            if req.id == id && !req.forks.is_empty() {
                let next = req.forks.remove(0);
                let old = std::mem::replace(&mut req.sink, next.sink);
                req.sampler = next.sampler;
                req.constraint = next.constraint;
                req.id = next.id;
                old.send(Event {
                    finish: Some((FinishReason::Cancelled, req.usage())),
                    ..Default::default()
                });
                return;
            }
        }
        if let Some(e) = self.sched.remove_where(|r| r.id == id) {
            self.retire(e, FinishReason::Cancelled);
        }
    }

    /// Ends a request that has left the scheduler.
    fn retire(&self, e: Entry<Request>, reason: FinishReason) {
        if !e.data.started {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        self.stats.finished.fetch_add(1, Ordering::Relaxed);
        e.data.end(reason);
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        let st = &self.sched.stats;
        s.running
            .store(self.sched.running().len(), Ordering::Relaxed);
        s.kv_blocks_used
            .store(self.sched.blocks().in_use(), Ordering::Relaxed);
        let window = self.sched.window_blocks().map_or(0, |w| w.in_use());
        s.kv_window_blocks_used.store(window, Ordering::Relaxed);
        s.kv_used_tokens
            .store(self.sched.computed_tokens(), Ordering::Relaxed);
        s.prefix_query_tokens
            .store(st.prefix_query_tokens, Ordering::Relaxed);
        s.prefix_hit_tokens
            .store(st.prefix_hit_tokens, Ordering::Relaxed);
        s.preemptions.store(st.preemptions, Ordering::Relaxed);
    }

    /// Teacher-forced log-probabilities, in a cache of their own.
    fn score(&self, tokens: &[u32], top: usize) -> Result<PositionLogprobs> {
        let bs = self.sched.config().block_size;
        let blocks = BlockTable::blocks_for(bs, tokens.len());
        let pool = self.model.new_kv_pool(blocks, blocks, bs)?;
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        let item = BatchItem::same_slots(tokens, 0, &slots, Logits::All);
        let logits = self
            .model
            .forward(&[item], &pool)?
            .remove(0)
            .ok_or_else(|| Error::Compute("no logits for scoring".into()))?
            .to_vec2::<f32>()?;
        Ok(logits
            .iter()
            .map(|row| top_n(&log_softmax(row), top))
            .collect())
    }

    fn step(&mut self) -> Result<()> {
        let mut plan = self.sched.schedule();
        for &id in &plan.admitted {
            if let Some(e) = self.sched.get_mut(id) {
                if !e.data.started {
                    e.data.started = true;
                    self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        // Published before the step too, so that a caller who sees a step's first
        // event also sees the admission that led to it.
        self.publish_stats();
        for c in &plan.copies {
            self.pool.copy_block(c.windowed, c.from, c.to, c.rows)?;
        }
        let (logits, failed) = self.forward_isolating(&mut plan);
        self.sched.commit(&plan);
        // Sample where every known token is now computed. Unborn siblings are born
        // first, sharing the blocks, and sample from the same logits.
        let mut ends: Vec<(SeqId, End)> = Vec::new();
        let mut rows: Vec<(SeqId, Vec<f32>)> = Vec::with_capacity(logits.len());
        for (id, row) in logits {
            let forks = match self.sched.get_mut(id) {
                Some(e) => std::mem::take(&mut e.data.forks),
                None => continue,
            };
            rows.push((id, row));
            for fork in forks {
                let sibling = match self.sched.get(id) {
                    Some(e) => e.data.sibling(fork),
                    None => break,
                };
                if let Some(child) = self.sched.fork(id, sibling) {
                    let row = rows[rows.len() - 1].1.clone();
                    rows.push((child, row));
                }
            }
        }
        for (id, mut row) in rows {
            let Some(entry) = self.sched.get_mut(id) else {
                continue;
            };
            match advance(&self.tokenizer, &self.eos, &self.model, entry, &mut row) {
                Ok(Advance::Continue) => {}
                Ok(Advance::Finished(last)) => ends.push((id, End::Last(last))),
                Ok(Advance::Gone) => ends.push((id, End::Gone)),
                Err(e) => ends.push((id, End::Failed(e.to_string()))),
            }
        }
        ends.extend(failed.into_iter().map(|(id, msg)| (id, End::Failed(msg))));
        let ended: Vec<_> = (ends.into_iter())
            .filter_map(|(id, end)| Some((self.sched.finish(id)?, end)))
            .collect();
        self.stats
            .finished
            .fetch_add(ended.len() as u64, Ordering::Relaxed);
        // A caller who sees a request's last event sees its sequence and blocks gone.
        self.publish_stats();
        for (e, end) in ended {
            match end {
                End::Last(event) => {
                    e.data.sink.send(event);
                }
                End::Gone => {}
                End::Failed(msg) => e.data.end(FinishReason::Error(msg)),
            }
        }
        Ok(())
    }

    /// The forward pass of a plan, in which a failure fails only the sequences it
    /// comes from. When the batch fails, each sequence's chunk is run alone (its
    /// results do not depend on the batch, so they are the batch's); those that
    /// fail alone are returned with their error, and their work is taken out of
    /// the plan so that nothing they wrote is committed or shared.
    fn forward_isolating(&self, plan: &mut Plan) -> (LogitRows, Vec<Failure>) {
        let failure = match guarded(|| self.forward(plan, None)) {
            Ok(rows) => return (rows, Vec::new()),
            Err(msg) => msg,
        };
        let ran: Vec<SeqId> = plan.chunks().map(|(id, _)| id).collect();
        let mut rows = Vec::new();
        let mut failed = Vec::new();
        if let [only] = ran.as_slice() {
            failed.push((*only, failure));
        } else {
            for &id in &ran {
                match guarded(|| self.forward(plan, Some(id))) {
                    Ok(alone) => rows.extend(alone),
                    Err(msg) => failed.push((id, msg)),
                }
            }
        }
        for &(id, _) in &failed {
            plan.drop_work(id);
        }
        (rows, failed)
    }

    /// The forward pass of a plan (of its sequence `only` where given): the logits
    /// row to sample from of each sequence whose chunk completes every token it
    /// knows.
    fn forward(&self, plan: &Plan, only: Option<SeqId>) -> Result<LogitRows> {
        let bs = self.sched.config().block_size;
        let work: Vec<(&Entry<Request>, usize)> = plan
            .chunks()
            .filter(|&(id, _)| only.is_none_or(|o| o == id))
            .filter_map(|(id, chunk)| Some((self.sched.get(id)?, chunk)))
            .collect();
        if work.is_empty() {
            return Ok(Vec::new());
        }
        let windowed = self.sched.window_blocks().is_some();
        let slots: Vec<(Vec<u32>, Option<Vec<u32>>)> = (work.iter())
            .map(|(e, chunk)| {
                let end = e.seq.computed + chunk;
                let window = windowed.then(|| e.seq.window.slots(bs, end));
                (e.seq.table.slots(bs, end), window)
            })
            .collect();
        let items: Vec<BatchItem<'_>> = (work.iter().zip(&slots))
            .map(|((e, chunk), (slots, window))| {
                let seq = &e.seq;
                let end = seq.computed + chunk;
                BatchItem {
                    tokens: &seq.tokens[seq.computed..end],
                    past: seq.computed,
                    slots,
                    window_slots: window.as_deref().unwrap_or(slots),
                    logits: if end == seq.tokens.len() {
                        Logits::Last
                    } else {
                        Logits::None
                    },
                }
            })
            .collect();
        if let Some(t) = self.fault_token {
            if items.iter().any(|item| item.tokens.contains(&t)) {
                panic!("fault injected by {FAULT_TOKEN_VAR}: the batch holds token {t}");
            }
        }
        let logits = self.model.forward(&items, &self.pool)?;
        let mut rows = Vec::new();
        for ((e, _), l) in work.iter().zip(logits) {
            if let Some(l) = l {
                rows.push((e.id, l.squeeze(0)?.to_vec1::<f32>()?));
            }
        }
        Ok(rows)
    }

    fn finish_running(&mut self, reason: FinishReason) {
        let ids: Vec<SeqId> = self.sched.running().iter().map(|e| e.id).collect();
        for id in ids {
            if let Some(e) = self.sched.finish(id) {
                self.retire(e, reason.clone());
            }
        }
    }

    fn finish_all(&mut self, reason: FinishReason) {
        for e in self.sched.drain() {
            self.retire(e, reason.clone());
        }
        self.publish_stats();
    }
}

/// The environment variable that names a token whose forward pass fails (by a
/// panic, the worst case): how the tests prove that one failing request fails alone.
pub const FAULT_TOKEN_VAR: &str = "ZSE_FAULT_TOKEN";

/// The fault token the environment names, announced on stderr: a server that fails
/// requests on purpose must never pass for a healthy one.
pub(super) fn fault_token() -> Result<Option<u32>> {
    let Ok(v) = std::env::var(FAULT_TOKEN_VAR) else {
        return Ok(None);
    };
    let token = v.trim().parse().map_err(|_| {
        Error::invalid_argument(FAULT_TOKEN_VAR, format!("{v:?} is not a token id"))
    })?;
    eprintln!(
        "WARNING: {FAULT_TOKEN_VAR}={token} is set: every forward pass over token {token} \
         fails on purpose (a test hook). Unset it to serve normally."
    );
    Ok(Some(token))
}

/// Runs `f`, turning an error or a panic into its message.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic_message(&panic)),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error in the engine: {msg}")
}
