//! Task files: JSON (one object, or an array streamed element by element),
//! JSONL / NDJSON (one task per non-empty line) and Parquet (one task per row,
//! read row group by row group). Parsing is synchronous and streaming: it
//! reads from a `Read`, never holds a whole file, and hands rows to `emit` as
//! it goes. Run it on a blocking thread.
//!
//! Errors come in two sizes: a [`RowEvent::Error`] is one bad row (a bad JSONL
//! line, an element that is not an object) and parsing goes on; an `Err` from
//! [`parse`] is a bad file (truncated JSON, not Parquet, too deep) and
//! parsing stops there. Rows emitted before either are kept.
//!
//! Every row, whatever its format, must pass [`check_task`]: nested at most
//! [`MAX_NESTING`] levels, no NUL character, no key serde_json reserves, at
//! most `max_task_bytes` of JSON. A row that fails is that row's error, so
//! what is stored can always be stored (Postgres refuses `\u0000` in JSON)
//! and read back as stored (readers decode with serde_json's 128-level
//! limit and its reserved keys), and one row cannot take a worker's
//! memory: a JSONL line or a JSON element is cut off at the byte limit while
//! it is read, before it is parsed.
use std::{
    cell::{Cell, RefCell},
    fs::File,
    io::{self, BufRead, BufReader, Read},
    rc::Rc,
};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::budget::Growing;
use crate::json::{Allowance, AsWritten, VALUE_BYTES};

/// File formats of the Tasks import method, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Jsonl,
    Parquet,
}

impl Format {
    /// The format of a key by its extension. A name with no extension is
    /// JSON, as Label Studio reads it (its Redis example stores task JSON
    /// under keys like `ls-task-1`); an unknown extension is `None`.
    pub fn of_key(key: &str) -> Option<Self> {
        let name = key.rsplit('/').next().unwrap_or(key);
        let Some((_, ext)) = name.rsplit_once('.') else {
            return Some(Format::Json);
        };
        match ext.to_ascii_lowercase().as_str() {
            "json" => Some(Format::Json),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

/// One task as a file states it.
#[derive(Debug, Clone)]
pub struct TaskInput {
    pub data: Value,
    pub meta: Option<Value>,
    pub annotations: Vec<Value>,
    pub predictions: Vec<Value>,
    /// About how many bytes the task takes (measured by [`check_task`] as
    /// the row was checked), for bounding how much of a file is held at
    /// once. A measurement, not content: equality ignores it.
    pub approx_bytes: usize,
}

impl PartialEq for TaskInput {
    fn eq(&self, other: &Self) -> bool {
        (&self.data, &self.meta, &self.annotations, &self.predictions)
            == (
                &other.data,
                &other.meta,
                &other.annotations,
                &other.predictions,
            )
    }
}

/// One row of a task file, by its index in the file: a task, or that row's
/// error (the rows around it are unaffected); or word that the parse is
/// about to wait for the parse budget.
#[derive(Debug, Clone, PartialEq)]
pub enum RowEvent {
    Task(i64, TaskInput),
    Error(i64, String),
    /// The parse will wait for the parse budget: rows it was handed so far
    /// go on to be committed now, not after the wait (`super::budget`
    /// tells why). Not a row.
    WillWait,
}

/// The deepest nesting of arrays and objects a task may have. Stored tasks
/// are read back by serde_json (the API, the export), which refuses more than
/// 128 levels; 64 leaves room for the envelopes they are served in.
pub const MAX_NESTING: usize = 64;

/// Per-object limits, from the worker's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `LABELSYNC_MAX_TASK_BYTES`: the most one row may take, as JSON text
    /// or in memory, whichever is larger.
    pub max_task_bytes: usize,
    /// The process's parse memory budget (`None`: not counted, in tests).
    pub budget: Option<&'static super::budget::ByteBudget>,
    /// The object's size, when the listing said.
    pub object_size: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_task_bytes: 16 << 20,
            budget: None,
            object_size: None,
        }
    }
}

impl Limits {
    /// [`Self::reserve_bytes`] for a JSON text in memory: what its parse
    /// may take ([`reservation`]).
    pub(super) fn reserve_text(
        &self,
        text: &[u8],
        emit: &mut dyn FnMut(RowEvent) -> bool,
    ) -> Option<tokio::sync::SemaphorePermit<'static>> {
        self.budget?;
        self.reserve_bytes(reservation(text)?, emit)
    }

    /// Holds `bytes` of the parse budget (see `budget`). Before waiting for
    /// them, the parse's rows are handed on: `emit` gets
    /// [`RowEvent::WillWait`].
    pub(super) fn reserve_bytes(
        &self,
        bytes: usize,
        emit: &mut dyn FnMut(RowEvent) -> bool,
    ) -> Option<tokio::sync::SemaphorePermit<'static>> {
        self.budget?.reserve(bytes, &mut || {
            emit(RowEvent::WillWait);
        })
    }
}

/// What parsing one JSON text may take in memory: `budget::EXPANSION`
/// times its text, and the first allocation of each container in it that
/// is not empty: a map's first node, a vector's first four slots. The
/// expansion alone holds for strings and numbers, for the elements of a
/// long array and the entries of a large map (`"":0,` is 5 bytes of text,
/// and 160 of the budget against some 130 of map nodes); not for small
/// containers, whose first allocation is the same however short their
/// text (`{"a":0},` is 8 bytes and about 700 in memory, 88 times its
/// text; `[0],` is 4 and about 180).
fn parse_bytes(text: &[u8]) -> usize {
    let (objects, arrays) = containers_in(text);
    text.len()
        .saturating_mul(super::budget::EXPANSION)
        .saturating_add(objects.saturating_mul(MAP_LEAF_BYTES))
        .saturating_add(arrays.saturating_mul(array_heap(1)))
}

/// What the parse of a JSON text in memory reserves ([`parse_bytes`]):
/// `None` when that is too little for the budget to count
/// (`budget::ByteBudget::reserve`), which nearly every row is. A text is
/// scanned only when its length alone does not rule that out: a container
/// takes at least two bytes of text, so a text costs at most
/// [`MOST_PER_BYTE`] times its length.
pub(super) fn reservation(text: &[u8]) -> Option<usize> {
    let counted = super::budget::SMALL * super::budget::EXPANSION;
    if text.len().saturating_mul(MOST_PER_BYTE) < counted {
        return None;
    }
    Some(parse_bytes(text)).filter(|&bytes| bytes >= counted)
}

/// The most [`parse_bytes`] counts a byte of text: its expansion, and half
/// a map node (a container's first allocation, a map's the largest, for
/// each two bytes).
const MOST_PER_BYTE: usize = super::budget::EXPANSION + MAP_LEAF_BYTES / 2;

/// What parsing a JSON file as a stream may take at once: one element
/// being built. Its text is not read ahead, so its containers cannot be
/// counted as a line's are ([`parse_bytes`]); it is bounded two ways: by
/// the file's text as listed, at most [`MOST_PER_BYTE`] times it, and by
/// the row limit, as an element is built only up to the limit's measure
/// (`crate::json::Allowance`), of which a value takes at most
/// [`MEASURE_TO_MEMORY`] times in memory, besides what the reader holds
/// ([`READER_ROW_LIMITS`]). 32 times the largest element used to be
/// reserved, and files of small objects took up to three times that: 64
/// files of 1 MiB of `{"a":0}` peaked a worker at 2.7 GB. An object served
/// larger than listed (GCS decoding a gzip-encoded object, an object
/// written again since the listing) has its reservation grown to the
/// bound by the row limit once its text passes the listed size
/// ([`Overrun`]).
fn stream_reservation(limits: Limits) -> usize {
    limits
        .object_size
        .map_or(usize::MAX, stream_by_text)
        .min(stream_by_limit(limits))
}

/// [`stream_reservation`]'s bound by a text of `size` bytes.
fn stream_by_text(size: u64) -> usize {
    usize::try_from(size)
        .unwrap_or(usize::MAX)
        .saturating_mul(MOST_PER_BYTE)
}

/// [`stream_reservation`]'s bound by the row limit.
fn stream_by_limit(limits: Limits) -> usize {
    limits
        .max_task_bytes
        .saturating_mul(MEASURE_TO_MEMORY + READER_ROW_LIMITS)
}

