//! A bounds-checked reader for GGUF containers over a memory map.
//!
//! candle ships a GGUF reader, but it trusts the lengths it reads (a flipped bit in a
//! string length becomes a multi-exabyte allocation and an abort). Every length and
//! offset here is checked against the bytes that are actually there, so a truncated or
//! corrupt file is an `Error::InvalidFile`, never a crash. Tensor types are
//! `BlockType`s, so the IQ4 types candle lacks are read too; writing is `gguf_write`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;

use super::block_type::BlockType;
use crate::error::{Error, Result};
use crate::kernels::weights::dequantize;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nested arrays deeper than this are not something any real file contains.
const MAX_ARRAY_DEPTH: usize = 4;
const MAX_DIMS: usize = 4;

/// One tensor's entry in the header. `shape` is in candle's (row-major) order, the
/// reverse of the `ne` order GGUF stores.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: BlockType,
    /// Byte range of the tensor's data inside the file.
    pub start: usize,
    pub len: usize,
}

/// A parsed GGUF file whose tensor data stays in the memory map until asked for.
pub struct GgufFile {
    path: String,
    map: memmap2::Mmap,
    /// Bytes of the file (an anonymous map of an empty buffer holds one byte).
    len: usize,
    /// Whether the map is of a file (whose dropped pages come back from it).
    file_backed: bool,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_without(path, |_| false)
    }

    /// As `open`, with the metadata keys `skip` names passed over unread (checked
    /// for bounds, never built: no allocation for what the caller does not use).
    pub fn open_without(path: &Path, skip: fn(&str) -> bool) -> Result<Self> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::io(&shown, e))?;
        // SAFETY: the map is read-only and private to this process; a file truncated
        // underneath us by another process is the one hazard mmap cannot rule out.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&shown, e))?;
        let len = map.len();
        Self::from_map(shown, map, len, true, skip)
    }

    /// A file held in memory (the fuzz target and tests), named `name` in errors.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        let io = |e| Error::io(name, e);
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(io)?;
        map[..bytes.len()].copy_from_slice(bytes);
        let map = map.make_read_only().map_err(io)?;
        Self::from_map(name.to_string(), map, bytes.len(), false, |_| false)
    }

    /// The file in the first `len` bytes of `map`.
    fn from_map(
        shown: String,
        map: memmap2::Mmap,
        len: usize,
        file_backed: bool,
        skip: fn(&str) -> bool,
    ) -> Result<Self> {
        let (version, metadata, tensors) =
            parse(&map[..len], skip).map_err(|message| Error::invalid_file(&shown, message))?;
        let file = Self {
            path: shown,
            map,
            len,
            file_backed,
            version,
            metadata,
            tensors,
        };
        // The header is parsed into owned values: its pages (for a `.zse` file, the
        // tokenizer's JSON, megabytes) are not needed again while the weights load.
        let header = file.tensors.iter().map(|t| t.start).min().unwrap_or(len);
        file.drop_pages(0..header);
        Ok(file)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn file_size(&self) -> usize {
        self.len
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, exactly as stored.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.len]
    }

    /// Loads a tensor into a `QTensor` on `device`, keeping its block type where
    /// candle holds it; a type candle lacks (IQ4) comes dequantized to F32, exactly
    /// (ZSE's CPU kernels read those from `tensor_bytes` instead).
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let info = self.tensor_info(name).ok_or_else(|| {
            Error::invalid_file(&self.path, format!("tensor '{name}' is missing"))
        })?;
        let bytes = self.tensor_bytes(info);
        let t = match info.dtype.candle() {
            Some(dtype) => qtensor_from_ggml(dtype, bytes, info.shape.clone(), device)?,
            None => {
                let values = dequantize(info.dtype, &info.shape, bytes)?;
                let t = candle_core::Tensor::from_vec(values, info.shape.clone(), device)?;
                QTensor::quantize(&t, GgmlDType::F32)?
            }
        };
        self.release(info, 0..info.len);
        Ok(t)
    }

    /// Drops the pages of bytes `range` of a tensor's data from this process's memory
    /// once they have been copied, so that loading never holds the whole file and the
    /// whole model at once (the peak resident size would be twice the model's). A
    /// failure only costs memory.
    pub fn release(&self, info: &TensorInfo, range: std::ops::Range<usize>) {
        let start = info.start + range.start;
        let len = range.len().min(info.len.saturating_sub(range.start));
        self.drop_pages(start..start + len);
    }

    /// Drops the pages of the file's bytes `range` from this process's memory (see
    /// `release`).
    fn drop_pages(&self, range: std::ops::Range<usize>) {
        // Dropped pages of an anonymous map would come back as zeros.
        if !self.file_backed || range.is_empty() {
            return;
        }
        #[cfg(unix)]
        // SAFETY: the map is a shared, read-only mapping of the file: a dropped page
        // is read again from the file if anything touches it, with the same bytes
        // (the hazard of a file changed underneath is the one noted in `open`).
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.len(),
            )
        };
        #[cfg(not(unix))]
        let _ = range;
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        value_as_u64(self.metadata.get(key)?)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        match self.metadata.get(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            other => value_as_u64(other).map(|v| v as f64),
        }
    }
}

