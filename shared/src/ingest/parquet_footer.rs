//! How deep a Parquet file's schema nests, read from its footer before the
//! `parquet` crate sees it. The crate builds the schema tree recursively, one
//! stack frame (or several) per level, so a 200 KB file of 2,000 nested lists
//! overflows a worker thread's stack and aborts the whole process — every
//! time the file is read again. This reader walks the flat list of schema
//! elements in the footer (Thrift compact protocol) without recursion in the
//! schema's depth and tells the depth, so such a file is refused first.
//!
//! Only what the walk needs is decoded: `FileMetaData`'s schema (field 2,
//! a list of `SchemaElement`, each element's `num_children` and name) and
//! its row counts (field 3, and each row group's field 3); every other
//! field is skipped, with nested structs skipped to a bounded depth.
//! Anything malformed is an error; the caller refuses the file.
//!
//! The walk must read the bytes the crate will: the crate reads a field it
//! knows as the format's type whatever type its header names (an `i32`
//! sent as `i64` is read the same; a string sent as an `i32` is not), and
//! keeps the last of a repeated field. So in the structs walked here a
//! known field whose header names another type, or a known field given
//! twice, is refused ([`Fields`]): a schema of 100,000 nested groups whose
//! `num_children` were sent as `i64` looked flat to an earlier walk and
//! overflowed the crate's stack.
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

/// The most leaf columns a schema may have: the crate's row reader holds
/// buffers of every column at once (tens of KB each).
pub const MAX_COLUMNS: u64 = 10_000;
/// The longest column name, in bytes: names are copied into every row and
/// every row's error.
const MAX_NAME_BYTES: u64 = 1024;

/// What the footer tells of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schema {
    /// The deepest level (top-level columns are level 1), or `limit + 1`
    /// as soon as some element is deeper than `limit` (the rest unread).
    pub depth: usize,
    /// Its leaf columns.
    pub columns: u64,
}

/// Reads the schema from the footer (see the module's documentation).
pub fn schema(file: &mut File, limit: usize) -> Result<Schema, String> {
    let footer = read_footer(file)?;
    let mut reader = Compact {
        bytes: &footer,
        at: 0,
    };
    reader
        .file_metadata(limit)
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

/// How the format types a field, as far as the wire goes: every integer
/// is a varint in the compact protocol (so `i16`, `i32` and `i64` read
/// alike), a bool is in its field header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wire {
    Int,
    Binary,
    Bool,
    List,
    Struct,
}

/// The fields of a struct the walk decodes, known by id.
pub(super) type Known = &'static [(i16, Wire)];

const FILE_METADATA: Known = &[
    (1, Wire::Int),
    (2, Wire::List),
    (3, Wire::Int),
    (4, Wire::List),
    (5, Wire::List),
    (6, Wire::Binary),
    (7, Wire::List),
    (8, Wire::Struct),
    (9, Wire::Binary),
];
const SCHEMA_ELEMENT: Known = &[
    (1, Wire::Int),
    (2, Wire::Int),
    (3, Wire::Int),
    (4, Wire::Binary),
    (5, Wire::Int),
    (6, Wire::Int),
    (7, Wire::Int),
    (8, Wire::Int),
    (9, Wire::Int),
    (10, Wire::Struct),
];
const ROW_GROUP: Known = &[
    (1, Wire::List),
    (2, Wire::Int),
    (3, Wire::Int),
    (4, Wire::List),
    (5, Wire::Int),
    (6, Wire::Int),
    (7, Wire::Int),
];

/// Reads a struct's field headers as the crate will take them: a known
/// field must have its type's header and come once (see the module's
/// documentation); unknown fields are skipped by both readers alike.
pub(super) struct Fields {
    known: Known,
    last_id: i16,
    /// Bit `i` is set once the known field at index `i` was read.
    seen: u32,
}

impl Fields {
    pub(super) fn of(known: Known) -> Self {
        Fields {
            known,
            last_id: 0,
            seen: 0,
        }
    }

    /// The next field's id and wire type, or `None` at the struct's end.
    pub(super) fn next(&mut self, c: &mut Compact<'_>) -> R<Option<(i16, u8)>> {
        let Some((id, kind)) = c.field_header(&mut self.last_id)? else {
            return Ok(None);
        };
        let Some(index) = self.known.iter().position(|(k, _)| *k == id) else {
            return Ok(Some((id, kind)));
        };
        if self.seen & (1 << index) != 0 {
            return Err(format!("field {id} is given twice"));
        }
        self.seen |= 1 << index;
        let fits = match self.known[index].1 {
            Wire::Int => matches!(kind, I16 | I32 | I64),
            Wire::Binary => kind == BINARY,
            Wire::Bool => matches!(kind, TRUE | FALSE),
            Wire::List => matches!(kind, LIST | SET),
            Wire::Struct => kind == STRUCT,
        };
        if !fits {
            return Err(format!("field {id} has wire type {kind}, not its type's"));
        }
        Ok(Some((id, kind)))
    }
}

