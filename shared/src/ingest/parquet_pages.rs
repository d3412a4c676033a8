//! The pages of a Parquet column chunk, walked header by header before the
//! `parquet` crate decodes them. The crate sizes a page's output buffer by
//! the `uncompressed_page_size` its header declares, which it checks
//! against nothing, and inflates a GZIP page to whatever it holds: a few
//! bytes of file could make a worker allocate gigabytes, and the footer's
//! column sizes (which `parse::check_row_group` checks for bombs) need not
//! agree with the pages. So every page here must declare no more than its
//! column chunk's uncompressed size (and all of them together no more), and
//! a GZIP page is inflated once, into nothing, to check that it holds no
//! more than it declares. (LZ4 frames, the other codec inflated without a
//! bound, are not read at all: see `parse::parse_parquet`.)
//!
//! What the walk returns, a chunk's largest page, is what the crate's row
//! iterator holds of that column at once; the parse reserves the sum over a
//! row group's columns from the process's budget.
use std::{
    fs::File,
    io::{self, BufReader, Read, Seek, SeekFrom},
};

use super::parquet_footer::{Compact, FALSE, Fields, Known, MAX_STRUCT_DEPTH, R, TRUE, Wire};

/// Bytes read to find one page header (statistics make some headers a few
/// KB); a header that does not end within [`MAX_HEADER`] is refused.
const FIRST_READ: usize = 16 << 10;
const MAX_HEADER: usize = 1 << 20;

/// One column chunk as the footer places it.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    pub start: u64,
    pub len: u64,
    /// Its declared uncompressed size.
    pub uncompressed: u64,
    /// Whether its pages are GZIP.
    pub gzip: bool,
    /// The fewest bits one value of its type takes stored plainly (1 for a
    /// boolean, 32 for a text with its length): a dictionary page may not
    /// declare more values than its bytes hold.
    pub value_bits: u64,
    /// Whether its values are byte arrays (texts, fixed-length arrays),
    /// which the crate keeps as 32-byte handles into the page.
    pub byte_arrays: bool,
}

const PAGE_HEADER: Known = &[
    (1, Wire::Int),
    (2, Wire::Int),
    (3, Wire::Int),
    (4, Wire::Int),
    (5, Wire::Struct),
    (6, Wire::Struct),
    (7, Wire::Struct),
    (8, Wire::Struct),
];
const DATA_PAGE_HEADER: Known = &[
    (1, Wire::Int),
    (2, Wire::Int),
    (3, Wire::Int),
    (4, Wire::Int),
    (5, Wire::Struct),
];
const DICTIONARY_PAGE_HEADER: Known = &[(1, Wire::Int), (2, Wire::Int), (3, Wire::Bool)];
const DATA_PAGE_HEADER_V2: Known = &[
    (1, Wire::Int),
    (2, Wire::Int),
    (3, Wire::Int),
    (4, Wire::Int),
    (5, Wire::Int),
    (6, Wire::Int),
    (7, Wire::Bool),
    (8, Wire::Struct),
];
/// What the crate keeps in memory per dictionary value of byte arrays
/// besides the page (a `ByteArray` handle).
const BYTE_ARRAY_HANDLE_BYTES: u64 = 32;

/// `PageType`s the walk tells apart (the format's enum values).
const INDEX_PAGE: i64 = 1;
const DICTIONARY_PAGE: i64 = 2;

/// What one page header says.
#[derive(Debug, Default)]
struct Page {
    kind: i64,
    /// The header's own length.
    header: u64,
    uncompressed: u64,
    compressed: u64,
    /// A v2 data page's level bytes, stored before its (compressed) values.
    levels: u64,
    /// False for a v2 data page stored uncompressed.
    compressed_values: bool,
    /// A dictionary page's values.
    values: u64,
}

