//! How deep a Parquet file's schema nests, read from its footer before the
//! `parquet` crate sees it. The crate builds the schema tree recursively, one
//! stack frame (or several) per level, so a 200 KB file of 2,000 nested lists
//! overflows a worker thread's stack and aborts the whole process — every
//! time the file is read again. This reader walks the flat list of schema
//! elements in the footer (Thrift compact protocol) without recursion in the
//! schema's depth and tells the depth, so such a file is refused first.
//!
//! Only what the walk needs is decoded: `FileMetaData.schema` (field 2, a
//! list of `SchemaElement`) and each element's `num_children` (field 5);
//! every other field is skipped, with nested structs skipped to a bounded
//! depth. Anything malformed is an error; the caller refuses the file.
use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
};

/// Footers larger than this are refused: real footers are KB to a few MB
/// (about 100 bytes per column per row group).
const MAX_FOOTER_BYTES: u64 = 64 << 20;
/// Nesting of Thrift structs the skipper follows (the Parquet format nests
/// a few levels; the `parquet` crate allows 64).
pub(super) const MAX_STRUCT_DEPTH: u32 = 64;

/// The deepest level of the schema (top-level columns are level 1), or
/// `limit + 1` as soon as some element is deeper than `limit`.
pub fn schema_depth(file: &mut File, limit: usize) -> Result<usize, String> {
    let footer = read_footer(file)?;
    let mut reader = Compact {
        bytes: &footer,
        at: 0,
    };
    reader
        .schema_depth(limit)
        .map_err(|e| format!("not a readable Parquet file: footer: {e}"))
}

fn read_footer(file: &mut File) -> Result<Vec<u8>, String> {
    let bad = |e: std::io::Error| format!("not a readable Parquet file: {e}");
    let len = file.seek(SeekFrom::End(0)).map_err(bad)?;
    if len < 12 {
        return Err("not a readable Parquet file: too short".into());
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::End(-8)).map_err(bad)?;
    file.read_exact(&mut tail).map_err(bad)?;
    if &tail[4..] != b"PAR1" {
        return Err(
            "not a readable Parquet file: no PAR1 footer (encrypted footers are not read)".into(),
        );
    }
    let size = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if size > MAX_FOOTER_BYTES || size + 8 > len {
        return Err(format!(
            "not a readable Parquet file: footer of {size} bytes (at most {MAX_FOOTER_BYTES} are read)"
        ));
    }
    let mut footer = vec![0u8; size as usize];
    file.seek(SeekFrom::Start(len - 8 - size)).map_err(bad)?;
    file.read_exact(&mut footer).map_err(bad)?;
    file.seek(SeekFrom::Start(0)).map_err(bad)?;
    Ok(footer)
}

/// Thrift compact protocol types.
pub(super) const STOP: u8 = 0;
pub(super) const TRUE: u8 = 1;
pub(super) const FALSE: u8 = 2;
pub(super) const BYTE: u8 = 3;
pub(super) const I16: u8 = 4;
pub(super) const I32: u8 = 5;
pub(super) const I64: u8 = 6;
pub(super) const DOUBLE: u8 = 7;
pub(super) const BINARY: u8 = 8;
pub(super) const LIST: u8 = 9;
pub(super) const SET: u8 = 10;
pub(super) const MAP: u8 = 11;
pub(super) const STRUCT: u8 = 12;

/// A reader of Thrift compact bytes (also used by `parquet_pages`).
pub(super) struct Compact<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

pub(super) type R<T> = Result<T, String>;

