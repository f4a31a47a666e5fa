//! A structural check of `.tflite` flatbuffers before they reach a runtime.
//!
//! LiteRT and TensorFlow Lite trust the file: a truncated or corrupted model can crash the
//! process inside `LiteRtCreateModelFromFile`. This walks the parts of the TFLite schema a runtime
//! dereferences (model, operator codes, subgraphs, tensors, quantisation, operators, buffers,
//! signatures) and checks that every table, vector, string and index lies inside the file.

use std::fmt;

/// Where and why a model file failed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub what: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

type Check<T> = Result<T, Malformed>;

fn bad<T>(what: impl Into<String>) -> Check<T> {
    Err(Malformed { what: what.into() })
}

struct Buf<'a> {
    b: &'a [u8],
}

#[derive(Clone, Copy)]
struct Table {
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

impl<'a> Buf<'a> {
    fn u16(&self, at: usize, what: &str) -> Check<u16> {
        match self.b.get(at..at + 2) {
            Some(s) => Ok(u16::from_le_bytes([s[0], s[1]])),
            None => bad(format!(
                "{what}: offset {at} is past the end of the file ({} bytes)",
                self.b.len()
            )),
        }
    }

    fn u32(&self, at: usize, what: &str) -> Check<u32> {
        match self.b.get(at..at + 4) {
            Some(s) => Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]])),
            None => bad(format!(
                "{what}: offset {at} is past the end of the file ({} bytes)",
                self.b.len()
            )),
        }
    }

    fn u64(&self, at: usize, what: &str) -> Check<u64> {
        Ok(self.u32(at, what)? as u64 | (self.u32(at + 4, what)? as u64) << 32)
    }

    fn deref(&self, at: usize, what: &str) -> Check<usize> {
        let off = self.u32(at, what)? as usize;
        let target = at.checked_add(off).filter(|&t| t < self.b.len());
        target.map_or_else(
            || {
                bad(format!(
                    "{what}: points past the end of the file (truncated?)"
                ))
            },
            Ok,
        )
    }

    fn table(&self, pos: usize, what: &str) -> Check<Table> {
        let soff = self.u32(pos, what)? as i32 as i64;
        let vtable = pos as i64 - soff;
        if vtable < 0 || vtable as usize + 4 > self.b.len() {
            return bad(format!("{what}: vtable outside the file"));
        }
        let vtable = vtable as usize;
        let vtable_len = self.u16(vtable, what)? as usize;
        let table_len = self.u16(vtable + 2, what)? as usize;
        if vtable_len < 4
            || !vtable_len.is_multiple_of(2)
            || vtable + vtable_len > self.b.len()
            || pos + table_len > self.b.len()
        {
            return bad(format!(
                "{what}: table extends past the end of the file (truncated?)"
            ));
        }
        Ok(Table {
            pos,
            vtable,
            vtable_len,
        })
    }

    /// Absolute position of field `index` of `t`, if present.
    fn field(&self, t: Table, index: usize, what: &str) -> Check<Option<usize>> {
        let slot = 4 + 2 * index;
        if slot + 2 > t.vtable_len {
            return Ok(None);
        }
        let off = self.u16(t.vtable + slot, what)? as usize;
        Ok((off != 0).then_some(t.pos + off))
    }

    fn sub_table(&self, t: Table, index: usize, what: &str) -> Check<Option<Table>> {
        match self.field(t, index, what)? {
            Some(at) => Ok(Some(self.table(self.deref(at, what)?, what)?)),
            None => Ok(None),
        }
    }

    /// (position of first element, length) of a vector field with elements of `elem` bytes.
    fn vector(
        &self,
        t: Table,
        index: usize,
        elem: usize,
        what: &str,
    ) -> Check<Option<(usize, usize)>> {
        let Some(at) = self.field(t, index, what)? else {
            return Ok(None);
        };
        let start = self.deref(at, what)?;
        let len = self.u32(start, what)? as usize;
        let end = len.checked_mul(elem).and_then(|n| n.checked_add(start + 4));
        match end {
            Some(end) if end <= self.b.len() => Ok(Some((start + 4, len))),
            _ => bad(format!(
                "{what}: {len} elements run past the end of the file (truncated?)"
            )),
        }
    }

    fn string(&self, t: Table, index: usize, what: &str) -> Check<()> {
        if let Some((start, len)) = self.vector(t, index, 1, what)? {
            if self.b.get(start + len) != Some(&0) {
                return bad(format!("{what}: string is not terminated"));
            }
        }
        Ok(())
    }

    fn tables(&self, t: Table, index: usize, what: &str) -> Check<Vec<Table>> {
        let Some((start, len)) = self.vector(t, index, 4, what)? else {
            return Ok(Vec::new());
        };
        (0..len)
            .map(|i| self.table(self.deref(start + 4 * i, what)?, &format!("{what}[{i}]")))
            .collect()
    }

    fn ints(&self, t: Table, index: usize, what: &str) -> Check<Vec<i32>> {
        let Some((start, len)) = self.vector(t, index, 4, what)? else {
            return Ok(Vec::new());
        };
        (0..len)
            .map(|i| Ok(self.u32(start + 4 * i, what)? as i32))
            .collect()
    }

    fn scalar_u32(&self, t: Table, index: usize, what: &str) -> Check<u32> {
        match self.field(t, index, what)? {
            Some(at) => self.u32(at, what),
            None => Ok(0),
        }
    }
}