/// Walks `chunk`'s pages; what reading it holds at once: its dictionary
/// page (kept while the data pages are read) and its largest data page, as
/// declared uncompressed.
pub fn walk_chunk(file: &mut File, chunk: Chunk) -> Result<u64, String> {
    let (mut at, mut total) = (0u64, 0u64);
    let (mut dictionary, mut largest) = (0u64, 0u64);
    while at < chunk.len {
        let page = read_page(file, chunk.start + at, chunk.len - at)?;
        let end = at
            .checked_add(page.header)
            .and_then(|v| v.checked_add(page.compressed))
            .filter(|end| *end <= chunk.len)
            .ok_or("a page runs past its column chunk")?;
        total = total.saturating_add(page.uncompressed);
        if total > chunk.uncompressed {
            return Err(format!(
                "its pages declare more than the {} bytes its column chunk does",
                chunk.uncompressed
            ));
        }
        match page.kind {
            DICTIONARY_PAGE => dictionary = dictionary.max(dictionary_size(&page, chunk)?),
            _ => largest = largest.max(page.uncompressed),
        }
        let stored = page.compressed.checked_sub(page.levels);
        let declared = page.uncompressed.checked_sub(page.levels);
        let (Some(stored), Some(declared)) = (stored, declared) else {
            return Err("a page's level bytes exceed its size".into());
        };
        // As the crate reads them: index pages and empty value sections
        // are not inflated.
        if chunk.gzip && page.compressed_values && page.kind != INDEX_PAGE && declared > 0 {
            let values_at = chunk.start + at + page.header + page.levels;
            check_inflated(file, values_at, stored, declared)?;
        }
        at = end;
    }
    Ok(dictionary.saturating_add(largest))
}

/// What a dictionary page holds in memory: the crate makes room for as
/// many values as its header declares, whatever its size (2^31 values in
/// an empty page asked for 64 GiB), so a page may declare no more values
/// than its bytes hold.
fn dictionary_size(page: &Page, chunk: Chunk) -> Result<u64, String> {
    let fit = page.uncompressed.saturating_mul(8) / chunk.value_bits.max(1);
    if page.values > fit {
        return Err(format!(
            "a dictionary page declares {} values in {} bytes",
            page.values, page.uncompressed
        ));
    }
    if chunk.byte_arrays {
        let handles = page.values.saturating_mul(BYTE_ARRAY_HANDLE_BYTES);
        return Ok(page.uncompressed.saturating_add(handles));
    }
    // Other values are held as themselves (a boolean in a byte).
    let each = (chunk.value_bits / 8).max(1);
    Ok(page.uncompressed.max(page.values.saturating_mul(each)))
}

/// Reads the page header at `pos` (at most `left` bytes of the chunk).
fn read_page(file: &mut File, pos: u64, left: u64) -> Result<Page, String> {
    let mut want = FIRST_READ;
    loop {
        let take = usize::try_from(left).unwrap_or(usize::MAX).min(want);
        let mut bytes = vec![0u8; take];
        file.seek(SeekFrom::Start(pos))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| format!("reading a page header: {e}"))?;
        match page_header(&mut Compact {
            bytes: &bytes,
            at: 0,
        }) {
            Ok(page) => return Ok(page),
            // Cut short by the read: read more, up to the limit.
            Err(_) if take == want && want < MAX_HEADER => want = MAX_HEADER,
            Err(e) => {
                // (The reader's messages name the footer it was written for.)
                let e = e.replace("footer", "header");
                return Err(format!("a page header is not readable: {e}"));
            }
        }
    }
}

/// Decodes a `PageHeader`: the sizes (fields 2 and 3), a dictionary
/// page's values (field 7) and a v2 data page's levels (field 8);
/// everything else is skipped. Fields are read as the crate reads them
/// (see `parquet_footer::Fields`).
fn page_header(c: &mut Compact<'_>) -> R<Page> {
    let mut page = Page {
        compressed_values: true,
        ..Page::default()
    };
    let (mut uncompressed, mut compressed) = (None, None);
    let mut fields = Fields::of(PAGE_HEADER);
    while let Some((id, kind)) = fields.next(c)? {
        match id {
            1 => page.kind = c.zigzag()?,
            2 => uncompressed = Some(size(c)?),
            3 => compressed = Some(size(c)?),
            5 => checked(c, DATA_PAGE_HEADER)?,
            7 => page.values = dictionary_values(c)?,
            8 => (page.levels, page.compressed_values) = v2_levels(c)?,
            _ => c.skip(kind, MAX_STRUCT_DEPTH)?,
        }
    }
    let (Some(uncompressed), Some(compressed)) = (uncompressed, compressed) else {
        return Err("no page sizes".into());
    };
    page.header = c.at as u64;
    page.uncompressed = uncompressed;
    page.compressed = compressed;
    Ok(page)
}

