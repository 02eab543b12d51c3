//! A sampled token into what the caller receives: its text (held back while it may
//! be an incomplete character or the start of a stop string), logprobs, and the end
//! of the request (a stop token or string, a length limit, the caller gone).

use super::types::*;
use super::worker::Request;
use crate::error::Result;
use crate::model::Model;
use crate::sched::Entry;
use crate::text::stop::StopStatus;
use crate::text::Tokenizer;

/// Samples the next token of a sequence, sends its event (or returns it, when it is
/// the last), and says whether it ended.
pub(super) fn advance(
    tokenizer: &Tokenizer,
    eos: &[u32],
    model: &Model,
    entry: &mut Entry<Request>,
    logits: &mut [f32],
) -> Result<Advance> {
    let req = &mut entry.data;
    let allowed = req.constraint.as_mut().map(|c| c.allowed()).transpose()?;
    let s = req.sampler.sample_masked(logits, req.logprobs, |l| {
        if let Some(a) = &allowed {
            a.apply(l)
        }
    });
    let token = s.token;
    req.generated += 1;
    let mut ev = Event {
        tokens: vec![token],
        ..Default::default()
    };
    if let Some(lp) = s.logprob {
        ev.logprobs.push(TokenLogprob {
            token,
            logprob: lp,
            top: s.top,
        });
    }
    let is_stop_token =
        !req.ignore_eos && (eos.contains(&token) || req.stop_token_ids.contains(&token));
    // A grammar that is complete ends the output with this token: nothing but
    // end-of-sequence could follow.
    let grammar_done = match &mut req.constraint {
        Some(c) if !is_stop_token => c.commit(token)?,
        _ => false,
    };
    let mut reason = None;
    if is_stop_token {
        reason = Some(FinishReason::Stop);
    } else {
        let delta = req.detok.push(tokenizer, token)?;
        match req.stop.push(&delta) {
            StopStatus::Continue(t) => ev.text = t,
            StopStatus::Stopped(t) => {
                ev.text = t;
                reason = Some(FinishReason::Stop);
            }
        }
    }
    let context_full = req.prompt_len + req.generated >= model.max_positions();
    if reason.is_none() && grammar_done {
        reason = Some(FinishReason::Stop);
    }
    if reason.is_none() && (req.generated >= req.max_tokens || context_full) {
        reason = Some(FinishReason::Length);
    }
    let ended_by_token = is_stop_token || grammar_done;
    if reason.is_some() && (ended_by_token || reason == Some(FinishReason::Length)) {
        // Ended by a token or a limit: release the text still held back (an
        // incomplete character, a possible stop-string prefix), unless it
        // completes a stop string after all.
        let rest = req.detok.flush(tokenizer)?;
        match req.stop.push(&rest) {
            StopStatus::Continue(t) => {
                ev.text.push_str(&t);
                ev.text.push_str(&req.stop.flush());
            }
            StopStatus::Stopped(t) => {
                ev.text.push_str(&t);
                reason = Some(FinishReason::Stop);
            }
        }
    }
    if let Some(r) = &reason {
        ev.finish = Some((r.clone(), req.usage()));
    }
    entry.seq.tokens.push(token);
    if reason.is_some() {
        return Ok(Advance::Finished(ev));
    }
    if !req.sink.send(ev) {
        return Ok(Advance::Gone);
    }
    Ok(Advance::Continue)
}

pub(super) enum Advance {
    Continue,
    /// The sequence ended; its last event is sent once it has left the scheduler.
    Finished(Event),
    /// The caller dropped its receiver: stop computing for it.
    Gone,
}

/// How a running sequence left in a step.
pub(super) enum End {
    /// Finished: its last event, to send.
    Last(Event),
    /// Its caller went away.
    Gone,
    /// Its computation failed.
    Failed(String),
}
