//! Writing GGUF containers (what `zse convert` produces).
//!
//! candle's `gguf_file::write` takes only tensors candle can hold, so a file with
//! IQ4 blocks (which ZSE runs, candle does not) could not be converted through it.
//! Here a tensor is its type, shape and bytes; the layout is GGUF version 3 as
//! llama.cpp writes it: header, metadata, tensor entries, then the data, each tensor
//! at a multiple of the alignment.

use std::borrow::Cow;
use std::io::Write;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;

use super::block_type::BlockType;
use crate::error::{Error, Result};

const VERSION: u32 = 3;
/// GGUF's default alignment (no `general.alignment` key is written).
const ALIGNMENT: usize = 32;

/// One tensor to write: its type, its shape in candle's (row-major) order, and its
/// bytes as GGML lays them out.
pub struct TensorData<'a> {
    pub name: &'a str,
    pub dtype: BlockType,
    pub shape: &'a [usize],
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> TensorData<'a> {
    /// A candle tensor's data.
    pub fn of_qtensor(name: &'a str, t: &'a QTensor) -> Result<Self> {
        Ok(TensorData {
            name,
            dtype: t.dtype().into(),
            shape: t.shape().dims(),
            bytes: t.data()?,
        })
    }
}

/// Writes `metadata` and `tensors` as a GGUF file to `w`. A tensor whose byte count
/// does not match its type and shape is an error before anything is written.
pub fn write(
    w: &mut dyn Write,
    metadata: &[(&str, &Value)],
    tensors: &[TensorData<'_>],
) -> Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut header, key);
        header.extend_from_slice(&value_type(value).to_le_bytes());
        value_bytes(&mut header, value)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        let elems: usize = t.shape.iter().product();
        let row = t.shape.last().copied().unwrap_or(1);
        let block = t.dtype.block_size();
        if t.shape.is_empty() || !row.is_multiple_of(block) {
            return Err(Error::Compute(format!(
                "tensor '{}': {:?} does not divide into {} blocks",
                t.name, t.shape, t.dtype
            )));
        }
        let expected = elems / block * t.dtype.type_size();
        if t.bytes.len() != expected {
            return Err(Error::Compute(format!(
                "tensor '{}': {} {:?} needs {expected} bytes, has {}",
                t.name,
                t.dtype,
                t.shape,
                t.bytes.len()
            )));
        }
        string(&mut header, t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.dtype.code().to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += expected.next_multiple_of(ALIGNMENT);
    }
    // The data starts aligned, and so does each tensor's.
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
    let io = |e| Error::io("the output", e);
    w.write_all(&header).map_err(io)?;
    for t in tensors {
        w.write_all(&t.bytes).map_err(io)?;
        let padding = t.bytes.len().next_multiple_of(ALIGNMENT) - t.bytes.len();
        w.write_all(&[0u8; ALIGNMENT][..padding]).map_err(io)?;
    }
    Ok(())
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's code for a metadata value's type (`enum gguf_type`).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn value_bytes(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => string(out, s),
        Value::Array(items) => {
            // GGUF arrays hold one type; an empty one names any (U32, as candle).
            let t = match items.first() {
                Some(first) => value_type(first),
                None => 4,
            };
            for item in items {
                if value_type(item) != t {
                    return Err(Error::Compute(
                        "a GGUF array holds values of one type".into(),
                    ));
                }
            }
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                value_bytes(out, item)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::gguf::GgufFile;
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Tensor};

    #[test]
    fn what_it_writes_reads_back_as_candle_writes_it() {
        let t = Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let iq4: Vec<u8> = (0..2 * 18).map(|i| i as u8).collect();
        let md = [
            ("a.str", Value::String("llama".into())),
            ("a.u32", Value::U32(7)),
            ("a.f32", Value::F32(0.5)),
            ("a.bool", Value::Bool(true)),
            (
                "a.arr",
                Value::Array(vec![Value::String("x".into()), Value::String("yz".into())]),
            ),
            (
                "a.nested",
                Value::Array(vec![Value::Array(vec![Value::I64(-3)])]),
            ),
            ("a.empty", Value::Array(vec![])),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut ours = Vec::new();
        let tensors = [
            TensorData::of_qtensor("w", &q).unwrap(),
            TensorData {
                name: "iq",
                dtype: BlockType::IQ4NL,
                shape: &[2, 32],
                bytes: Cow::Borrowed(&iq4),
            },
        ];
        write(&mut ours, &md_refs, &tensors).unwrap();
        let g = GgufFile::from_bytes("ours", &ours).unwrap();
        assert_eq!(g.metadata.len(), md.len());
        for (k, v) in &md {
            assert_eq!(format!("{:?}", g.get(k).unwrap()), format!("{v:?}"), "{k}");
        }
        let w = g.tensor_info("w").unwrap();
        assert_eq!(
            (w.dtype, w.shape.as_slice()),
            (GgmlDType::Q8_0.into(), &[2, 32][..])
        );
        assert_eq!(g.tensor_bytes(w), &*q.data().unwrap());
        let iq = g.tensor_info("iq").unwrap();
        assert_eq!(iq.dtype, BlockType::IQ4NL);
        assert_eq!(g.tensor_bytes(iq), &iq4[..]);
        assert_eq!(iq.start % ALIGNMENT, 0);

        // The same candle tensors and keys through candle's writer parse alike.
        let mut theirs = std::io::Cursor::new(Vec::new());
        candle_core::quantized::gguf_file::write(&mut theirs, &md_refs, &[("w", &q)]).unwrap();
        let c = GgufFile::from_bytes("candle", theirs.get_ref()).unwrap();
        assert_eq!(format!("{:?}", c.metadata), format!("{:?}", g.metadata));
    }

    #[test]
    fn wrong_byte_counts_and_mixed_arrays_are_errors() {
        let bytes = vec![0u8; 17];
        let t = TensorData {
            name: "iq",
            dtype: BlockType::IQ4NL,
            shape: &[1, 32],
            bytes: Cow::Borrowed(&bytes),
        };
        assert!(write(&mut Vec::new(), &[], &[t]).is_err());
        let mixed = Value::Array(vec![Value::U32(1), Value::I32(1)]);
        assert!(write(&mut Vec::new(), &[("k", &mixed)], &[]).is_err());
    }
}