/// The custom operator names a model declares (`edgetpu-custom-op` marks a model compiled by
/// `edgetpu_compiler`). Call [`check_tflite`] first; this only reads the operator codes.
pub fn custom_op_codes(bytes: &[u8]) -> Result<Vec<String>, Malformed> {
    let buf = Buf { b: bytes };
    if bytes.len() < 8 || &bytes[4..8] != b"TFL3" {
        return bad("missing the TFL3 flatbuffer identifier");
    }
    let root = buf.table(buf.deref(0, "model")?, "model")?;
    let mut names = Vec::new();
    for (i, oc) in buf.tables(root, 1, "operator_codes")?.iter().enumerate() {
        let what = format!("operator_codes[{i}].custom_code");
        buf.string(*oc, 1, &what)?;
        if let Some((start, len)) = buf.vector(*oc, 1, 1, &what)? {
            names.push(String::from_utf8_lossy(&bytes[start..start + len]).into_owned());
        }
    }
    Ok(names)
}

/// For each output of the main subgraph, in order, the names it goes by: its tensor name and
/// every signature output name bound to it. Call [`check_tflite`] first.
pub fn output_names(bytes: &[u8]) -> Result<Vec<Vec<String>>, Malformed> {
    let buf = Buf { b: bytes };
    let text = |t: Table, index: usize, what: &str| -> Check<Option<String>> {
        buf.string(t, index, what)?;
        Ok(buf
            .vector(t, index, 1, what)?
            .map(|(start, len)| String::from_utf8_lossy(&bytes[start..start + len]).into_owned()))
    };
    let root = buf.table(buf.deref(0, "model")?, "model")?;
    let subgraphs = buf.tables(root, 2, "subgraphs")?;
    let Some(main) = subgraphs.first() else {
        return bad("model has no subgraphs");
    };
    let tensors = buf.tables(*main, 0, "subgraphs[0].tensors")?;
    let mut names = Vec::new();
    for index in buf.ints(*main, 2, "subgraphs[0].outputs")? {
        let tensor = tensors.get(index as usize).ok_or_else(|| Malformed {
            what: format!("output tensor {index} out of range"),
        })?;
        names.push((
            index,
            text(*tensor, 3, "tensor name")?
                .into_iter()
                .collect::<Vec<_>>(),
        ));
    }
    for sig in buf.tables(root, 7, "signature_defs")? {
        if buf.scalar_u32(sig, 4, "signature_defs")? != 0 {
            continue;
        }
        for map in buf.tables(sig, 1, "signature outputs")? {
            let tensor = buf.scalar_u32(map, 1, "signature outputs")? as i32;
            if let (Some(name), Some((_, known))) = (
                text(map, 0, "signature output name")?,
                names.iter_mut().find(|(i, _)| *i == tensor),
            ) {
                known.push(name);
            }
        }
    }
    Ok(names.into_iter().map(|(_, n)| n).collect())
}