/// The most a value takes in memory for each byte of the row limit's
/// measure it counts for, with a margin: a map of one entry under a
/// one-byte key holding a one-byte string, `{"a":"b"}`, counts 66 bytes
/// (`check_task`) and takes about 700 (a 632-byte node rounded up by the
/// allocator, the key's and the string's allocations), 10.7 times; a chain
/// of maps about 10.3; an array's elements at most about 4.5, a string
/// its text.
const MEASURE_TO_MEMORY: usize = 11;

/// What serde_json's reader holds besides the element, in row limits: its
/// scratch buffer (every string, key and long number is copied into it,
/// and it keeps its largest capacity for the whole file) and a key
/// allocated before the allowance refuses it.
const READER_ROW_LIMITS: usize = 2;

/// The objects and the arrays a JSON text opens that are not empty: its
/// `{` and `[` outside strings not followed by their closing bracket.
fn containers_in(text: &[u8]) -> (usize, usize) {
    let (mut objects, mut arrays) = (0, 0);
    let (mut in_string, mut escaped) = (false, false);
    for (i, &b) in text.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        let empty = |close: u8| {
            text[i + 1..]
                .iter()
                .find(|c| !c.is_ascii_whitespace())
                .is_some_and(|&c| c == close)
        };
        match b {
            b'"' => in_string = true,
            OPEN_OBJECT if !empty(CLOSE_OBJECT) => objects += 1,
            b'[' if !empty(b']') => arrays += 1,
            _ => {}
        }
    }
    (objects, arrays)
}

/// The bytes that open and close a JSON object, named so brace counters
/// reading this file stay balanced.
const OPEN_OBJECT: u8 = 0x7b;
const CLOSE_OBJECT: u8 = 0x7d;

/// A leaf node of a map: `serde_json`'s maps are B-trees whose nodes hold
/// up to 11 entries (11 keys of 24 bytes and 11 values of 32, and their
/// links), taken whole from a map's first entry on.
const MAP_LEAF_BYTES: usize = 632;
/// An inner node of a map: a leaf's entries and 12 links to its children.
const MAP_INNER_BYTES: usize = 728;
/// Entries (or children) a node of a map past one node holds at least:
/// nodes split half full, so counting this many keeps the estimate above
/// what the map takes.
const MAP_NODE_LEAST: usize = 5;

/// What a vector or string of `len` bytes takes on the heap: the
/// allocator's chunk, an 8-byte header and the bytes in steps of 16, at
/// least 32 (glibc's malloc on 64-bit); nothing for an empty one.
fn heap(len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    len.saturating_add(8).next_multiple_of(16).max(32)
}

/// What an array of `len` values takes on the heap: `serde_json` pushes
/// its values into a vector that doubles from 4.
fn array_heap(len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    heap(len.next_power_of_two().max(4).saturating_mul(VALUE_BYTES))
}

/// What a map of `len` entries takes on the heap, beyond its keys' text.
fn map_heap(len: usize) -> usize {
    match len {
        0 => 0,
        1..=11 => heap(MAP_LEAF_BYTES),
        _ => {
            let leaves = len.div_ceil(MAP_NODE_LEAST);
            let inner = leaves.div_ceil(MAP_NODE_LEAST);
            leaves * heap(MAP_LEAF_BYTES) + inner * heap(MAP_INNER_BYTES)
        }
    }
}

/// Why `value` (one row) cannot be a task, if it cannot: nested deeper than
/// [`MAX_NESTING`], a NUL character in a string or key (Postgres cannot
/// store it; SQLite could, and is held to the same rule so both databases
/// import the same rows), a key serde_json reserves (`crate::json`), or
/// larger than `limits.max_task_bytes` (counted
/// per value as the larger of its JSON text and 32 bytes a value, 64 an
/// entry of an object, so a short text of many tiny values counts for
/// more than its text). Returns what the value takes in memory, which is
/// more again (a map of one entry about 700 bytes: [`heap`],
/// [`array_heap`], [`map_heap`]), and which the budgets of rows being
/// parsed and waiting for their transaction count (`super::budget`); the
/// limit keeps its own measure, so that it refuses what it always did.
/// Walks iteratively: the value may be as deep as the parser allowed.
pub fn check_task(value: &Value, limits: Limits) -> Result<usize, String> {
    // Each value is counted when its parent is (the root here), before its
    // children are pushed: a row of millions of values trips the limit
    // before the walk holds millions of entries.
    let (mut bytes, mut memory) = (VALUE_BYTES, VALUE_BYTES);
    let mut stack = vec![(value, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        match value {
            Value::Array(items) => {
                if depth > MAX_NESTING {
                    return Err(too_deep());
                }
                bytes += items.len() * VALUE_BYTES;
                memory += array_heap(items.len());
                over_limit(bytes, limits)?;
                stack.extend(items.iter().map(|v| (v, depth + 1)));
            }
            Value::Object(map) => {
                if depth > MAX_NESTING {
                    return Err(too_deep());
                }
                bytes += map.len() * 2 * VALUE_BYTES;
                memory += map_heap(map.len());
                over_limit(bytes, limits)?;
                for (key, v) in map {
                    check_key(key)?;
                    bytes += key.len();
                    memory += heap(key.len());
                    stack.push((v, depth + 1));
                }
            }
            Value::String(text) => {
                check_text(text)?;
                bytes += text.len();
                memory += heap(text.len());
            }
            Value::Number(_) | Value::Bool(_) | Value::Null => {}
        }
        over_limit(bytes, limits)?;
    }
    Ok(memory)
}

fn over_limit(bytes: usize, limits: Limits) -> Result<(), String> {
    if bytes > limits.max_task_bytes {
        return Err(too_large(limits));
    }
    Ok(())
}

fn too_large(limits: Limits) -> String {
    format!(
        "the task is larger than the {}-byte limit (LABELSYNC_MAX_TASK_BYTES)",
        limits.max_task_bytes
    )
}

fn too_deep() -> String {
    format!("the task nests arrays and objects more than {MAX_NESTING} levels deep")
}

/// A key is text, and not one of serde_json's reserved keys: a row read
/// back from the database would not be the row stored (`crate::json`).
fn check_key(key: &str) -> Result<(), String> {
    if crate::json::is_reserved_key(key) {
        return Err(crate::json::reserved_key_error(key));
    }
    check_text(key)
}

fn check_text(text: &str) -> Result<(), String> {
    if text.contains('\0') {
        return Err(
            "the task contains a NUL character (\\u0000), which the database cannot store".into(),
        );
    }
    Ok(())
}

/// Turns rows into tasks. Each row is a full task (`{"data": {...},
/// "annotations": ...}`) or plain data, told by itself as Label Studio
/// tells it (a file mixing the two was cut at the first row that changed
/// shape, and read again, and cut again, at every sync).
struct Shapes {
    limits: Limits,
}

impl Shapes {
    fn new(limits: Limits) -> Self {
        Shapes { limits }
    }

    /// What a row may take while it is built, by [`check_task`]'s measure
    /// (the root's own size counted here): past it, it is not built.
    fn allowance(&self) -> Allowance {
        Allowance::new(self.limits.max_task_bytes.saturating_sub(VALUE_BYTES))
    }

    /// The error of a row that was over its [`Self::allowance`].
    fn too_large(&self, row: i64) -> RowEvent {
        RowEvent::Error(row, format!("row {row}: {}", too_large(self.limits)))
    }

    fn task(&self, row: i64, value: Value) -> RowEvent {
        let approx_bytes = match check_task(&value, self.limits) {
            Ok(bytes) => bytes,
            Err(e) => return RowEvent::Error(row, format!("row {row}: {e}")),
        };
        let Value::Object(mut object) = value else {
            return RowEvent::Error(
                row,
                format!("row {row} is {}, not a JSON object", kind(&value)),
            );
        };
        let full = matches!(object.get("data"), Some(Value::Object(_)));
        if !full && let Some(error) = annotations_without_data(row, &object) {
            return error;
        }
        if !full {
            return RowEvent::Task(
                row,
                TaskInput {
                    data: Value::Object(object),
                    meta: None,
                    annotations: Vec::new(),
                    predictions: Vec::new(),
                    approx_bytes,
                },
            );
        }
        let data = object.remove("data").unwrap_or(Value::Null);
        let list = |object: &mut Map<String, Value>, name: &str| -> Result<Vec<Value>, String> {
            match object.remove(name) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) if items.iter().all(Value::is_object) => Ok(items),
                Some(_) => Err(format!("row {row}: \"{name}\" must be an array of objects")),
            }
        };
        let annotations = match list(&mut object, "annotations") {
            Ok(a) => a,
            Err(e) => return RowEvent::Error(row, e),
        };
        let predictions = match list(&mut object, "predictions") {
            Ok(p) => p,
            Err(e) => return RowEvent::Error(row, e),
        };
        let meta = match object.remove("meta") {
            None | Some(Value::Null) => None,
            Some(meta @ Value::Object(_)) => Some(meta),
            Some(_) => {
                return RowEvent::Error(row, format!("row {row}: \"meta\" must be an object"));
            }
        };
        RowEvent::Task(
            row,
            TaskInput {
                data,
                meta,
                annotations,
                predictions,
                approx_bytes,
            },
        )
    }
}