impl Compact<'_> {
    fn schema_depth(&mut self, limit: usize) -> R<usize> {
        let mut last_id = 0i16;
        loop {
            let Some((id, kind)) = self.field_header(&mut last_id)? else {
                return Err("no schema".into());
            };
            if id == 2 && kind == LIST {
                return self.walk_schema(limit);
            }
            self.skip(kind, MAX_STRUCT_DEPTH)?;
        }
    }

    /// Walks the schema elements (depth-first order, each group followed by
    /// its `num_children` children) with a stack of children still to come.
    fn walk_schema(&mut self, limit: usize) -> R<usize> {
        let (count, kind) = self.list_header()?;
        if kind != STRUCT {
            return Err("schema is not a list of structs".into());
        }
        let mut open: Vec<i64> = Vec::new();
        let mut deepest = 0;
        for _ in 0..count {
            let depth = open.len();
            deepest = deepest.max(depth);
            if depth > limit {
                return Ok(limit + 1);
            }
            if let Some(left) = open.last_mut() {
                *left -= 1;
            }
            let children = self.element_children()?;
            if children > 0 {
                open.push(children);
            }
            while open.last() == Some(&0) {
                open.pop();
            }
        }
        Ok(deepest)
    }

    /// Reads one `SchemaElement`, returning its `num_children` (0 if unset).
    fn element_children(&mut self) -> R<i64> {
        let mut children = 0;
        let mut last_id = 0i16;
        while let Some((id, kind)) = self.field_header(&mut last_id)? {
            if id == 5 && kind == I32 {
                children = self.zigzag()?;
                if children < 0 {
                    return Err("negative num_children".into());
                }
            } else {
                self.skip(kind, MAX_STRUCT_DEPTH)?;
            }
        }
        Ok(children)
    }

    /// The next field's id and type, or `None` at the struct's end.
    pub(super) fn field_header(&mut self, last_id: &mut i16) -> R<Option<(i16, u8)>> {
        let byte = self.byte()?;
        let kind = byte & 0x0f;
        if kind == STOP {
            return Ok(None);
        }
        let delta = i16::from(byte >> 4);
        let id = if delta == 0 {
            i16::try_from(self.zigzag()?).map_err(|_| "field id out of range")?
        } else {
            last_id.saturating_add(delta)
        };
        *last_id = id;
        Ok(Some((id, kind)))
    }

    fn list_header(&mut self) -> R<(u64, u8)> {
        let byte = self.byte()?;
        let size = match byte >> 4 {
            15 => self.varint()?,
            n => u64::from(n),
        };
        Ok((size, byte & 0x0f))
    }

    pub(super) fn skip(&mut self, kind: u8, depth: u32) -> R<()> {
        match kind {
            TRUE | FALSE => Ok(()),
            BYTE => self.advance(1),
            I16 | I32 | I64 => self.varint().map(drop),
            DOUBLE => self.advance(8),
            BINARY => {
                let len = self.varint()?;
                self.advance(usize::try_from(len).map_err(|_| "length out of range")?)
            }
            LIST | SET => {
                let (count, elem) = self.list_header()?;
                self.skip_many(count, &[elem], depth)
            }
            MAP => {
                let count = self.varint()?;
                if count == 0 {
                    return Ok(());
                }
                let kinds = self.byte()?;
                self.skip_many(count, &[kinds >> 4, kinds & 0x0f], depth)
            }
            STRUCT => {
                if depth == 0 {
                    return Err("structs nested too deep".into());
                }
                let mut last_id = 0i16;
                while let Some((_, kind)) = self.field_header(&mut last_id)? {
                    self.skip(kind, depth - 1)?;
                }
                Ok(())
            }
            other => Err(format!("unknown field type {other}")),
        }
    }

    fn skip_many(&mut self, count: u64, kinds: &[u8], depth: u32) -> R<()> {
        if depth == 0 {
            return Err("containers nested too deep".into());
        }
        // Every element takes at least a byte (booleans in lists do too):
        // a count beyond what is left is malformed, not a long loop.
        if count > (self.bytes.len() - self.at) as u64 {
            return Err("container longer than the footer".into());
        }
        for _ in 0..count {
            for &kind in kinds {
                match kind {
                    TRUE | FALSE => self.advance(1)?,
                    kind => self.skip(kind, depth - 1)?,
                }
            }
        }
        Ok(())
    }

    fn byte(&mut self) -> R<u8> {
        let b = *self.bytes.get(self.at).ok_or("footer ends early")?;
        self.at += 1;
        Ok(b)
    }

    fn advance(&mut self, n: usize) -> R<()> {
        if self.bytes.len() - self.at < n {
            return Err("footer ends early".into());
        }
        self.at += n;
        Ok(())
    }

    fn varint(&mut self) -> R<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }

    pub(super) fn zigzag(&mut self) -> R<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A file of `footer` bytes behind a made-up body, as a writer lays it out.
    fn file_with_footer(footer: &[u8]) -> File {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(b"PAR1body").expect("write");
        file.write_all(footer).expect("write");
        file.write_all(&(footer.len() as u32).to_le_bytes())
            .expect("write");
        file.write_all(b"PAR1").expect("write");
        file
    }

    /// `FileMetaData { version: 1, schema: [root(children: 1), ...] }`: a
    /// chain of `levels` groups of one child each, then a leaf, with a name
    /// (field 4) and an unknown struct field (skipped) on every element.
    fn chain(levels: usize) -> Vec<u8> {
        let mut out = vec![0x15, 0x02]; // field 1 (i32) = 1
        out.push(0x19); // field 2 (+1), list
        out.push(0xfc); // 15 = size follows, element type struct
        let mut n = levels as u64 + 1;
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        for i in 0..=levels {
            out.extend([0x48, 0x01, b'x']); // field 4 (binary) "x"
            if i < levels {
                out.extend([0x15, 0x02]); // field 5 (i32) num_children = 1
            }
            out.extend([0x5c, 0x15, 0x04, 0x00]); // field 10 (struct { 1: 2 })
            out.push(0x00); // stop
        }
        out.push(0x00);
        out
    }

    #[test]
    fn depth_of_a_chain_and_early_stop() {
        let mut file = file_with_footer(&chain(3));
        assert_eq!(schema_depth(&mut file, 100), Ok(3));
        let mut file = file_with_footer(&chain(100_000));
        assert_eq!(schema_depth(&mut file, 130), Ok(131));
    }

    #[test]
    fn malformed_footers_are_errors() {
        let mut file = file_with_footer(&chain(3)[..10]);
        assert!(
            schema_depth(&mut file, 100)
                .unwrap_err()
                .contains("ends early")
        );
        let mut file = file_with_footer(&[0x1c; 200]);
        assert!(schema_depth(&mut file, 100).is_err());
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(b"not parquet at all").expect("write");
        assert!(schema_depth(&mut file, 100).unwrap_err().contains("PAR1"));
    }
}