/// Skips a struct whose fields are checked as the crate reads them.
fn checked(c: &mut Compact<'_>, known: Known) -> R<()> {
    let mut fields = Fields::of(known);
    while let Some((_, kind)) = fields.next(c)? {
        c.skip(kind, MAX_STRUCT_DEPTH)?;
    }
    Ok(())
}

/// A `DictionaryPageHeader`'s `num_values` (field 1).
fn dictionary_values(c: &mut Compact<'_>) -> R<u64> {
    let mut values = 0;
    let mut fields = Fields::of(DICTIONARY_PAGE_HEADER);
    while let Some((id, kind)) = fields.next(c)? {
        match id {
            1 => values = size(c)?,
            _ => c.skip(kind, MAX_STRUCT_DEPTH)?,
        }
    }
    Ok(values)
}

/// A `DataPageHeaderV2`'s level bytes (fields 5 and 6) and `is_compressed`
/// (field 7, true when absent).
fn v2_levels(c: &mut Compact<'_>) -> R<(u64, bool)> {
    let (mut levels, mut compressed) = (0u64, true);
    let mut fields = Fields::of(DATA_PAGE_HEADER_V2);
    while let Some((id, kind)) = fields.next(c)? {
        match (id, kind) {
            (5 | 6, _) => levels = levels.saturating_add(size(c)?),
            (7, TRUE) => compressed = true,
            (7, FALSE) => compressed = false,
            _ => c.skip(kind, MAX_STRUCT_DEPTH)?,
        }
    }
    Ok((levels, compressed))
}

fn size(c: &mut Compact<'_>) -> R<u64> {
    u64::try_from(c.zigzag()?).map_err(|_| "a negative size".into())
}