pub fn value_as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        Value::Bool(x) => Some(x as u64),
        _ => None,
    }
}

/// A cursor over the file's bytes whose every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type ParseResult<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> ParseResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "file is truncated: {what} at byte {} needs {n} bytes",
                    self.pos
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> ParseResult<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in what is left of the file, each item taking at least
    /// `min_item_bytes`: this is what stops a corrupt count from allocating wildly.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> ParseResult<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err(format!(
                "{what} is {n}, more than the file can hold (corrupt header?)"
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> ParseResult<String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, type_code: u32, depth: usize) -> ParseResult<Value> {
        Ok(match type_code {
            0 => Value::U8(self.array::<1>("u8 value")?[0]),
            1 => Value::I8(self.array::<1>("i8 value")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("u16 value")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("i16 value")?)),
            4 => Value::U32(self.u32("u32 value")?),
            5 => Value::I32(i32::from_le_bytes(self.array("i32 value")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("f32 value")?)),
            7 => match self.array::<1>("bool value")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("invalid bool byte {b}")),
            },
            8 => Value::String(self.string("string value")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err("arrays nested too deeply".into());
                }
                let item_type = self.u32("array item type")?;
                let n = self.count("array length", 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("u64 value")?),
            11 => Value::I64(i64::from_le_bytes(self.array("i64 value")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("f64 value")?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }

    /// Moves past a value as `value` would read it, building nothing.
    fn skip(&mut self, type_code: u32, depth: usize) -> ParseResult<()> {
        let fixed = |t: u32| match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match type_code {
            8 => {
                let n = self.count("string value", 1)?;
                self.take(n, "string value")?;
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err("arrays nested too deeply".into());
                }
                let item_type = self.u32("array item type")?;
                let n = self.count("array length", 1)?;
                match fixed(item_type) {
                    // Within the file: `count` checked n bytes, so n * 8 cannot overflow.
                    Some(size) => drop(self.take(n * size, "array")?),
                    None => {
                        for _ in 0..n {
                            self.skip(item_type, depth + 1)?;
                        }
                    }
                }
            }
            t => match fixed(t) {
                Some(size) => drop(self.take(size, "value")?),
                None => return Err(format!("unknown metadata value type {t}")),
            },
        }
        Ok(())
    }
}

type Parsed = (u32, BTreeMap<String, Value>, Vec<TensorInfo>);

