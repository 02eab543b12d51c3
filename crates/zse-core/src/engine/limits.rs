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
        kv_bytes: capacity / KV_BLOCK_SIZE * KV_BLOCK_SIZE * per_token,
        kv_window: None,
    })
}

/// Splits the KV budget between the layers that see every earlier position and
/// those that see a sliding window (`windows`: each layer's), which then get a pool
/// of their own: as many blocks as `max_running` sequences can hold there at once
/// (a window and a step's chunk each), and the others the rest of the bytes. A
/// model without windowed layers keeps one pool. With none but windowed layers,
/// the others' blocks cost nothing: they are bookkeeping for the prefix index, as
/// many as full contexts need.
pub(super) fn split_kv(limits: &mut EngineLimits, windows: &[Option<usize>], context: usize) {
    // The widest window, should layers differ: keeping more is always right.
    let Some(window) = windows.iter().flatten().copied().max() else {
        return;
    };
    let bs = limits.kv_block_size;
    let layers = windows.len();
    let windowed = windows.iter().filter(|w| w.is_some()).count();
    let visible = window.div_ceil(bs) + 1;
    let chunk = limits.max_batch_tokens.div_ceil(bs) + 1;
    let window_blocks = (limits.max_running * (visible + chunk)).min(limits.kv_blocks);
    let others = layers - windowed;
    limits.kv_blocks = match others {
        0 => limits.max_running * context.div_ceil(bs),
        _ => (limits.kv_blocks * layers - window_blocks * windowed) / others,
    };
    let layer_block = bs * limits.kv_bytes_per_token / layers;
    limits.kv_bytes = (limits.kv_blocks * others + window_blocks * windowed) * layer_block;
    limits.kv_window = Some(KvWindow {
        window,
        blocks: window_blocks,
        layers: windowed,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(kv_blocks: usize) -> EngineLimits {
        EngineLimits {
            max_running: 4,
            max_waiting: 8,
            max_batch_tokens: 64,
            kv_blocks,
            kv_block_size: 16,
            kv_bytes_per_token: 18 * 1024,
            kv_bytes: kv_blocks * 16 * 18 * 1024,
            kv_window: None,
        }
    }

    #[test]
    fn windowed_layers_get_what_running_sequences_hold_and_the_others_the_rest() {
        // Gemma 3's pattern: every sixth layer sees everything.
        let windows: Vec<Option<usize>> = (0..18).map(|i| (i % 6 != 5).then_some(512)).collect();
        let mut l = limits(1000);
        let bytes = l.kv_bytes;
        split_kv(&mut l, &windows, 4096);
        // 4 sequences x (33 blocks of window + 5 of a step's chunk).
        let w = l.kv_window.expect("a windowed pool");
        assert_eq!((w.window, w.layers, w.blocks), (512, 15, 4 * 38));
        assert_eq!(l.kv_blocks, (1000 * 18 - 152 * 15) / 3);
        assert!(l.kv_bytes <= bytes && l.kv_bytes > bytes - 3 * 16 * 1024);
        // No windowed layer: nothing changes.
        let mut plain = limits(1000);
        split_kv(&mut plain, &[None; 18], 4096);
        assert_eq!(plain, limits(1000));
        // Every layer windowed (Mistral): the others' blocks are bookkeeping.
        let mut all = limits(1000);
        split_kv(&mut all, &[Some(512); 4], 4096);
        assert_eq!(all.kv_blocks, 4 * 256);
        assert_eq!(all.kv_bytes, 152 * 4 * 16 * 1024 * 18 / 4);
    }
}
