//! f32 tensors in `bytes` fields: little-endian, row-major, with dtype and
//! shape alongside. Sending wraps the `Vec<f32>` without copying; receiving
//! copies once into aligned f32 (network buffers carry no alignment promise).

use bytes::Bytes;

use crate::ProtocolError;
use crate::pb;

#[cfg(target_endian = "big")]
compile_error!("the wire format is little-endian f32; big-endian hosts are not supported");

/// Owns the floats while `Bytes` views them as bytes.
struct F32Bytes(Vec<f32>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// A `[rows, width]` f32 tensor message, without copying `data`.
pub fn encode(rows: usize, width: usize, data: Vec<f32>) -> pb::Tensor {
    debug_assert_eq!(data.len(), rows * width);
    pb::Tensor {
        dtype: pb::Dtype::F32 as i32,
        shape: vec![rows as u64, width as u64],
        data: Bytes::from_owner(F32Bytes(data)),
    }
}

/// A validated 2-D f32 tensor: `(rows, width, data)`. `what` names the field
/// in error messages.
pub fn decode(tensor: Option<&pb::Tensor>, what: &str) -> Result<(usize, usize, Vec<f32>), ProtocolError> {
    let t = tensor.ok_or_else(|| ProtocolError(format!("{what} is missing")))?;
    if t.dtype != pb::Dtype::F32 as i32 {
        return Err(ProtocolError(format!("{what} has dtype {}, expected F32", t.dtype)));
    }
    let [rows, width] = t.shape[..] else {
        return Err(ProtocolError(format!("{what} has shape {:?}, expected 2 dimensions", t.shape)));
    };
    let (rows, width) = (usize::try_from(rows).ok(), usize::try_from(width).ok());
    let expected = rows.zip(width).and_then(|(r, w)| r.checked_mul(w)).and_then(|n| n.checked_mul(4));
    match (rows, width, expected) {
        (Some(rows), Some(width), Some(bytes)) if bytes == t.data.len() => {
            let data = t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Ok((rows, width, data))
        }
        _ => Err(ProtocolError(format!("{what} has shape {:?} but {} data bytes", t.shape, t.data.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_sizes() {
        let t = encode(2, 3, vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0]);
        assert_eq!(decode(Some(&t), "x").unwrap(), (2, 3, vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0]));
        let mut short = t.clone();
        short.data = short.data.slice(..20);
        assert!(decode(Some(&short), "x").unwrap_err().0.contains("20 data bytes"));
        let mut huge = t.clone();
        huge.shape = vec![u64::MAX, 2];
        assert!(decode(Some(&huge), "x").is_err());
        let mut flat = t.clone();
        flat.shape = vec![6];
        assert!(decode(Some(&flat), "x").unwrap_err().0.contains("2 dimensions"));
        let mut other = t;
        other.dtype = 0;
        assert!(decode(Some(&other), "x").unwrap_err().0.contains("dtype"));
        assert!(decode(None, "x").unwrap_err().0.contains("missing"));
    }
}
