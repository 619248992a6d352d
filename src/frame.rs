//! The one on-disk layout of mmke's tensor memories (the edit memory, UniKE's knowledge
//! memory): an 8-byte magic, a little-endian u32 header length, a JSON header, the values as
//! little-endian f32, and a CRC-32 of everything before it. Written atomically; a truncated
//! or corrupted file is an error naming it, never a partial read.

use std::path::Path;

use crate::error::{Error, Result, write_atomic};

/// Writes `header` and `values` to `path` under `magic`.
pub fn write(
    path: &Path,
    magic: &[u8; 8],
    header: &serde_json::Value,
    values: &[f32],
) -> Result<()> {
    let header = header.to_string();
    let mut bytes = Vec::with_capacity(16 + header.len() + 4 * values.len());
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    write_atomic(path, &bytes)
}

/// Reads a file written by [`write`] under `magic` (`what` names the kind of file in errors):
/// its header and values, after checking the magic and the checksum.
pub fn read(path: &Path, magic: &[u8; 8], what: &str) -> Result<(serde_json::Value, Vec<f32>)> {
    let error = |reason: String| Error::Memory {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() < magic.len() + 8 || &bytes[..magic.len()] != magic {
        return Err(error(format!(
            "not an mmke {what} (bad magic or too short)"
        )));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    if crc32fast::hash(body) != stored {
        return Err(error(
            "checksum mismatch: the file is truncated or corrupted".into(),
        ));
    }
    let header_len = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    let header = body
        .get(12..12 + header_len)
        .ok_or_else(|| error("header runs past the end".into()))?;
    let header: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| error(format!("invalid header: {e}")))?;
    let data = &body[12 + header_len..];
    if data.len() % 4 != 0 {
        return Err(error(format!("{} value bytes: not whole f32s", data.len())));
    }
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    Ok((header, values))
}

/// `header[key]` as a count, or an error naming `path`.
pub fn count(path: &Path, header: &serde_json::Value, key: &str) -> Result<usize> {
    header[key]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| Error::Memory {
            path: path.to_path_buf(),
            reason: format!("header lacks '{key}'"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        let values = [1.5f32, -2.0, f32::MIN_POSITIVE];
        write(&path, b"MMKETEST", &serde_json::json!({"n": 3}), &values).unwrap();
        let (header, back) = read(&path, b"MMKETEST", "test file").unwrap();
        assert_eq!(header["n"], 3);
        assert_eq!(back, values);
        assert!(read(&path, b"MMKEOTHR", "test file").is_err());
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let error = read(&path, b"MMKETEST", "test file")
            .unwrap_err()
            .to_string();
        assert!(error.contains("checksum"), "{error}");
    }
}
