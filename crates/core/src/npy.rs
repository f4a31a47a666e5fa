//! `.npy` files (NumPy's array format) through `npyz`: the one writer and reader of embedding
//! matrices, for the CLI, the hub's export and the tests.

use std::io::{self, Write};

use npyz::{DType, NpyFile, Order, TypeStr, WriterBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("not a readable .npy file: {0}")]
    Read(#[from] io::Error),
    #[error("expected little-endian float32 or float16 in C order, the file holds {0}")]
    Type(String),
    #[error("shape {shape:?} needs {expected} values, the file holds {found}")]
    Length {
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
}

/// Write `rows`, each `dim` values, as a little-endian float32 C-order array of shape
/// (rows, dim). A row of another length is an error, and nothing after it is written.
pub fn write_f32_rows<'a, W: Write>(
    out: W,
    dim: usize,
    rows: impl ExactSizeIterator<Item = &'a [f32]>,
) -> io::Result<()> {
    let shape = [rows.len() as u64, dim as u64];
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(out)
        .begin_nd()?;
    for (i, row) in rows.enumerate() {
        if row.len() != dim {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("row {i} has {} values, the array {dim}", row.len()),
            ));
        }
        writer.extend(row.iter().copied())?;
    }
    writer.finish()
}

/// A float32 or float16 `.npy` (little-endian, C order): its shape, and its values as `f32`.
pub fn read_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    let file = NpyFile::new(bytes)?;
    let shape: Vec<usize> = file.shape().iter().map(|&d| d as usize).collect();
    let described = format!("{} ({:?} order)", file.dtype().descr(), file.order());
    let type_str = match file.dtype() {
        DType::Plain(t) if file.order() == Order::C => t,
        _ => return Err(NpyError::Type(described)),
    };
    let f4: TypeStr = "<f4".parse().expect("a type string");
    let f2: TypeStr = "<f2".parse().expect("a type string");
    let values = if type_str == f4 {
        file.into_vec::<f32>()?
    } else if type_str == f2 {
        file.into_vec::<half::f16>()?
            .into_iter()
            .map(f32::from)
            .collect()
    } else {
        return Err(NpyError::Type(described));
    };
    let expected = shape.iter().product::<usize>();
    if values.len() != expected {
        return Err(NpyError::Length {
            shape,
            expected,
            found: values.len(),
        });
    }
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_bad_files_are_errors() {
        let rows = [vec![1.0f32, 2.0, 3.0], vec![-4.0, 5.5, 0.0]];
        let mut buf = Vec::new();
        write_f32_rows(&mut buf, 3, rows.iter().map(Vec::as_slice)).unwrap();
        let header_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0, "header aligned for mapping");
        let (shape, values) = read_f32(&buf).unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(values, [1.0, 2.0, 3.0, -4.0, 5.5, 0.0]);
        // Truncated data, garbage, another dtype, a ragged row.
        assert!(read_f32(&buf[..buf.len() - 1]).is_err());
        assert!(read_f32(b"hello world").is_err());
        let f8 = String::from_utf8_lossy(&buf).replace("<f4", "<f8");
        assert!(read_f32(f8.as_bytes()).is_err());
        let ragged = [vec![1.0f32, 2.0], vec![3.0]];
        let err = write_f32_rows(Vec::new(), 2, ragged.iter().map(Vec::as_slice)).unwrap_err();
        assert!(err.to_string().contains("row 1 has 1 values"), "{err}");
    }
}