impl Compact<'_> {
    /// `FileMetaData`: the schema, checked for row counts on the way.
    fn file_metadata(&mut self, limit: usize) -> R<Schema> {
        let mut fields = Fields::of(FILE_METADATA);
        let mut schema = None;
        while let Some((id, kind)) = fields.next(self)? {
            match id {
                2 => {
                    let walked = self.walk_schema(limit)?;
                    if walked.depth > limit {
                        return Ok(walked);
                    }
                    schema = Some(walked);
                }
                3 => rows(self.zigzag()?)?,
                4 => self.row_groups()?,
                _ => self.skip(kind, MAX_STRUCT_DEPTH)?,
            }
        }
        schema.ok_or_else(|| "no schema".into())
    }

    /// Each `RowGroup`'s row count (field 3) must be a count.
    fn row_groups(&mut self) -> R<()> {
        let count = self.struct_list()?;
        for _ in 0..count {
            let mut fields = Fields::of(ROW_GROUP);
            while let Some((id, kind)) = fields.next(self)? {
                match id {
                    3 => rows(self.zigzag()?)?,
                    _ => self.skip(kind, MAX_STRUCT_DEPTH)?,
                }
            }
        }
        Ok(())
    }

    /// A list's header, which must hold structs, no more of them than
    /// bytes left; its length.
    fn struct_list(&mut self) -> R<u64> {
        let (count, kind) = self.list_header()?;
        if kind != STRUCT {
            return Err("a list of structs holds something else".into());
        }
        if count > (self.bytes.len() - self.at) as u64 {
            return Err("a list longer than the footer".into());
        }
        Ok(count)
    }

    /// Walks the schema elements (depth-first order, each group followed by
    /// its `num_children` children) with a stack of children still to come.
    /// The root must have columns, no group more children than elements
    /// follow it (the crate sizes a vector by the count), and the list must
    /// end with the tree.
    fn walk_schema(&mut self, limit: usize) -> R<Schema> {
        let count = self.struct_list()?;
        let mut open: Vec<u64> = Vec::new();
        let (mut deepest, mut columns) = (0, 0u64);
        for i in 0..count {
            let depth = open.len();
            deepest = deepest.max(depth);
            if depth > limit {
                return Ok(Schema {
                    depth: limit + 1,
                    columns,
                });
            }
            if i > 0 && open.is_empty() {
                return Err("elements follow the schema's root".into());
            }
            if let Some(left) = open.last_mut() {
                *left -= 1;
            }
            let children = self.element_children()?;
            if children > count - i - 1 {
                return Err(format!(
                    "an element claims {children} children where {} elements follow",
                    count - i - 1
                ));
            }
            match (i, children) {
                (0, 0) => return Err("the schema has no columns".into()),
                (_, 0) => columns += 1,
                _ => open.push(children),
            }
            if columns > MAX_COLUMNS {
                return Err(format!("the schema has more than {MAX_COLUMNS} columns"));
            }
            while open.last() == Some(&0) {
                open.pop();
            }
        }
        if !open.is_empty() {
            return Err("the schema ends before its groups' children".into());
        }
        Ok(Schema {
            depth: deepest,
            columns,
        })
    }

    /// Reads one `SchemaElement`, returning its `num_children` (0 if unset).
    fn element_children(&mut self) -> R<u64> {
        let mut children = 0;
        let mut fields = Fields::of(SCHEMA_ELEMENT);
        while let Some((id, kind)) = fields.next(self)? {
            match id {
                4 => {
                    let len = self.varint()?;
                    if len > MAX_NAME_BYTES {
                        return Err(format!(
                            "a column name of {len} bytes (at most {MAX_NAME_BYTES})"
                        ));
                    }
                    self.advance(usize::try_from(len).map_err(|_| "length out of range")?)?;
                }
                5 => {
                    children =
                        u64::try_from(self.zigzag()?).map_err(|_| "negative num_children")?;
                }
                _ => self.skip(kind, MAX_STRUCT_DEPTH)?,
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

/// A row count read from the footer: the crate takes a negative one as
/// the largest count there is (an empty schema made `u64::MAX` rows).
fn rows(count: i64) -> R<()> {
    if count < 0 {
        return Err(format!("a row count of {count}"));
    }
    Ok(())
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
    /// (field 4) and a logical type (field 10, a struct: skipped) on every
    /// element.
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
            // field 10, a struct { 1: 2 } (the delta from field 5 or 4)
            let delta = if i < levels { 0x5c } else { 0x6c };
            out.extend([delta, 0x15, 0x04, 0x00]);
            out.push(0x00); // stop
        }
        out.push(0x00);
        out
    }

    #[test]
    fn depth_of_a_chain_and_early_stop() {
        let mut file = file_with_footer(&chain(3));
        let depth = |file: &mut File, limit| schema(file, limit).map(|s| s.depth);
        assert_eq!(depth(&mut file, 100), Ok(3));
        let mut file = file_with_footer(&chain(100_000));
        assert_eq!(depth(&mut file, 130), Ok(131));
    }

    /// `chain(levels)` with every `num_children` sent as an `i64`.
    fn chain_of_i64_counts(levels: usize) -> Vec<u8> {
        let mut footer = chain(levels);
        // Each count is the only `0x15 0x02` after a name "x" (0x48 0x01 'x').
        for at in 3..footer.len() - 1 {
            if footer[at - 3..at] == [0x48, 0x01, b'x'] && footer[at..at + 2] == [0x15, 0x02] {
                footer[at] = 0x16;
            }
        }
        footer
    }

    /// The crate reads a count sent as an `i64` as it reads an `i32`: the
    /// walk must too (it skipped such counts, saw a flat schema, and the
    /// crate overflowed its stack on 100,000 levels).
    #[test]
    fn counts_sent_as_i64_are_read() {
        let depth =
            |footer: &[u8], limit| schema(&mut file_with_footer(footer), limit).map(|s| s.depth);
        assert_eq!(depth(&chain_of_i64_counts(3), 100), Ok(3));
        assert_eq!(depth(&chain_of_i64_counts(100_000), 130), Ok(131));
    }

    /// `FileMetaData { version: 1, schema: [elements...] }` then `tail`.
    fn footer(elements: &[&[u8]], tail: &[u8]) -> Vec<u8> {
        let mut out = vec![0x15, 0x02, 0x19, 0xfc, elements.len() as u8];
        for element in elements {
            out.extend_from_slice(element);
        }
        out.extend_from_slice(tail);
        out.push(0x00);
        out
    }

    /// What the crate would read otherwise, or not survive: a field given
    /// twice (the crate keeps the last), a known field of another type, an
    /// empty schema (`u64::MAX` rows of `{}`), a group claiming more
    /// children than follow (a vector sized by the claim), a negative row
    /// count, a name of megabytes (copied into every row's error).
    #[test]
    fn footers_the_crate_would_read_otherwise_are_refused() {
        let root: &[u8] = &[0x48, 0x01, b'r', 0x15, 0x02, 0x00];
        let leaf: &[u8] = &[0x48, 0x01, b'x', 0x00];
        let mut long = vec![0x48, 0xd0, 0x0f]; // a name of 2,000 bytes
        long.extend(std::iter::repeat_n(b'n', 2000));
        long.push(0x00);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                footer(
                    &[
                        &[0x48, 0x01, b'r', 0x15, 0x02, 0x05, 0x0a, 0x00, 0x00],
                        leaf,
                    ],
                    &[],
                ),
                "twice",
            ),
            (
                footer(&[&[0x48, 0x01, b'r', 0x18, 0x02, 0x00], leaf], &[]),
                "wire type",
            ),
            (footer(&[&[0x48, 0x01, b'r', 0x00]], &[]), "no columns"),
            (
                footer(&[&[0x48, 0x01, b'r', 0x15, 0x0a, 0x00], leaf], &[]),
                "claims 5 children",
            ),
            (footer(&[root, leaf], &[0x16, 0x01]), "row count of -1"),
            (
                footer(&[&[0x48, 0x01, b'r', 0x15, 0x04, 0x00], leaf, &long], &[]),
                "column name",
            ),
            (
                footer(
                    &[root, leaf],
                    &[0x09, 0x04, 0x19, 0x1c, 0x48, 0x01, b'r', 0x00],
                ),
                "twice",
            ),
            (footer(&[root, leaf, leaf], &[]), "follow the schema's root"),
        ];
        for (bytes, why) in cases {
            let got = schema(&mut file_with_footer(&bytes), 100);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{why}: {got:?}"
            );
        }
        assert_eq!(
            schema(
                &mut file_with_footer(&footer(&[root, leaf], &[0x16, 0x02])),
                100
            ),
            Ok(Schema {
                depth: 1,
                columns: 1
            })
        );
    }

    #[test]
    fn malformed_footers_are_errors() {
        let mut file = file_with_footer(&chain(3)[..10]);
        assert!(schema(&mut file, 100).unwrap_err().contains("ends early"));
        let mut file = file_with_footer(&[0x1c; 200]);
        assert!(schema(&mut file, 100).is_err());
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(b"not parquet at all").expect("write");
        assert!(schema(&mut file, 100).unwrap_err().contains("PAR1"));
    }
}