/// Inflates the `stored` GZIP bytes at `pos` into nothing: refused when
/// they hold more than `declared` bytes (reading stops there).
fn check_inflated(file: &mut File, pos: u64, stored: u64, declared: u64) -> Result<(), String> {
    file.seek(SeekFrom::Start(pos))
        .map_err(|e| format!("reading a page: {e}"))?;
    let input = BufReader::new(Read::take(&mut *file, stored));
    let inflated = flate2::read::MultiGzDecoder::new(input);
    let held = io::copy(&mut inflated.take(declared + 1), &mut io::sink())
        .map_err(|e| format!("a GZIP page does not inflate: {e}"))?;
    if held > declared {
        return Err(format!(
            "a GZIP page holds more than the {declared} bytes its header declares (a decompression bomb)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// `v` as a Thrift varint.
    fn varint(out: &mut Vec<u8>, mut v: u32) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// A page header in Thrift compact bytes: type, sizes, crc-less.
    fn header(uncompressed: i32, compressed: i32) -> Vec<u8> {
        let zigzag = |v: i32| ((v << 1) ^ (v >> 31)) as u32;
        let mut out = Vec::new();
        for (delta, value) in [(1u8, 0i32), (1, uncompressed), (1, compressed)] {
            out.push(delta << 4 | super::super::parquet_footer::I32);
            varint(&mut out, zigzag(value));
        }
        out.push(0); // STOP
        out
    }

    /// A chunk of `len` bytes at the file's start, of one-byte values.
    fn chunk(len: u64, uncompressed: u64, gzip: bool) -> Chunk {
        Chunk {
            start: 0,
            len,
            uncompressed,
            gzip,
            value_bits: 8,
            byte_arrays: false,
        }
    }

    fn chunk_file(pages: &[(Vec<u8>, Vec<u8>)]) -> (File, u64) {
        let mut file = tempfile::tempfile().unwrap();
        let mut len = 0;
        for (head, body) in pages {
            file.write_all(head).unwrap();
            file.write_all(body).unwrap();
            len += (head.len() + body.len()) as u64;
        }
        (file, len)
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut out = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        out.write_all(data).unwrap();
        out.finish().unwrap()
    }

    #[test]
    fn pages_within_their_chunk_pass_and_tell_the_largest() {
        let (mut file, len) =
            chunk_file(&[(header(10, 4), vec![0; 4]), (header(30, 6), vec![0; 6])]);
        let chunk = chunk(len, 60, false);
        assert_eq!(walk_chunk(&mut file, chunk), Ok(30));
    }

    /// A page declaring 2 GiB in a chunk that declares 40 bytes; pages
    /// adding up past the chunk; a page running past it; a negative size.
    #[test]
    fn pages_that_disagree_with_their_chunk_are_refused() {
        for (pages, uncompressed) in [
            (vec![(header(i32::MAX, 10), vec![0; 10])], 40),
            (
                vec![(header(30, 4), vec![0; 4]), (header(30, 4), vec![0; 4])],
                40,
            ),
            (vec![(header(10, 50), vec![0; 4])], 40),
            (vec![(header(-1, 4), vec![0; 4])], 40),
        ] {
            let (mut file, len) = chunk_file(&pages);
            let chunk = chunk(len, uncompressed, false);
            assert!(walk_chunk(&mut file, chunk).is_err(), "{pages:?}");
        }
    }

    /// What a chunk holds at once is its dictionary page and its largest
    /// data page; an empty GZIP value section is not inflated (the crate
    /// does not either).
    #[test]
    fn the_dictionary_counts_beside_the_largest_data_page() {
        let mut dictionary = header(20, 4);
        dictionary[1] = 4; // type 2 (DICTIONARY_PAGE), zigzag
        let (mut file, len) = chunk_file(&[
            (dictionary, vec![0; 4]),
            (header(30, 6), vec![0; 6]),
            (header(0, 0), Vec::new()),
        ]);
        let chunk = chunk(len, 60, true);
        let walked = walk_chunk(
            &mut file,
            Chunk {
                gzip: false,
                ..chunk
            },
        );
        assert_eq!(walked, Ok(50));
        // The 4- and 6-byte bodies are not GZIP: only the empty page passes.
        let (mut file, len) = chunk_file(&[(header(0, 0), Vec::new())]);
        assert_eq!(walk_chunk(&mut file, Chunk { len, ..chunk }), Ok(0));
    }

    /// A dictionary page may declare no more values than its bytes hold
    /// (the crate makes room for every declared value: 2^31 of them in an
    /// empty page asked for 64 GiB); a size given twice, the second as an
    /// `i64` (the crate keeps the last), is refused.
    #[test]
    fn pages_the_crate_would_read_otherwise_are_refused() {
        let dictionary = |values: u32| {
            let mut head = vec![0x15, 0x04, 0x15, 0x08, 0x15, 0x08]; // type 2, sizes 4 and 4
            head.push(0x4c); // field 7 (+3), struct
            head.push(0x15); // num_values
            varint(&mut head, values << 1);
            head.extend([0x00, 0x00]);
            head
        };
        let mut twice = header(4, 4);
        twice.pop();
        twice.extend([0x06, 0x04, 0xfe, 0xff, 0xff, 0xff, 0x0f, 0x00]); // field 2 again, i64
        for (head, ok) in [
            (dictionary(1), true),
            (dictionary(i32::MAX as u32), false),
            (twice, false),
        ] {
            let (mut file, len) = chunk_file(&[(head.clone(), vec![0; 4])]);
            let chunk = Chunk {
                value_bits: 32,
                byte_arrays: true,
                ..chunk(len, 40, false)
            };
            let walked = walk_chunk(&mut file, chunk);
            assert_eq!(walked.is_ok(), ok, "{head:?}: {walked:?}");
        }
    }

    /// A GZIP page holding 1 MiB of zeros behind a header declaring 100
    /// bytes is refused before the crate would inflate it; one holding
    /// what it declares passes.
    #[test]
    fn a_gzip_page_holding_more_than_it_declares_is_refused() {
        let bomb = gzip(&vec![0; 1 << 20]);
        let honest = gzip(&[7; 100]);
        for (body, ok) in [(bomb, false), (honest, true)] {
            let (mut file, len) = chunk_file(&[(header(100, body.len() as i32), body)]);
            let chunk = chunk(len, 200, true);
            let walked = walk_chunk(&mut file, chunk);
            assert_eq!(walked.is_ok(), ok, "{walked:?}");
            if !ok {
                assert!(walked.unwrap_err().contains("decompression bomb"));
            }
        }
    }
}
