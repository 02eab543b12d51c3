//! Phi-3: the Llama family's layers (NeoX RoPE, SwiGLU) with q/k/v stored as one
//! matrix (`attn_qkv`) and gate and up as one (`ffn_up`, gate rows first).
//!
//! Not supported yet, and refused at load as unexpected tensors: the LongRoPE
//! factors of the 128k-context models (`rope_factors_long`/`_short`).

use super::llama::{load_stored, tensors_stored, Storage};
use super::{Architecture, RopeStyle};

const FUSED: Storage = Storage {
    fused_qkv: true,
    fused_gate_up: true,
};

pub const PHI3: Architecture = Architecture {
    name: "phi3",
    rope_style: RopeStyle::Neox,
    sliding_window: false,
    tensors: |c| tensors_stored(c, FUSED),
    load: |c, l, max_positions| load_stored(c, l, max_positions, FUSED),
};