fn parse(buf: &[u8], skip: fn(&str) -> bool) -> ParseResult<Parsed> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r
        .take(4, "magic")
        .map_err(|_| "file is too small to be a GGUF/ZSE file".to_string())?;
    if magic != GGUF_MAGIC {
        return Err("not a GGUF/ZSE file (wrong magic bytes)".into());
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (supported: 2, 3)"
        ));
    }
    // A tensor entry takes at least 8 (name length) + 4 + 8 + 4 + 8 bytes.
    let n_tensors = r.count("tensor count", 32)?;
    let n_kv = r.count("metadata count", 12)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let t = r.u32("metadata type")?;
        if skip(&key) {
            r.skip(t, 0).map_err(|e| format!("metadata '{key}': {e}"))?;
            continue;
        }
        let v = r
            .value(t, 0)
            .map_err(|e| format!("metadata '{key}': {e}"))?;
        metadata.insert(key, v);
    }
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32("tensor rank")? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor '{name}' has rank {n_dims}"));
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            ne.push(r.u64("tensor dimension")?);
        }
        let code = r.u32("tensor type")?;
        let dtype = BlockType::from_code(code)
            .ok_or_else(|| format!("tensor '{name}' has unsupported type code {code}"))?;
        let offset = r.u64("tensor offset")?;
        raw.push((name, ne, dtype, offset));
    }
    let alignment = match metadata.get("general.alignment").and_then(value_as_u64) {
        // GGUF asks for a multiple of 8; tensor data is read in place as f32 or
        // blocks, so a smaller one could misalign it.
        Some(a) if a.is_power_of_two() && a >= 8 => a,
        Some(a) => return Err(format!("general.alignment {a} is not a power of two >= 8")),
        None => DEFAULT_ALIGNMENT,
    };
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, ne, dtype, offset) in raw {
        // No zero dimension: with one, the product below would hide others whose
        // product overflows (as multiplying them in another order would show).
        if ne.contains(&0) {
            return Err(format!("tensor '{name}' has an empty dimension in {ne:?}"));
        }
        let elems = ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let elems = elems.ok_or_else(|| format!("tensor '{name}' has an absurd shape {ne:?}"))?;
        let block = dtype.block_size() as u64;
        if ne[0] % block != 0 {
            return Err(format!(
                "tensor '{name}': row length {} is not a multiple of the {dtype} block size {block}",
                ne[0]
            ));
        }
        if offset % alignment != 0 {
            return Err(format!(
                "tensor '{name}' starts at offset {offset}, not a multiple of the alignment {alignment}"
            ));
        }
        let len = (elems / block).checked_mul(dtype.type_size() as u64);
        let start = data_start.checked_add(offset);
        let end = match (start, len) {
            (Some(s), Some(l)) => s.checked_add(l),
            _ => None,
        };
        match end {
            Some(end) if end <= buf.len() as u64 => {}
            _ => {
                return Err(format!(
                    "tensor '{name}' lies beyond the end of the file ({} bytes): file is truncated",
                    buf.len()
                ))
            }
        }
        let shape = ne.iter().rev().map(|&d| d as usize).collect();
        // Both fit in usize: they are within `buf.len()`.
        tensors.push(TensorInfo {
            name,
            shape,
            dtype,
            start: (data_start + offset) as usize,
            len: len.unwrap_or(0) as usize,
        });
    }
    Ok((version, metadata, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_file() -> Vec<u8> {
        let t = candle_core::Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        let v = Value::String("llama".into());
        candle_core::quantized::gguf_file::write(
            &mut out,
            &[("general.architecture", &v)],
            &[("w", &q)],
        )
        .unwrap();
        out.into_inner()
    }

    #[test]
    fn parses_what_candle_writes() {
        let buf = tiny_file();
        let (version, md, tensors) = parse(&buf, |_| false).unwrap();
        assert_eq!(version, 2);
        assert!(matches!(md.get("general.architecture"), Some(Value::String(s)) if s == "llama"));
        assert_eq!(tensors[0].shape, vec![2, 32]);
        assert_eq!(tensors[0].len, 64 * 4);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let buf = tiny_file();
        for cut in 0..buf.len() {
            assert!(
                parse(&buf[..cut], |_| false).is_err(),
                "cut at {cut} parsed"
            );
        }
    }

    #[test]
    fn bit_flips_never_panic() {
        let buf = tiny_file();
        for i in 0..buf.len() {
            for bit in [0u8, 3, 7] {
                let mut b = buf.clone();
                b[i] ^= 1 << bit;
                let _ = parse(&b, |_| false);
            }
        }
    }

    #[test]
    fn skipped_keys_are_passed_over_and_still_checked() {
        let t = candle_core::Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let words = Value::Array(vec![Value::String("ab".into()), Value::String("c".into())]);
        let nested = Value::Array(vec![Value::Array(vec![Value::F32(1.0), Value::F32(2.0)])]);
        let (flag, arch) = (Value::Bool(true), Value::String("llama".into()));
        let md = [
            ("tok.words", &words),
            ("general.architecture", &arch),
            ("tok.nested", &nested),
            ("tok.flag", &flag),
        ];
        let data = crate::format::gguf_write::TensorData::of_qtensor("w", &q).unwrap();
        let mut buf = Vec::new();
        crate::format::gguf_write::write(&mut buf, &md, &[data]).unwrap();
        let skip = |k: &str| k.starts_with("tok.");
        let (_, all, tensors) = parse(&buf, |_| false).unwrap();
        let (_, kept, same) = parse(&buf, skip).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["general.architecture"]);
        assert_eq!(format!("{tensors:?}"), format!("{same:?}"));
        for cut in 0..buf.len() {
            assert!(parse(&buf[..cut], skip).is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn wrong_magic_is_named() {
        let mut buf = tiny_file();
        buf[0] = b'X';
        assert!(parse(&buf, |_| false).unwrap_err().contains("magic"));
    }
}