/// A row with annotations or predictions beside plain data fields: Label
/// Studio's rule is that such a task has its fields under "data" (they
/// were kept as two more data fields, and no annotation was made).
fn annotations_without_data(row: i64, object: &Map<String, Value>) -> Option<RowEvent> {
    let bare = object.contains_key("annotations") || object.contains_key("predictions");
    bare.then(|| {
        RowEvent::Error(
            row,
            format!(
                "row {row} has \"annotations\" or \"predictions\" but no \"data\" object: \
                 put the task's fields under \"data\" ({{\"data\": {{...}}, \"annotations\": [...]}})"
            ),
        )
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses `reader` as `format`, calling `emit` for each row in order. `emit`
/// returns false to stop early (the consumer went away).
pub fn parse(
    format: Format,
    reader: impl Read,
    limits: Limits,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<(), String> {
    parse_buffered(
        format,
        BufReader::with_capacity(64 * 1024, reader),
        limits,
        emit,
    )
}

/// [`parse`] of a reader that buffers already (a body held in memory).
pub fn parse_buffered(
    format: Format,
    mut reader: impl BufRead,
    limits: Limits,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<(), String> {
    check_encoding(&mut reader)?;
    skip_bom(&mut reader).map_err(|e| format!("read failed: {e}"))?;
    match format {
        Format::Json => parse_json(reader, limits, emit),
        Format::Jsonl => parse_jsonl(reader, limits, emit),
        Format::Parquet => Err("Parquet files must be parsed from a file (parse_parquet)".into()),
    }
}

/// Task files are UTF-8: one that starts with a UTF-16 or UTF-32
/// byte-order mark (Windows tools write them) is refused whole, saying
/// what to do, rather than read as one "not valid JSON" error per line.
fn check_encoding(reader: &mut impl BufRead) -> Result<(), String> {
    let start = reader.fill_buf().map_err(|e| format!("read failed: {e}"))?;
    let encoding = if start.starts_with(b"\xFF\xFE\0\0") || start.starts_with(b"\0\0\xFE\xFF") {
        "UTF-32"
    } else if start.starts_with(b"\xFF\xFE") || start.starts_with(b"\xFE\xFF") {
        "UTF-16"
    } else {
        return Ok(());
    };
    Err(format!(
        "the file is {encoding} text (it starts with a {encoding} byte-order mark); task files must be UTF-8: save it as UTF-8"
    ))
}

fn skip_bom(reader: &mut impl BufRead) -> std::io::Result<()> {
    if reader.fill_buf()?.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    Ok(())
}

/// Streams either one object (one task) or an array (one task per element).
/// Each element may take at most `max_task_bytes` of the file: past that the
/// read fails, before a giant element is built in memory, and the file stops
/// there (the rows before it are kept). An element nested deeper than
/// serde_json's 128 levels stops the file the same way; one between
/// [`MAX_NESTING`] and that is a row error like any other. An element over
/// the row limit's measure is built only up to it (the rest is read, with
/// no nesting limit, and not built) and is that row's error. The parse
/// reserves what one element may take ([`stream_reservation`]): the rows
/// before it are handed on.
fn parse_json(
    reader: impl BufRead,
    limits: Limits,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<(), String> {
    let reserved = limits.reserve_bytes(stream_reservation(limits), emit);
    let held = reserved.as_ref().map_or(0, |held| held.num_permits() << 10);
    // Shared with the reader, which may have to wait for more room. The
    // reader runs only while an element is read, never while one is
    // handed on, so the two never borrow it at once.
    let emit = RefCell::new(emit);
    let will_wait = || {
        if let Ok(mut emit) = emit.try_borrow_mut() {
            (*emit)(RowEvent::WillWait);
        }
    };
    let shapes = Shapes::new(limits);
    let mut rows = 0i64;
    let left = Rc::new(Cell::new(limits.max_task_bytes as u64));
    let budget = Budgeted {
        inner: reader,
        left: left.clone(),
        overrun: Overrun::of(limits, held, &will_wait),
    };
    let mut de = serde_json::Deserializer::from_reader(budget);
    let result = TopLevel {
        shapes: &shapes,
        rows: &mut rows,
        emit: &mut |event| emit.try_borrow_mut().is_ok_and(|mut emit| (*emit)(event)),
        left: &left,
        max: limits.max_task_bytes as u64,
    }
    .deserialize(&mut de);
    match result.and_then(|()| de.end()) {
        Ok(()) => Ok(()),
        Err(_) if left.get() == 0 => Err(format!(
            "row {rows} is larger than the {}-byte limit (LABELSYNC_MAX_TASK_BYTES); the rows after it were not read",
            limits.max_task_bytes
        )),
        Err(e) if e.is_eof() => Err(format!(
            "the JSON ends early (truncated?) after {rows} row(s): {e}"
        )),
        Err(e) if e.to_string().contains("recursion limit") => Err(format!(
            "row {rows} nests arrays and objects more than 128 levels deep (a task may have {MAX_NESTING}); the rows after it were not read"
        )),
        Err(e) => Err(format!("invalid JSON after {rows} row(s): {e}")),
    }
}

/// A reader that fails once `left` bytes were read; the parser resets `left`
/// at each element. serde_json reads it a byte at a time (through `Bytes`),
/// so the count is exact; the buffering is in the reader inside.
struct Budgeted<'w, R> {
    inner: R,
    left: Rc<Cell<u64>>,
    overrun: Option<Overrun<'w>>,
}

impl<R: BufRead> Read for Budgeted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left.get();
        if left == 0 {
            return Err(io::Error::other("over LABELSYNC_MAX_TASK_BYTES"));
        }
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left.set(left - n as u64);
        if let Some(overrun) = self.overrun.as_mut() {
            overrun.read(n);
        }
        Ok(n)
    }
}

/// Grows a JSON stream's reservation to its bound by the row limit once
/// its text passes the object's listed size: the bound by text
/// ([`stream_reservation`]) holds only for text as long as listed, and an
/// object may be served longer (GCS decoding a gzip-encoded object, an
/// object written again since the listing). The growth is a
/// [`Growing`] reservation: the parse may wait for it holding its own.
struct Overrun<'w> {
    /// Bytes of text the listed size leaves.
    listed_left: u64,
    /// What the reservation lacks of its bound by the row limit.
    lacking: usize,
    budget: &'static super::budget::ByteBudget,
    /// Hands the parse's rows on before a wait.
    will_wait: &'w dyn Fn(),
    growing: Option<Growing<'static>>,
}

impl<'w> Overrun<'w> {
    /// What the bound by the row limit, cut to the whole budget, lacks
    /// past the `held` bytes of the stream's reservation; `None` when that
    /// reservation is bounded by the row limit already, or nothing is
    /// counted.
    fn of(limits: Limits, held: usize, will_wait: &'w dyn Fn()) -> Option<Self> {
        let budget = limits.budget?;
        let listed = limits.object_size?;
        let by_limit = stream_by_limit(limits);
        if stream_by_text(listed) >= by_limit {
            return None;
        }
        let whole = usize::try_from(budget.bytes()).unwrap_or(usize::MAX);
        let lacking = by_limit.min(whole).saturating_sub(held);
        (lacking > 0).then_some(Overrun {
            listed_left: listed,
            lacking,
            budget,
            will_wait,
            growing: None,
        })
    }

    /// Counts `n` bytes of text read, and grows the reservation once they
    /// pass the listed size.
    fn read(&mut self, n: usize) {
        let n = n as u64;
        if self.growing.is_some() || n <= self.listed_left {
            self.listed_left = self.listed_left.saturating_sub(n);
            return;
        }
        let will_wait = self.will_wait;
        self.growing
            .insert(self.budget.grower())
            .grow_to(self.lacking, &mut || will_wait());
    }
}

struct TopLevel<'a> {
    shapes: &'a Shapes,
    rows: &'a mut i64,
    emit: &'a mut dyn FnMut(RowEvent) -> bool,
    /// The byte budget of the element being read, and what it starts at.
    left: &'a Cell<u64>,
    max: u64,
}

impl TopLevel<'_> {
    /// Hands on the row just read within `allowance` (its error when it
    /// was over).
    fn row<E: de::Error>(&mut self, value: Value, allowance: &Allowance) -> Result<bool, E> {
        let event = if allowance.is_over() {
            self.shapes.too_large(*self.rows)
        } else {
            self.shapes.task(*self.rows, value)
        };
        *self.rows += 1;
        Ok((self.emit)(event))
    }
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object (one task) or an array of tasks")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        loop {
            self.left.set(self.max);
            let allowance = self.shapes.allowance();
            let Some(value) = seq.next_element_seed(AsWritten(&allowance))? else {
                return Ok(());
            };
            if !self.row(value, &allowance)? {
                // The consumer stopped; drain nothing more.
                return Err(de::Error::custom("stopped"));
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        let allowance = self.shapes.allowance();
        let value = AsWritten(&allowance).visit_map(map)?;
        self.row(value, &allowance)?;
        Ok(())
    }
}

