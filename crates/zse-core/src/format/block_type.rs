//! GGML's tensor types as a GGUF file names them.
//!
//! candle's `GgmlDType` covers the types candle computes with; the IQ4 types that
//! llama.cpp's `IQ4_NL` and `IQ4_XS` presets write are not among them (candle 0.11
//! refuses such a file). ZSE's kernels repack those from the file's bytes like any
//! other block type, so the reader, the converter and the loader speak this type, and
//! hand candle only what candle holds.

use std::fmt;

use candle_core::quantized::GgmlDType;

/// A tensor's type in a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockType {
    /// A type candle holds.
    Ggml(GgmlDType),
    /// 32 four-bit indices into 16 non-uniform levels, one f16 scale.
    IQ4NL,
    /// 256 values as eight IQ4_NL sub-blocks whose 6-bit scales multiply one f16 scale.
    IQ4XS,
}

/// GGML's type codes (`enum ggml_type`) for the types candle lacks.
const IQ4_NL_CODE: u32 = 20;
const IQ4_XS_CODE: u32 = 23;

impl BlockType {
    /// The type a GGUF tensor entry's code names, if ZSE reads it.
    pub fn from_code(code: u32) -> Option<Self> {
        use GgmlDType::*;
        Some(match code {
            0 => Self::Ggml(F32),
            1 => Self::Ggml(F16),
            2 => Self::Ggml(Q4_0),
            3 => Self::Ggml(Q4_1),
            6 => Self::Ggml(Q5_0),
            7 => Self::Ggml(Q5_1),
            8 => Self::Ggml(Q8_0),
            9 => Self::Ggml(Q8_1),
            10 => Self::Ggml(Q2K),
            11 => Self::Ggml(Q3K),
            12 => Self::Ggml(Q4K),
            13 => Self::Ggml(Q5K),
            14 => Self::Ggml(Q6K),
            15 => Self::Ggml(Q8K),
            IQ4_NL_CODE => Self::IQ4NL,
            IQ4_XS_CODE => Self::IQ4XS,
            30 => Self::Ggml(BF16),
            _ => return None,
        })
    }

    /// The code a GGUF tensor entry stores for this type.
    pub fn code(self) -> u32 {
        use GgmlDType::*;
        match self {
            Self::Ggml(t) => match t {
                F32 => 0,
                F16 => 1,
                Q4_0 => 2,
                Q4_1 => 3,
                Q5_0 => 6,
                Q5_1 => 7,
                Q8_0 => 8,
                Q8_1 => 9,
                Q2K => 10,
                Q3K => 11,
                Q4K => 12,
                Q5K => 13,
                Q6K => 14,
                Q8K => 15,
                BF16 => 30,
            },
            Self::IQ4NL => IQ4_NL_CODE,
            Self::IQ4XS => IQ4_XS_CODE,
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::Ggml(t) => t.block_size(),
            Self::IQ4NL => 32,
            Self::IQ4XS => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::Ggml(t) => t.type_size(),
            // f16 scale, 16 bytes of nibbles.
            Self::IQ4NL => 2 + 16,
            // f16 scale, 2 bytes of the scales' high bits, 4 of their low nibbles,
            // 128 bytes of nibbles.
            Self::IQ4XS => 2 + 2 + 4 + 128,
        }
    }

    /// The candle type, where candle holds this one.
    pub fn candle(self) -> Option<GgmlDType> {
        match self {
            Self::Ggml(t) => Some(t),
            _ => None,
        }
    }

    /// Whether the type rounds weights (as opposed to holding floats).
    pub fn is_quantized(self) -> bool {
        !matches!(
            self,
            Self::Ggml(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        )
    }
}

impl From<GgmlDType> for BlockType {
    fn from(t: GgmlDType) -> Self {
        Self::Ggml(t)
    }
}

impl PartialEq<GgmlDType> for BlockType {
    fn eq(&self, other: &GgmlDType) -> bool {
        *self == Self::Ggml(*other)
    }
}

/// Named as `zse info` has always shown candle's types (`Q4K`, `Q8_0`, `F16`), and
/// the IQ4 types as llama.cpp does.
impl fmt::Display for BlockType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ggml(t) => write!(f, "{t:?}"),
            Self::IQ4NL => f.write_str("IQ4_NL"),
            Self::IQ4XS => f.write_str("IQ4_XS"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        let mut seen = 0;
        for code in 0..64 {
            if let Some(t) = BlockType::from_code(code) {
                assert_eq!(t.code(), code, "{t}");
                seen += 1;
            }
        }
        assert_eq!(seen, 17);
        assert_eq!(BlockType::from_code(20), Some(BlockType::IQ4NL));
        assert_eq!(BlockType::from_code(21), None);
    }

    #[test]
    fn sizes_and_names() {
        assert_eq!(BlockType::IQ4NL.type_size(), 18);
        assert_eq!(BlockType::IQ4XS.type_size(), 136);
        assert_eq!(BlockType::from(GgmlDType::Q4K).type_size(), 144);
        assert_eq!(BlockType::from(GgmlDType::Q4K).to_string(), "Q4K");
        assert_eq!(BlockType::IQ4XS.to_string(), "IQ4_XS");
        assert!(BlockType::IQ4NL.is_quantized());
        assert!(!BlockType::from(GgmlDType::BF16).is_quantized());
        assert_eq!(BlockType::IQ4NL.candle(), None);
    }
}