/// The highest input rank of any ADD or MUL in the model (GroupNorm exports broadcast at rank 5,
/// which old TensorFlow Lite kernels do not handle). Call [`check_tflite`] first.
pub fn max_add_mul_rank(bytes: &[u8]) -> Result<usize, Malformed> {
    const ADD: i32 = 0;
    const MUL: i32 = 18;
    let buf = Buf { b: bytes };
    let root = buf.table(buf.deref(0, "model")?, "model")?;
    let mut codes = Vec::new();
    for oc in buf.tables(root, 1, "operator_codes")? {
        let deprecated = match buf.field(oc, 0, "operator code")? {
            Some(at) => *bytes.get(at).unwrap_or(&0) as i8 as i32,
            None => 0,
        };
        let code = buf.scalar_u32(oc, 3, "operator code")? as i32;
        codes.push(code.max(deprecated));
    }
    let mut rank = 0;
    for sg in buf.tables(root, 2, "subgraphs")? {
        let tensors = buf.tables(sg, 0, "tensors")?;
        for op in buf.tables(sg, 3, "operators")? {
            let code = codes.get(buf.scalar_u32(op, 0, "operator")? as usize);
            if !matches!(code, Some(&ADD) | Some(&MUL)) {
                continue;
            }
            for input in buf.ints(op, 1, "operator inputs")? {
                if let Some(t) = tensors.get(input as usize) {
                    rank = rank.max(buf.ints(*t, 0, "tensor shape")?.len());
                }
            }
        }
    }
    Ok(rank)
}