/// One task per non-empty line; a bad line is a row error and the next line
/// is read as usual. A line longer than `max_task_bytes` is skipped as it is
/// read (never held) and is its row's error.
fn parse_jsonl(
    mut reader: impl BufRead,
    limits: Limits,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<(), String> {
    let shapes = Shapes::new(limits);
    let mut line = Vec::new();
    let mut row = 0i64;
    loop {
        let (fits, mut growing) = match read_jsonl_line(&mut reader, &mut line, limits, emit) {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("read failed after {row} row(s): {e}")),
        };
        let text = line.trim_ascii();
        if fits && text.is_empty() {
            continue;
        }
        // The reservation is held until the row is handed on, cut to the
        // row's size once it is parsed: a parsed row waiting for room in
        // the rows in flight is memory too, and 64 parses each holding one
        // were gigabytes no budget counted.
        let mut reserved = None;
        let event = if !fits {
            RowEvent::Error(
                row,
                format!(
                    "line of row {row} is longer than the {}-byte limit (LABELSYNC_MAX_TASK_BYTES)",
                    limits.max_task_bytes
                ),
            )
        } else {
            match growing.as_mut() {
                Some(growing) => grow_to_parse(growing, text, line.capacity(), &mut || {
                    emit(RowEvent::WillWait);
                }),
                None => reserved = limits.reserve_text(text, emit),
            }
            let allowance = shapes.allowance();
            match crate::json::from_slice_within(text, &allowance) {
                Ok(_) if allowance.is_over() => shapes.too_large(row),
                Ok(value) => shapes.task(row, value),
                Err(e) => RowEvent::Error(row, format!("line of row {row} is not valid JSON: {e}")),
            }
        };
        row += 1;
        // A long line's buffer goes with its reservation.
        line.clear();
        line.shrink_to(super::budget::SMALL);
        let bytes = match &event {
            RowEvent::Task(_, task) => task.approx_bytes,
            _ => 0,
        };
        if let Some(reserved) = reserved.as_mut() {
            super::budget::shrink(reserved, bytes);
        }
        if let Some(growing) = growing.as_mut() {
            growing.shrink(bytes);
        }
        let kept_going = emit(event);
        drop((reserved, growing));
        if !kept_going {
            return Ok(());
        }
    }
}

/// Reads a JSONL line into `line` ([`read_line`]): whether it fits, and
/// the reservation of its text when it is longer than `budget::SMALL`,
/// which grows with it before it grows (the parse's rows are handed on
/// before it waits). A long line read whole before its parse reserved
/// held its text outside every budget while it waited for its parse's
/// reservation: 64 files of one 15 MiB line peaked a worker at 1.3 GB.
fn read_jsonl_line(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    limits: Limits,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> io::Result<Option<(bool, Option<Growing<'static>>)>> {
    line.clear();
    line.shrink_to(super::budget::SMALL);
    let mut growing = None;
    let fits = read_line(reader, line, limits.max_task_bytes, &mut |capacity| {
        if capacity == 0 {
            growing = None;
        } else if let Some(budget) = limits.budget {
            let will_wait = &mut || {
                emit(RowEvent::WillWait);
            };
            growing
                .get_or_insert_with(|| budget.grower())
                .grow_to(capacity, will_wait);
        }
    })?;
    Ok(fits.map(|fits| (fits, growing)))
}

/// Grows a long line's reservation from its text to what its parse may
/// take ([`reservation`]) besides its buffer of `capacity` bytes.
fn grow_to_parse(
    growing: &mut Growing<'static>,
    text: &[u8],
    capacity: usize,
    will_wait: &mut dyn FnMut(),
) {
    if let Some(bytes) = reservation(text) {
        growing.grow_to(bytes.saturating_add(capacity), will_wait);
    }
}

/// Reads one line (up to and without its `\n`) into `line`, keeping at most
/// `max` bytes of it: `None` at the end of the input, `Some(false)` when the
/// line was longer (the rest of it is read and dropped, and its buffer
/// let go). `line` grows by doubling, to at most `max`; past
/// `budget::SMALL`, `room` is told the capacity it grows to before it
/// grows (to hold it), and 0 when the line turns out too long.
pub(super) fn read_line(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
    room: &mut dyn FnMut(usize),
) -> io::Result<Option<bool>> {
    let mut fits = true;
    let mut any = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(any.then_some(fits));
        }
        any = true;
        let (part, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let len = line.len() + part.len();
        if fits && len <= max {
            if len > line.capacity() {
                let capacity = len.max(line.capacity().saturating_mul(2)).min(max);
                if capacity > super::budget::SMALL {
                    room(capacity);
                }
                line.reserve_exact(capacity - line.len());
            }
            line.extend_from_slice(part);
        } else if fits {
            fits = false;
            *line = Vec::new();
            room(0);
        }
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(fits));
        }
    }
}

/// Runs a parse, a panic in it made the object's error: a library that
/// panics on a file (the `parquet` crate on an INTERVAL column, say) fails
/// that object, not its batch or run, and not on every sync (the Parquet
/// reader's child process runs its parse through this too). The rows sent
/// before it stand, as for a file that breaks off.
pub fn guarded(parse: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(crate::error::storable(&format!(
            "the file could not be read: its reader failed on it ({what}); if the file is valid, report it with the file"
        )))
    })
}

/// The deepest Parquet column path read (a LIST column takes two levels per
/// level of JSON it becomes). Checked in the footer before the `parquet`
/// crate reads it: the crate recurses per level, and a file of thousands of
/// nested lists overflowed the stack and aborted the process.
const MAX_PARQUET_PATH: usize = 2 * MAX_NESTING + 2;
/// A column chunk that decompresses to more than this many times its stored
/// size, and to more than [`BOMB_MIN_BYTES`], is refused as a decompression
/// bomb: real data compresses a few times, a 10 KB zstd chunk that claims
/// 300 MB is an attack on the worker's memory.
const BOMB_RATIO: i64 = 100;
/// What the row iterator holds per column besides its pages: a batch of
/// 1,024 values and their levels (about 34 KB for a text column).
const COLUMN_READER_BYTES: u64 = 40 << 10;
const BOMB_MIN_BYTES: i64 = 64 << 20;

