//! The model-file parser under hostile input: `exercise` is what the cargo-fuzz target
//! (`fuzz/fuzz_targets/zse_file.rs`) runs on every input, and what the bounded test
//! below runs on mutations of a valid file in every `cargo test`. Any input must give
//! a value or an error, never a panic.

use candle_core::Device;

use super::gguf::GgufFile;
use super::zse::ZseFile;

/// Parses `data` as GGUF, loads every tensor it lists, and reads it as a `.zse` file.
pub fn exercise(data: &[u8]) {
    if let Ok(g) = GgufFile::from_bytes("input", data) {
        for t in &g.tensors {
            let _ = g.qtensor(&t.name, &Device::Cpu);
        }
    }
    let _ = ZseFile::from_bytes("input", data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::Tensor;

    /// A small valid file with metadata of several types and three tensors.
    fn seed() -> Vec<u8> {
        let t = Tensor::arange(0f32, 256., &Device::Cpu)
            .unwrap()
            .reshape((4, 64))
            .unwrap();
        let q8 = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let q4 = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let row = Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((1, 64))
            .unwrap();
        let f = QTensor::quantize(&row, GgmlDType::F32).unwrap();
        let (a, b, c) = (
            gguf_file::Value::String("llama".into()),
            gguf_file::Value::U64(7),
            gguf_file::Value::Array(vec![gguf_file::Value::U32(1), gguf_file::Value::U32(2)]),
        );
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(
            &mut out,
            &[
                ("general.architecture", &a),
                ("zse.format_version", &b),
                ("zse.eos_token_ids", &c),
            ],
            &[("w8", &q8), ("w4", &q4), ("f", &f)],
        )
        .unwrap();
        out.into_inner()
    }

    /// Inputs the fuzz target once crashed on, kept as regressions (hex).
    const FOUND: &[&str] = &[
        // A zero dimension beside two whose product overflows: candle multiplied
        // the shape in the other order.
        "474755460300000001000000000000000000000000000000010000000000000000040000\
         000000000000000000020000000000474755460300000001000080000000000400000000\
         000000000000000000000000000000010b000000000000000000000000000000000000\
         000000000000000506000000000000000004000000",
    ];

    #[test]
    fn inputs_the_fuzzer_found_are_errors() {
        for hex in FOUND {
            let hex: String = hex.split_whitespace().collect();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            assert!(GgufFile::from_bytes("found", &bytes).is_err());
            exercise(&bytes);
        }
    }

    #[test]
    fn mutated_files_give_errors_not_panics() {
        let base = seed();
        exercise(&base);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut b = base.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % b.len();
                match next() % 4 {
                    0 => b[at] ^= 1 << (next() % 8),
                    1 => b[at] = 0xFF,
                    // A large little-endian count or length where one may be.
                    2 => {
                        let end = (at + 8).min(b.len());
                        b[at..end].copy_from_slice(&u64::MAX.to_le_bytes()[..end - at]);
                    }
                    _ => b.truncate(at),
                }
                if b.is_empty() {
                    break;
                }
            }
            exercise(&b);
        }
    }
}
