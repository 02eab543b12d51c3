//! The limits an engine's options come to: the KV budget in blocks and positions,
//! and the bounds of its queues.

use super::types::*;
use crate::device::GpuMemory;
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// The KV budget on a GPU: `fraction` of its free memory less the weights (the
/// file's size bounds them: they stay as stored).
pub(super) fn gpu_kv_budget(mem: GpuMemory, fraction: f64, weights: usize) -> Result<usize> {
    let usable = (mem.free as f64 * fraction) as usize;
    usable.checked_sub(weights).ok_or_else(|| {
        Error::DeviceUnavailable(format!(
            "the model ({weights} bytes) does not fit {fraction} of the GPU's free memory \
             ({} of {} bytes free)",
            mem.free, mem.total
        ))
    })
}

/// The limits for `opts`: the KV budget in positions (at least one full context
/// when no budget is given per sequence) and the bounds of both queues.
pub(super) fn resolve_limits(
    config: &ModelConfig,
    opts: &EngineOptions,
    context_length: usize,
) -> Result<EngineLimits> {
    if opts.max_running == 0 {
        return Err(Error::invalid_argument("max_running", "must be at least 1"));
    }
    let per_token = 2
        * config.num_layers
        * config.num_kv_heads
        * config.head_dim
        * opts.kv_dtype.size_in_bytes();
    let capacity = match opts.kv_cache_bytes {
        Some(bytes) => bytes / per_token.max(1),
        None => opts.max_running.saturating_mul(context_length),
    };
    // A context needs room for at least one prompt token and one generated token,
    // in whole blocks.
    if capacity < KV_BLOCK_SIZE {
        return Err(Error::invalid_argument(
            "kv_cache_bytes",
            format!(
                "{} bytes hold no useful context: one position takes {per_token} bytes",
                opts.kv_cache_bytes.unwrap_or(0)
            ),
        ));
    }
    Ok(EngineLimits {
        max_running: opts.max_running,
        max_waiting: opts.max_waiting,
        max_batch_tokens: opts.max_batch_tokens.max(opts.max_running),
        kv_blocks: capacity / KV_BLOCK_SIZE,
        kv_block_size: KV_BLOCK_SIZE,
        kv_bytes_per_token: per_token,
    })
}