/// Check that `bytes` is a structurally sound TFLite model.
pub fn check_tflite(bytes: &[u8]) -> Result<(), Malformed> {
    let buf = Buf { b: bytes };
    if bytes.len() < 16 {
        return bad(format!(
            "file is {} bytes, too short for a model",
            bytes.len()
        ));
    }
    if &bytes[4..8] != b"TFL3" {
        return bad("missing the TFL3 flatbuffer identifier");
    }
    let root = buf.table(buf.deref(0, "model")?, "model")?;
    let opcodes = buf.tables(root, 1, "operator_codes")?;
    for (i, oc) in opcodes.iter().enumerate() {
        buf.string(*oc, 1, &format!("operator_codes[{i}].custom_code"))?;
    }
    let buffers = buf.tables(root, 4, "buffers")?;
    for (i, b) in buffers.iter().enumerate() {
        let what = format!("buffers[{i}]");
        buf.vector(*b, 0, 1, &what)?;
        let offset = match buf.field(*b, 1, &what)? {
            Some(at) => buf.u64(at, &what)?,
            None => 0,
        };
        let size = match buf.field(*b, 2, &what)? {
            Some(at) => buf.u64(at, &what)?,
            None => 0,
        };
        if offset > 1
            && offset
                .checked_add(size)
                .is_none_or(|end| end > bytes.len() as u64)
        {
            return bad(format!(
                "{what}: data at {offset}+{size} lies past the end of the file (truncated?)"
            ));
        }
    }
    let subgraphs = buf.tables(root, 2, "subgraphs")?;
    if subgraphs.is_empty() {
        return bad("model has no subgraphs");
    }
    let mut tensor_counts = Vec::new();
    for (s, sg) in subgraphs.iter().enumerate() {
        let tensors = buf.tables(*sg, 0, &format!("subgraphs[{s}].tensors"))?;
        let n = tensors.len() as i64;
        for (t, tensor) in tensors.iter().enumerate() {
            let what = format!("subgraphs[{s}].tensors[{t}]");
            buf.ints(*tensor, 0, &format!("{what}.shape"))?;
            buf.string(*tensor, 3, &format!("{what}.name"))?;
            if buf.scalar_u32(*tensor, 2, &what)? as usize >= buffers.len().max(1) {
                return bad(format!("{what}: buffer index out of range"));
            }
            if let Some(q) = buf.sub_table(*tensor, 4, &format!("{what}.quantization"))? {
                for (field, elem) in [(0, 4), (1, 4), (2, 4), (3, 8)] {
                    buf.vector(q, field, elem, &format!("{what}.quantization"))?;
                }
            }
            buf.ints(*tensor, 7, &format!("{what}.shape_signature"))?;
        }
        let in_range = |v: &[i32], what: &str| -> Check<()> {
            match v.iter().find(|&&i| i < -1 || i as i64 >= n) {
                Some(i) => bad(format!(
                    "{what}: tensor index {i} out of range ({n} tensors)"
                )),
                None => Ok(()),
            }
        };
        in_range(
            &buf.ints(*sg, 1, "inputs")?,
            &format!("subgraphs[{s}].inputs"),
        )?;
        in_range(
            &buf.ints(*sg, 2, "outputs")?,
            &format!("subgraphs[{s}].outputs"),
        )?;
        for (o, op) in buf
            .tables(*sg, 3, &format!("subgraphs[{s}].operators"))?
            .iter()
            .enumerate()
        {
            let what = format!("subgraphs[{s}].operators[{o}]");
            if buf.scalar_u32(*op, 0, &what)? as usize >= opcodes.len() {
                return bad(format!("{what}: operator code index out of range"));
            }
            in_range(&buf.ints(*op, 1, &what)?, &format!("{what}.inputs"))?;
            in_range(&buf.ints(*op, 2, &what)?, &format!("{what}.outputs"))?;
            buf.sub_table(*op, 4, &format!("{what}.builtin_options"))?;
            buf.vector(*op, 5, 1, &format!("{what}.custom_options"))?;
        }
        buf.string(*sg, 4, &format!("subgraphs[{s}].name"))?;
        tensor_counts.push(n);
    }
    buf.vector(root, 5, 4, "metadata_buffer")?;
    for (i, m) in buf.tables(root, 6, "metadata")?.iter().enumerate() {
        buf.string(*m, 0, &format!("metadata[{i}].name"))?;
    }
    for (i, sig) in buf.tables(root, 7, "signature_defs")?.iter().enumerate() {
        let what = format!("signature_defs[{i}]");
        let subgraph = buf.scalar_u32(*sig, 4, &what)? as usize;
        let Some(&n) = tensor_counts.get(subgraph) else {
            return bad(format!("{what}: subgraph index {subgraph} out of range"));
        };
        buf.string(*sig, 2, &format!("{what}.signature_key"))?;
        for field in [0, 1] {
            for map in buf.tables(*sig, field, &what)? {
                buf.string(map, 0, &format!("{what} tensor name"))?;
                if buf.scalar_u32(map, 1, &what)? as i64 >= n {
                    return bad(format!("{what}: tensor index out of range"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/df-mini/df-mini.int8.tflite"
        ))
        .unwrap()
    }

    #[test]
    fn reads_custom_operator_names() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/edgetpu/");
        let compiled = std::fs::read(format!("{dir}patch_edgetpu.tflite")).unwrap();
        check_tflite(&compiled).unwrap();
        assert_eq!(custom_op_codes(&compiled).unwrap(), ["edgetpu-custom-op"]);
        let plain = std::fs::read(format!("{dir}patch.tflite")).unwrap();
        assert!(custom_op_codes(&plain).unwrap().is_empty());
        assert!(custom_op_codes(&fixture()).unwrap().is_empty());
        assert!(custom_op_codes(b"not a model at all").is_err());
        assert_eq!(output_names(&plain).unwrap(), [["embedding"]]);
    }

    #[test]
    fn finds_the_rank_5_broadcasts_of_group_norm() {
        assert_eq!(max_add_mul_rank(&fixture()).unwrap(), 5);
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/edgetpu/");
        let plain = std::fs::read(format!("{dir}patch.tflite")).unwrap();
        assert_eq!(max_add_mul_rank(&plain).unwrap(), 0);
    }

    #[test]
    fn output_names_include_the_signature_names() {
        let names = output_names(&fixture()).unwrap();
        assert_eq!(names.len(), 1);
        assert!(names[0].iter().any(|n| n == "embedding"), "{names:?}");
    }

    #[test]
    fn accepts_the_fixture_models() {
        check_tflite(&fixture()).unwrap();
        let fp32 = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/df-mini/df-mini.fp32.tflite"
        ))
        .unwrap();
        check_tflite(&fp32).unwrap();
    }

    #[test]
    fn refuses_every_truncation() {
        let bytes = fixture();
        // Every prefix shorter than the file must be refused (sampled: every 997th length, and
        // every length of the first and last 4 KiB).
        let n = bytes.len();
        let lengths = (0..4096)
            .chain((4096..n - 4096).step_by(997))
            .chain(n - 4096..n);
        for len in lengths {
            assert!(
                check_tflite(&bytes[..len]).is_err(),
                "prefix of {len} of {n} bytes accepted"
            );
        }
    }

    #[test]
    fn refuses_garbage_and_flipped_offsets() {
        assert!(
            check_tflite(b"this is not a model, only a text file of some length.....").is_err()
        );
        let mut bytes = fixture();
        bytes[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_tflite(&bytes).is_err());
    }
}