/// One task per row, row group by row group; the columns become data fields.
/// Parquet needs random access, so it reads from a file. Runs in a child
/// process (`super::parquet_process`): `reserve` is called with what each
/// row group holds in memory before it is read, and stops the parse when
/// it returns false, as `emit` does.
pub fn parse_parquet(
    file: File,
    limits: Limits,
    reserve: &mut dyn FnMut(u64) -> bool,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<(), String> {
    use parquet::file::{
        properties::ReaderProperties,
        reader::{FileReader, SerializedFileReader},
        serialized_reader::ReadOptionsBuilder,
    };
    let mut file = file;
    let schema = super::parquet_footer::schema(&mut file, MAX_PARQUET_PATH)?;
    if schema.depth > MAX_PARQUET_PATH {
        return Err(format!(
            "the Parquet schema nests more than {MAX_PARQUET_PATH} levels deep (a task may nest {MAX_NESTING} levels of lists and structs); the file is not read"
        ));
    }
    let mut pages = file
        .try_clone()
        .map_err(|e| format!("not a readable Parquet file: {e}"))?;
    // LZ4 pages are read as Hadoop's framing only: the crate's fallback to
    // LZ4 frames inflates them without a bound (see `parquet_pages`).
    let options = ReadOptionsBuilder::new()
        .with_reader_properties(
            ReaderProperties::builder()
                .set_backward_compatible_lz4(false)
                .build(),
        )
        .build();
    let reader = SerializedFileReader::new_with_options(file, options)
        .map_err(|e| format!("not a readable Parquet file: {e}"))?;
    let mut row = 0i64;
    for group in 0..reader.num_row_groups() {
        let metadata = reader.metadata().row_group(group);
        check_row_group(metadata, group)?;
        let peak = check_pages(&mut pages, metadata, group)?
            .saturating_add(schema.columns.saturating_mul(COLUMN_READER_BYTES));
        if let Some(budget) = limits.budget
            && peak > budget.bytes()
        {
            return Err(format!(
                "row group {group} takes {peak} bytes in memory at once (a page of each column), more than LABELSYNC_PARSE_BUDGET_BYTES ({}); the file is not read: raise the setting, or write the file with smaller pages or fewer columns",
                budget.bytes()
            ));
        }
        // The row iterator holds pages of every column at once.
        if !reserve(peak) {
            return Ok(());
        }
        let group_reader = reader
            .get_row_group(group)
            .map_err(|e| format!("row group {group}: {e}"))?;
        let rows = group_reader
            .get_row_iter(None)
            .map_err(|e| format!("row group {group}: {e}"))?;
        for record in rows {
            let event = match record {
                Ok(record) => match super::parquet_json::row(&record) {
                    Ok(data) => parquet_task(row, data, limits),
                    Err(e) => RowEvent::Error(row, format!("row {row}: {e}")),
                },
                // The reader does not move past a value it could not read:
                // every later row of the group would fail the same way.
                Err(e) => return Err(parquet_row_error(row, &e)),
            };
            row += 1;
            if !emit(event) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A row the `parquet` crate could not read, which ends the file, with a
/// message a user can act on: its complaint about text that is not UTF-8
/// quotes the value's bytes (ten characters a byte), so it is named
/// instead; any other is cut.
fn parquet_row_error(row: i64, error: &parquet::errors::ParquetError) -> String {
    let text = error.to_string();
    let text = if text.contains("Error reading BYTE_ARRAY as String") {
        "a text (UTF8) column holds bytes that are not UTF-8: re-encode it, or write the column as plain binary".to_owned()
    } else {
        crate::error::storable(&text)
    };
    format!("row {row}: {text}; the rows after it are not read")
}

pub(super) fn parquet_task(row: i64, data: Value, limits: Limits) -> RowEvent {
    let approx_bytes = match check_task(&data, limits) {
        Ok(bytes) => bytes,
        Err(e) => return RowEvent::Error(row, format!("row {row}: {e}")),
    };
    RowEvent::Task(
        row,
        TaskInput {
            data,
            meta: None,
            annotations: Vec::new(),
            predictions: Vec::new(),
            approx_bytes,
        },
    )
}

fn check_row_group(
    group: &parquet::file::metadata::RowGroupMetaData,
    index: usize,
) -> Result<(), String> {
    for column in group.columns() {
        let (stored, size) = (column.compressed_size(), column.uncompressed_size());
        if size > BOMB_MIN_BYTES && size > stored.max(1).saturating_mul(BOMB_RATIO) {
            return Err(format!(
                "row group {index}, column {}: {size} bytes uncompressed from {stored} stored, refused as a decompression bomb",
                column.column_path()
            ));
        }
    }
    Ok(())
}

/// Walks every column chunk's pages of row group `index` (see
/// `parquet_pages`); what reading the group's rows holds at once: each
/// chunk's dictionary and largest data page, summed over the columns.
fn check_pages(
    file: &mut File,
    group: &parquet::file::metadata::RowGroupMetaData,
    index: usize,
) -> Result<u64, String> {
    let mut peak = 0u64;
    for column in group.columns() {
        let start = column
            .dictionary_page_offset()
            .unwrap_or(column.data_page_offset());
        let sizes = (start, column.compressed_size(), column.uncompressed_size());
        let refuse = |why: String| {
            format!(
                "row group {index}, column {}: {why}; the file is not read",
                column.column_path()
            )
        };
        let (Ok(start), Ok(len), Ok(uncompressed)) = (
            u64::try_from(sizes.0),
            u64::try_from(sizes.1),
            u64::try_from(sizes.2),
        ) else {
            return Err(refuse("a negative offset or size".into()));
        };
        let gzip = matches!(column.compression(), parquet::basic::Compression::GZIP(_));
        let chunk = super::parquet_pages::Chunk {
            start,
            len,
            uncompressed,
            gzip,
            value_bits: value_bits(column),
            byte_arrays: matches!(
                column.column_type(),
                parquet::basic::Type::BYTE_ARRAY | parquet::basic::Type::FIXED_LEN_BYTE_ARRAY
            ),
        };
        let largest = super::parquet_pages::walk_chunk(file, chunk).map_err(refuse)?;
        peak = peak.saturating_add(largest);
    }
    Ok(peak)
}

/// The fewest bits one value of a column takes stored plainly.
fn value_bits(column: &parquet::file::metadata::ColumnChunkMetaData) -> u64 {
    use parquet::basic::Type;
    match column.column_type() {
        Type::BOOLEAN => 1,
        Type::INT32 | Type::FLOAT | Type::BYTE_ARRAY => 32,
        Type::INT64 | Type::DOUBLE => 64,
        Type::INT96 => 96,
        Type::FIXED_LEN_BYTE_ARRAY => {
            8 * u64::try_from(column.column_descr().type_length())
                .unwrap_or(0)
                .max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A large JSONL row is handed on holding its own size of the parse
    /// budget (its reservation, cut to the row once parsed), since its
    /// chunk may make it wait for room in the rows in flight: the
    /// reservation was let go as the parse ended, so each of a worker's
    /// parses could hold a parsed row no budget counted while it waited.
    #[test]
    fn a_large_row_is_handed_on_holding_its_size_of_the_parse_budget() {
        let budget: &'static super::super::budget::ByteBudget =
            Box::leak(Box::new(super::super::budget::ByteBudget::new(64 << 20)));
        let limits = Limits {
            budget: Some(budget),
            ..Limits::default()
        };
        // 300 KB of text, 3.2 MB once parsed; and a small row after it.
        let line = format!("{{\"a\": [{}]}}\n", vec!["{}"; 100_000].join(","));
        let input = format!("{line}{{\"small\": 1}}\n");
        let mut held = Vec::new();
        parse(Format::Jsonl, input.as_bytes(), limits, &mut |event| {
            if let RowEvent::Task(_, task) = &event {
                let taken = budget.bytes() - budget.free_bytes();
                held.push((taken, task.approx_bytes.next_multiple_of(1024) as u64));
            }
            true
        })
        .expect("parsed");
        assert_eq!(held.len(), 2);
        let (taken, size) = held[0];
        assert!(size > 3_000_000, "the row's size: {size}");
        assert_eq!(taken, size, "what the large row held as it was handed on");
        assert_eq!(held[1].0, 0, "a small row reserves nothing");
        assert_eq!(budget.free_bytes(), budget.bytes(), "all let go at the end");
    }

    /// A long JSONL line's text is held under the parse budget as it is
    /// read, before its parse reserves: lines read whole and waiting for
    /// their parse's reservation held their text outside every budget.
    #[test]
    fn a_long_line_holds_its_text_of_the_parse_budget_as_it_is_read() {
        struct Watched<'a> {
            text: &'a [u8],
            budget: &'static super::super::budget::ByteBudget,
            most_taken: u64,
        }
        impl Read for Watched<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let taken = self.budget.bytes() - self.budget.free_bytes();
                self.most_taken = self.most_taken.max(taken);
                self.text.read(buf)
            }
        }
        let budget: &'static super::super::budget::ByteBudget =
            Box::leak(Box::new(super::super::budget::ByteBudget::new(64 << 20)));
        let limits = Limits {
            budget: Some(budget),
            ..Limits::default()
        };
        let input = format!("{{\"text\": \"{}\"}}\n{{}}\n", "x".repeat(1 << 20));
        let mut reader = Watched {
            text: input.as_bytes(),
            budget,
            most_taken: 0,
        };
        let mut rows = 0;
        parse(Format::Jsonl, &mut reader, limits, &mut |event| {
            rows += usize::from(matches!(event, RowEvent::Task(..)));
            true
        })
        .expect("parsed");
        assert_eq!(rows, 2);
        // Its buffer grows by doubling: 1 MiB held before the read that
        // ends the line.
        assert_eq!(reader.most_taken, 1 << 20, "held while it was read");
        assert_eq!(budget.free_bytes(), budget.bytes(), "all let go at the end");
    }

    /// A line that turns out over the row limit lets go of what its text
    /// took of the parse budget while the rest of it is read past.
    #[test]
    fn a_line_over_the_limit_lets_its_text_go_while_it_is_read_past() {
        struct Watched<'a> {
            text: &'a [u8],
            read: usize,
            budget: &'static super::super::budget::ByteBudget,
            /// The most held of the budget before and after 512 KiB.
            most_taken: [u64; 2],
        }
        impl Read for Watched<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let taken = self.budget.bytes() - self.budget.free_bytes();
                let late = usize::from(self.read >= 512 << 10);
                self.most_taken[late] = self.most_taken[late].max(taken);
                let n = self.text.read(buf)?;
                self.read += n;
                Ok(n)
            }
        }
        let budget: &'static super::super::budget::ByteBudget =
            Box::leak(Box::new(super::super::budget::ByteBudget::new(64 << 20)));
        let limits = Limits {
            max_task_bytes: 256 << 10,
            budget: Some(budget),
            ..Limits::default()
        };
        let input = format!("{{\"text\": \"{}\"}}\n{{\"a\": 1}}\n", "x".repeat(1 << 20));
        let mut reader = Watched {
            text: input.as_bytes(),
            read: 0,
            budget,
            most_taken: [0, 0],
        };
        let mut events = Vec::new();
        parse(Format::Jsonl, &mut reader, limits, &mut |event| {
            events.push(event);
            true
        })
        .expect("parsed");
        assert!(
            matches!(&events[..], [RowEvent::Error(0, _), RowEvent::Task(1, _)]),
            "{events:?}"
        );
        assert_eq!(reader.most_taken, [256 << 10, 0], "held, then let go");
    }

    /// A JSON file whose text passes its listed size (served decoded, or
    /// written again since the listing) has its reservation grown to its
    /// bound by the row limit: the bound by its listed text no longer holds.
    #[test]
    fn a_json_file_longer_than_listed_reserves_by_the_row_limit() {
        let budget: &'static super::super::budget::ByteBudget =
            Box::leak(Box::new(super::super::budget::ByteBudget::new(64 << 20)));
        let limits = Limits {
            max_task_bytes: 1 << 20,
            budget: Some(budget),
            object_size: Some(1024),
        };
        let input = format!("[{}]", vec!["{\"a\": 0}"; 600].join(","));
        let mut taken = Vec::new();
        parse(Format::Json, input.as_bytes(), limits, &mut |event| {
            if let RowEvent::Task(..) = event {
                taken.push(budget.bytes() - budget.free_bytes());
            }
            true
        })
        .expect("parsed");
        assert_eq!(taken.len(), 600);
        // 1 KiB listed: 348 KiB by its text, too little to count; 13 MiB
        // by the row limit, from the element that passes it (row 113: 9
        // bytes each with its comma) on.
        let lacking = stream_by_limit(limits).div_ceil(1024) << 10;
        let grown = taken.iter().position(|&t| t > 0).expect("grown");
        assert_eq!(grown, 113, "grown at the row past the listed size");
        assert!(
            taken[grown..].iter().all(|&t| t == lacking as u64),
            "{:?}",
            &taken[grown..grown + 3]
        );
        assert_eq!(budget.free_bytes(), budget.bytes(), "all let go at the end");
    }

    /// Under a budget smaller than the bound by the row limit, a JSON file
    /// served longer than listed grows to the whole budget with what it
    /// reserved, not past it: asking for more than the budget could give,
    /// it waited behind every older grower (here one that never ends).
    #[test]
    fn a_json_file_longer_than_listed_grows_to_the_budget_at_most() {
        let budget: &'static super::super::budget::ByteBudget =
            Box::leak(Box::new(super::super::budget::ByteBudget::new(4 << 20)));
        let _older = budget.grower();
        // 8 KiB listed: 2.7 MiB reserved by its text; 13 MiB by the limit.
        let limits = Limits {
            max_task_bytes: 1 << 20,
            budget: Some(budget),
            object_size: Some(8 << 10),
        };
        let (parsed, taken) =
            objects_parsed_in_time(2000, limits, move |_| budget.bytes() - budget.free_bytes());
        assert_eq!(parsed, Ok(()));
        let most = taken.into_iter().max();
        assert_eq!(most, Some(budget.bytes()), "the whole budget, no more");
    }

    /// A JSON file served longer than listed that must wait for its
    /// larger reservation hands its rows on first (`RowEvent::WillWait`,
    /// from its reader): here that is what frees the budget, and waiting
    /// holding them waited for ever.
    #[test]
    fn a_json_file_longer_than_listed_hands_its_rows_on_before_it_waits() {
        let budget: &'static super::super::budget::ByteBudget =
            Box::leak(Box::new(super::super::budget::ByteBudget::new(4 << 20)));
        let mut everything = Some(budget.try_take(4 << 20).expect("the budget"));
        let mut older = Some(budget.grower());
        let limits = Limits {
            max_task_bytes: 1 << 20,
            budget: Some(budget),
            object_size: Some(1024),
        };
        let (parsed, events) = objects_parsed_in_time(600, limits, move |event| {
            if event == RowEvent::WillWait {
                drop((everything.take(), older.take()));
            }
            event
        });
        assert_eq!(parsed, Ok(()));
        let waited = events.iter().position(|e| *e == RowEvent::WillWait);
        assert_eq!(waited, Some(113), "handed on as its text passed 1 KiB");
        assert_eq!(events.len(), 601, "every row, and the word");
    }

    /// A JSON array of `count` objects `{"a": 0}` parsed on a thread of
    /// its own, each event given to `on_event` and what it returns kept:
    /// the parse's result and those, within 20 s (a parse that waits for
    /// ever fails the test).
    fn objects_parsed_in_time<T: Send + 'static>(
        count: usize,
        limits: Limits,
        mut on_event: impl FnMut(RowEvent) -> T + Send + 'static,
    ) -> (Result<(), String>, Vec<T>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let input = format!("[{}]", vec!["{\"a\": 0}"; count].join(","));
            let mut seen = Vec::new();
            let parsed = parse(Format::Json, input.as_bytes(), limits, &mut |event| {
                seen.push(on_event(event));
                true
            });
            tx.send((parsed, seen)).ok();
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("the parse ends")
    }

    fn run(format: Format, input: &str) -> (Vec<RowEvent>, Result<(), String>) {
        let mut events = Vec::new();
        let result = parse(format, input.as_bytes(), Limits::default(), &mut |e| {
            events.push(e);
            true
        });
        (events, result)
    }

    fn task(data: Value) -> TaskInput {
        TaskInput {
            data,
            meta: None,
            annotations: Vec::new(),
            predictions: Vec::new(),
            approx_bytes: 0,
        }
    }

    /// A row group that holds more at once than the whole parse budget is
    /// refused, not parsed alone: memory is bounded by the setting.
    #[test]
    fn a_parquet_row_group_over_the_budget_is_refused() {
        use std::sync::Arc;

        use parquet::{
            data_type::{ByteArray, ByteArrayType},
            file::{
                properties::{EnabledStatistics, WriterProperties},
                writer::SerializedFileWriter,
            },
            schema::parser::parse_message_type,
        };
        let schema = "message t { REQUIRED BYTE_ARRAY a (UTF8); REQUIRED BYTE_ARRAY b (UTF8); }";
        let schema = Arc::new(parse_message_type(schema).expect("schema"));
        let props = WriterProperties::builder()
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::None)
            .build();
        let file = tempfile::tempfile().expect("temp file");
        let copy = file.try_clone().expect("clone");
        let mut writer = SerializedFileWriter::new(copy, schema, Arc::new(props)).expect("writer");
        let mut group = writer.next_row_group().expect("row group");
        while let Some(mut column) = group.next_column().expect("column") {
            let value = ByteArray::from(vec![b'x'; 700 << 10]);
            let typed = column.typed::<ByteArrayType>();
            typed.write_batch(&[value], None, None).expect("value");
            column.close().expect("close column");
        }
        group.close().expect("close group");
        writer.close().expect("close file");

        let budget = Box::leak(Box::new(super::super::budget::ByteBudget::new(1 << 20)));
        let limits = Limits {
            budget: Some(budget),
            ..Limits::default()
        };
        let err = parse_parquet(file, limits, &mut |_| true, &mut |_| true).expect_err("refused");
        assert!(
            err.contains("LABELSYNC_PARSE_BUDGET_BYTES (1048576)"),
            "{err}"
        );
    }

    #[test]
    fn utf16_and_utf32_files_are_refused_whole() {
        let utf16: Vec<u8> = "\u{feff}{\"a\": 1}\n{\"a\": 2}"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let utf32_be = b"\0\0\xFE\xFF\0\0\0{";
        for (bytes, encoding) in [(&utf16[..], "UTF-16"), (&utf32_be[..], "UTF-32")] {
            for format in [Format::Json, Format::Jsonl] {
                let mut events = Vec::new();
                let result = parse(format, bytes, Limits::default(), &mut |e| {
                    events.push(e);
                    true
                });
                let err = result.expect_err("refused");
                assert!(
                    err.contains(encoding) && err.contains("save it as UTF-8"),
                    "{err}"
                );
                assert!(events.is_empty(), "{events:?}");
            }
        }
    }

    #[test]
    fn json_object_array_full_tasks_and_bom() {
        let (events, result) = run(Format::Json, "\u{feff}{\"image\": \"a.jpg\"}");
        assert_eq!(result, Ok(()));
        assert_eq!(
            events,
            [RowEvent::Task(0, task(json!({ "image": "a.jpg" })))]
        );

        let (events, result) = run(Format::Json, r#"[{"a": 1}, {"a": 2}, 3]"#);
        assert_eq!(result, Ok(()));
        assert_eq!(events.len(), 3);
        assert_eq!(events[1], RowEvent::Task(1, task(json!({ "a": 2 }))));
        assert!(matches!(&events[2], RowEvent::Error(2, m) if m.contains("a number")));

        let full = r#"[{"data": {"text": "hi"}, "meta": {"m": 1},
            "annotations": [{"result": [{"v": 1}], "lead_time": 2.5}],
            "predictions": [{"result": [], "model_version": "v1", "score": 0.5}]}]"#;
        let (events, result) = run(Format::Json, full);
        assert_eq!(result, Ok(()));
        let RowEvent::Task(0, t) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(t.data, json!({ "text": "hi" }));
        assert_eq!(t.meta, Some(json!({ "m": 1 })));
        assert_eq!(t.annotations[0]["lead_time"], 2.5);
        assert_eq!(t.predictions[0]["model_version"], "v1");

        // Annotations beside plain data fields: that row's error (they were
        // kept as a data field, and no annotation was made); the file goes on.
        let plain = "{\"text\": \"x\", \"annotations\": [{\"result\": []}]}\n{\"text\": \"y\"}\n";
        let (events, result) = run(Format::Jsonl, plain);
        assert_eq!(result, Ok(()));
        assert!(
            matches!(&events[0], RowEvent::Error(0, m) if m.contains("no \"data\" object")),
            "{events:?}"
        );
        assert_eq!(events[1], RowEvent::Task(1, task(json!({ "text": "y" }))));
    }

    #[test]
    fn bad_json_files_keep_the_rows_before_the_error() {
        let (events, result) = run(Format::Json, r#"[{"a": 1}, {"a": 2}, {"a""#);
        assert_eq!(events.len(), 2);
        assert!(result.unwrap_err().contains("truncated"));

        // Each row is a full task or plain data by itself (the second row
        // broke the file off).
        let (events, result) = run(Format::Json, r#"[{"a": 1}, {"data": {"a": 2}}]"#);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events,
            [
                RowEvent::Task(0, task(json!({ "a": 1 }))),
                RowEvent::Task(1, task(json!({ "a": 2 })))
            ]
        );

        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let (events, result) = run(Format::Json, &deep);
        assert!(events.is_empty());
        assert!(result.unwrap_err().contains("more than 128 levels deep"));

        let (_, result) = run(Format::Json, "\"just a string\"");
        assert!(
            result
                .unwrap_err()
                .contains("a JSON object (one task) or an array")
        );
        let (_, result) = run(Format::Json, "[{\"a\": 1}] trailing");
        assert!(result.is_err());
    }

    #[test]
    fn jsonl_skips_blank_lines_and_reports_bad_ones() {
        let (events, result) = run(Format::Jsonl, "{\"a\": 1}\r\n\n  \nnot json\n{\"a\": 3}");
        assert_eq!(result, Ok(()));
        assert_eq!(events.len(), 3);
        assert_eq!(events[0], RowEvent::Task(0, task(json!({ "a": 1 }))));
        assert!(matches!(&events[1], RowEvent::Error(1, m) if m.contains("not valid JSON")));
        assert_eq!(events[2], RowEvent::Task(2, task(json!({ "a": 3 }))));
    }

    /// serde_json's `Value` reads an object whose first key is its
    /// reserved `$serde_json::private::RawValue` as the JSON text in its
    /// string: such a row was stored as another row, and one nesting such
    /// strings recursed 120 levels a string, past the 128-level limit
    /// (`crate::json`). Each is now its own row error.
    #[test]
    fn rows_with_a_key_serde_json_reserves_are_row_errors() {
        let raw = r#"{"$serde_json::private::RawValue": "{\"a\": 1}"}"#;
        let inner = r#"{"x": [{"$serde_json::private::RawValue": "not json"}]}"#;
        let nested = crate::json::tests::nested_raw_values(12);
        let input = format!("{raw}\n{inner}\n{nested}\n{{\"ok\": 1}}\n");
        for (format, input) in [
            (Format::Jsonl, input),
            (
                Format::Json,
                format!("[{raw}, {inner}, {nested}, {{\"ok\": 1}}]"),
            ),
        ] {
            let (events, result) = run(format, &input);
            assert_eq!(result, Ok(()), "{format:?}");
            assert_eq!(events.len(), 4, "{format:?}: {events:?}");
            // The nested one is refused by its depth, before its key.
            for (row, event) in (0..).zip(&events[..3]) {
                let why = if row == 2 {
                    "levels deep"
                } else {
                    "is reserved"
                };
                assert!(
                    matches!(event, RowEvent::Error(r, m) if *r == row && m.contains(why)),
                    "{format:?}: {event:?}"
                );
            }
            assert_eq!(events[3], RowEvent::Task(3, task(json!({ "ok": 1 }))));
        }
    }

    /// A row is measured while it is built as `check_task` measures it
    /// whole: at the limit it is a task, a byte over it is refused, in both
    /// formats, and a row far over it is not built past the limit.
    #[test]
    fn a_row_is_refused_at_the_limit_while_it_is_built() {
        // 32 (the root) + 64 (an entry) + 1 (its key) + 3 (its text).
        let row = r#"{"a": "xyz"}"#;
        for (max, whole) in [(100, true), (99, false)] {
            let limits = Limits {
                max_task_bytes: max,
                ..Limits::default()
            };
            for (format, input) in [
                (Format::Jsonl, row.to_owned()),
                (Format::Json, format!("[{row}]")),
            ] {
                let mut events = Vec::new();
                let result = parse(format, input.as_bytes(), limits, &mut |e| {
                    events.push(e);
                    true
                });
                assert_eq!(result, Ok(()));
                match &events[..] {
                    [RowEvent::Task(0, _)] => assert!(whole, "{format:?} {max}"),
                    [RowEvent::Error(0, m)] => {
                        assert!(!whole && m.contains("larger than the 99-byte limit"), "{m}")
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        // The allowance refuses at the same byte.
        for (max, over) in [(100, false), (99, true)] {
            let limits = Limits {
                max_task_bytes: max,
                ..Limits::default()
            };
            let allowance = Shapes::new(limits).allowance();
            crate::json::from_slice_within(row.as_bytes(), &allowance).unwrap();
            assert_eq!(allowance.is_over(), over, "{max}");
        }
        let allowance = crate::json::Allowance::new(1_000);
        let big = format!("[{}]", "{\"a\":0},".repeat(10_000) + "{}");
        let built = crate::json::from_slice_within(big.as_bytes(), &allowance).unwrap();
        assert!(allowance.is_over());
        assert_eq!(built, Value::Null, "not built past the allowance");
    }

    /// What a JSON stream reserves covers what its element takes (as
    /// `check_task` counts it), by its text and by the row limit alone (at
    /// the element's own measure), for the shapes that take the most for
    /// both: one-entry maps, and maps nested in maps.
    #[test]
    fn a_stream_reserves_what_its_element_takes() {
        let maps = format!("[{}]", vec![r#"{"":0}"#; 20_000].join(","));
        let strings = format!("[{}]", vec![r#"{"a":"b"}"#; 20_000].join(","));
        let nested = format!("{}0{}", r#"{"":"#.repeat(60), "}".repeat(60));
        let nested = format!("[{}]", vec![nested.as_str(); 500].join(","));
        for text in [maps, strings, nested] {
            let value: Value = serde_json::from_str(&text).expect("JSON");
            let by_text = Limits {
                max_task_bytes: usize::MAX,
                object_size: Some(text.len() as u64),
                ..Limits::default()
            };
            let taken = check_task(&value, by_text).expect("a task");
            assert!(taken <= stream_reservation(by_text), "{taken} by text");
            // The least limit that takes the element: its measure.
            let (mut low, mut high) = (1, text.len() * 64);
            while low < high {
                let mid = (low + high) / 2;
                let limit = Limits {
                    max_task_bytes: mid,
                    ..Limits::default()
                };
                match check_task(&value, limit) {
                    Ok(_) => high = mid,
                    Err(_) => low = mid + 1,
                }
            }
            let by_limit = Limits {
                max_task_bytes: low,
                ..Limits::default()
            };
            let reader = READER_ROW_LIMITS * low;
            let element = stream_reservation(by_limit) - reader;
            assert!(taken <= element, "{taken} by limit {low}");
        }
    }

    /// A JSON text's parse reserves a first allocation for each container
    /// in it that is not empty, and nothing for brackets in strings.
    #[test]
    fn a_parse_reserves_for_the_containers_in_its_text() {
        let small = "{\"a\":0},".repeat(1_000);
        assert!(parse_bytes(small.as_bytes()) >= 700 * 1_000);
        let lists = "[0],".repeat(1_000);
        assert!(parse_bytes(lists.as_bytes()) >= 180 * 1_000);
        let text = r#"{"s": "{[\"{[", "t": [{ }, [ ], {"u": "\\"}, [1]]}"#;
        assert_eq!(containers_in(text.as_bytes()), (2, 2));
        // Too little for the budget to count: not scanned, not reserved.
        assert_eq!(reservation(text.as_bytes()), None);
        assert_eq!(reservation(small.as_bytes()), None);
        let large = "{\"a\":0},".repeat(10_000);
        assert_eq!(
            reservation(large.as_bytes()),
            Some(parse_bytes(large.as_bytes()))
        );
        assert!(parse_bytes(large.as_bytes()) <= large.len() * MOST_PER_BYTE);
        assert_eq!(
            parse_bytes(text.as_bytes()),
            text.len() * super::super::budget::EXPANSION + 2 * MAP_LEAF_BYTES + 2 * array_heap(1)
        );
    }

    #[test]
    fn rows_over_a_limit_are_row_errors() {
        let deep = |n: usize| format!("{{\"a\": {}1{}}}", "[".repeat(n), "]".repeat(n));
        let input = format!(
            "{}\n{}\n{{\"text\": \"bad\\u0000\"}}\n{{\"ok\": 1}}\n",
            deep(MAX_NESTING - 1),
            deep(MAX_NESTING)
        );
        let (events, result) = run(Format::Jsonl, &input);
        assert_eq!(result, Ok(()));
        assert!(matches!(&events[0], RowEvent::Task(0, _)), "{events:?}");
        assert!(matches!(&events[1], RowEvent::Error(1, m) if m.contains("levels deep")));
        assert!(matches!(&events[2], RowEvent::Error(2, m) if m.contains("NUL")));
        assert!(matches!(&events[3], RowEvent::Task(3, _)));

        // The same depth inside a JSON array is a row error too.
        let (events, result) = run(Format::Json, &format!("[{}, {{\"b\": 2}}]", deep(100)));
        assert_eq!(result, Ok(()));
        assert!(matches!(&events[0], RowEvent::Error(0, m) if m.contains("levels deep")));
        assert!(matches!(&events[1], RowEvent::Task(1, _)));
    }

    #[test]
    fn giant_rows_are_cut_off_while_read() {
        let limits = Limits {
            max_task_bytes: 1000,
            ..Limits::default()
        };
        let long = format!("{{\"t\": \"{}\"}}", "x".repeat(5000));
        let input = format!("{{\"a\": 1}}\n{long}\n{{\"a\": 3}}");
        let mut events = Vec::new();
        let result = parse(Format::Jsonl, input.as_bytes(), limits, &mut |e| {
            events.push(e);
            true
        });
        assert_eq!(result, Ok(()));
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(
            matches!(&events[1], RowEvent::Error(1, m) if m.contains("LABELSYNC_MAX_TASK_BYTES"))
        );
        assert!(matches!(&events[2], RowEvent::Task(2, _)));

        let input = format!("[{{\"a\": 1}}, {long}, {{\"a\": 3}}]");
        let mut events = Vec::new();
        let result = parse(Format::Json, input.as_bytes(), limits, &mut |e| {
            events.push(e);
            true
        });
        assert_eq!(events.len(), 1);
        assert!(
            result
                .unwrap_err()
                .contains("row 1 is larger than the 1000-byte limit")
        );

        // A value that is small as text but large as JSON still counts.
        let wide = serde_json::Value::Array(vec![serde_json::Value::Null; 50]);
        assert!(check_task(&wide, limits).unwrap_err().contains("larger"));
    }

    /// A row counts for what its values take in memory, not 32 bytes a
    /// value and their text: a map's node from its first entry on, each
    /// string's allocation, an array's doubled vector.
    #[test]
    fn a_row_counts_for_what_it_takes_in_memory() {
        let limits = Limits::default();
        let measure = |value: serde_json::Value| check_task(&value, limits).expect("a task");
        assert_eq!(measure(serde_json::json!({})), VALUE_BYTES);
        let one = measure(serde_json::json!({"a": 0}));
        assert!(one >= VALUE_BYTES + 640 + 32, "{one}");
        let tiny = vec![serde_json::json!({"a": 0}); 1_000];
        let many = measure(serde_json::Value::Array(tiny));
        assert!(many >= 1_000 * (640 + 32 + 32), "{many}");
        let text = measure(serde_json::json!({"text": "x".repeat(100_000)}));
        assert!((100_000..101_000).contains(&text), "{text}");
    }

    #[test]
    fn format_by_extension() {
        assert_eq!(Format::of_key("a/b.JSON"), Some(Format::Json));
        assert_eq!(Format::of_key("x.ndjson"), Some(Format::Jsonl));
        assert_eq!(Format::of_key("x.parquet"), Some(Format::Parquet));
        assert_eq!(Format::of_key("x.csv"), None);
        assert_eq!(Format::of_key("ls-task-1"), Some(Format::Json));
        assert_eq!(Format::of_key("a.b/noext"), Some(Format::Json));
    }
}
