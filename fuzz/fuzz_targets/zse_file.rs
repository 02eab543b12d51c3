//! Any bytes as a model file: a value or an error, never a crash
//! (`zse_core::format::fuzz::exercise`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| zse_core::format::fuzz::exercise(data));
