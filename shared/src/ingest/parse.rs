//! Task files: JSON (one object, or an array streamed element by element),
//! JSONL / NDJSON (one task per non-empty line) and Parquet (one task per row,
//! read row group by row group). Parsing is synchronous and streaming: it
//! reads from a `Read`, never holds a whole file, and hands rows to `emit` as
//! it goes. Run it on a blocking thread.
//!
//! Errors come in two sizes: a [`RowEvent::Error`] is one bad row (a bad JSONL
//! line, an element that is not an object) and parsing goes on; an `Err` from
//! [`parse`] is a bad file (truncated JSON, not Parquet, mixed task shapes) and
//! parsing stops there. Rows emitted before either are kept.
use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// File formats of the Tasks import method, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Jsonl,
    Parquet,
}

impl Format {
    pub fn of_key(key: &str) -> Option<Self> {
        let ext = key.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "json" => Some(Format::Json),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

/// One task as a file states it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskInput {
    pub data: Value,
    pub meta: Option<Value>,
    pub annotations: Vec<Value>,
    pub predictions: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RowEvent {
    Task(i64, TaskInput),
    Error(i64, String),
}

/// Whether rows are full tasks (`{"data": {...}, "annotations": ...}`) or
/// plain data objects. The first row decides; a file mixing the two is refused
/// at the first row that differs.
#[derive(Default)]
struct Shapes {
    full: Option<bool>,
}

impl Shapes {
    fn task(&mut self, row: i64, value: Value) -> Result<RowEvent, String> {
        let Value::Object(mut object) = value else {
            return Ok(RowEvent::Error(
                row,
                format!("row {row} is {}, not a JSON object", kind(&value)),
            ));
        };
        let full = matches!(object.get("data"), Some(Value::Object(_)));
        match self.full {
            None => self.full = Some(full),
            Some(expected) if expected != full => {
                return Err(format!(
                    "row {row} is {} but the rows before it are {}; a file must not mix the two shapes",
                    shape_name(full),
                    shape_name(expected)
                ));
            }
            Some(_) => {}
        }
        if !full {
            return Ok(RowEvent::Task(
                row,
                TaskInput {
                    data: Value::Object(object),
                    meta: None,
                    annotations: Vec::new(),
                    predictions: Vec::new(),
                },
            ));
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
            Err(e) => return Ok(RowEvent::Error(row, e)),
        };
        let predictions = match list(&mut object, "predictions") {
            Ok(p) => p,
            Err(e) => return Ok(RowEvent::Error(row, e)),
        };
        let meta = match object.remove("meta") {
            None | Some(Value::Null) => None,
            Some(meta @ Value::Object(_)) => Some(meta),
            Some(_) => {
                return Ok(RowEvent::Error(
                    row,
                    format!("row {row}: \"meta\" must be an object"),
                ));
            }
        };
        Ok(RowEvent::Task(
            row,
            TaskInput {
                data,
                meta,
                annotations,
                predictions,
            },
        ))
    }
}

fn shape_name(full: bool) -> &'static str {
    if full {
        "a full task ({\"data\": {...}})"
    } else {
        "plain task data"
    }
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
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<(), String> {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    skip_bom(&mut reader).map_err(|e| format!("read failed: {e}"))?;
    match format {
        Format::Json => parse_json(reader, emit),
        Format::Jsonl => parse_jsonl(reader, emit),
        Format::Parquet => Err("Parquet files must be parsed from a file (parse_parquet)".into()),
    }
}

fn skip_bom(reader: &mut impl BufRead) -> std::io::Result<()> {
    if reader.fill_buf()?.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    Ok(())
}

/// Streams either one object (one task) or an array (one task per element).
fn parse_json(reader: impl Read, emit: &mut dyn FnMut(RowEvent) -> bool) -> Result<(), String> {
    let mut shapes = Shapes::default();
    let mut rows = 0i64;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let result = TopLevel {
        shapes: &mut shapes,
        rows: &mut rows,
        emit,
    }
    .deserialize(&mut de);
    match result.and_then(|()| de.end()) {
        Ok(()) => Ok(()),
        Err(e) if e.is_eof() => Err(format!(
            "the JSON ends early (truncated?) after {rows} row(s): {e}"
        )),
        Err(e) => Err(format!("invalid JSON after {rows} row(s): {e}")),
    }
}

struct TopLevel<'a> {
    shapes: &'a mut Shapes,
    rows: &'a mut i64,
    emit: &'a mut dyn FnMut(RowEvent) -> bool,
}

impl TopLevel<'_> {
    fn row<E: de::Error>(&mut self, value: Value) -> Result<bool, E> {
        let event = self.shapes.task(*self.rows, value).map_err(E::custom)?;
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
        while let Some(value) = seq.next_element::<Value>()? {
            if !self.row(value)? {
                // The consumer stopped; drain nothing more.
                return Err(de::Error::custom("stopped"));
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        let value = Value::deserialize_from_map(map)?;
        self.row(value)?;
        Ok(())
    }
}

/// `serde_json::Value` from a `MapAccess` we are already inside of.
trait FromMap: Sized {
    fn deserialize_from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

impl FromMap for Value {
    fn deserialize_from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        serde::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))
    }
}

/// One task per non-empty line; a bad line is a row error and the next line
/// is read as usual.
fn parse_jsonl(
    mut reader: impl BufRead,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<(), String> {
    let mut shapes = Shapes::default();
    let mut line = Vec::new();
    let mut row = 0i64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("read failed after {row} row(s): {e}"))?;
        if n == 0 {
            return Ok(());
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let event = match serde_json::from_slice::<Value>(text) {
            Ok(value) => shapes.task(row, value)?,
            Err(e) => RowEvent::Error(row, format!("line of row {row} is not valid JSON: {e}")),
        };
        row += 1;
        if !emit(event) {
            return Ok(());
        }
    }
}

/// One task per row, row group by row group; the columns become data fields.
/// Parquet needs random access, so it reads from a file.
pub fn parse_parquet(file: File, emit: &mut dyn FnMut(RowEvent) -> bool) -> Result<(), String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader =
        SerializedFileReader::new(file).map_err(|e| format!("not a readable Parquet file: {e}"))?;
    let mut row = 0i64;
    for group in 0..reader.num_row_groups() {
        let group_reader = reader
            .get_row_group(group)
            .map_err(|e| format!("row group {group}: {e}"))?;
        let rows = group_reader
            .get_row_iter(None)
            .map_err(|e| format!("row group {group}: {e}"))?;
        for record in rows {
            let event = match record {
                Ok(record) => RowEvent::Task(
                    row,
                    TaskInput {
                        data: record.to_json_value(),
                        meta: None,
                        annotations: Vec::new(),
                        predictions: Vec::new(),
                    },
                ),
                Err(e) => RowEvent::Error(row, format!("row {row}: {e}")),
            };
            row += 1;
            if !emit(event) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run(format: Format, input: &str) -> (Vec<RowEvent>, Result<(), String>) {
        let mut events = Vec::new();
        let result = parse(format, input.as_bytes(), &mut |e| {
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
    }

    #[test]
    fn bad_json_files_keep_the_rows_before_the_error() {
        let (events, result) = run(Format::Json, r#"[{"a": 1}, {"a": 2}, {"a""#);
        assert_eq!(events.len(), 2);
        assert!(result.unwrap_err().contains("truncated"));

        let (events, result) = run(Format::Json, r#"[{"a": 1}, {"data": {"a": 2}}]"#);
        assert_eq!(events.len(), 1);
        assert!(result.unwrap_err().contains("must not mix"));

        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let (events, result) = run(Format::Json, &deep);
        assert!(events.is_empty());
        assert!(result.unwrap_err().contains("recursion limit"));

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

    #[test]
    fn format_by_extension() {
        assert_eq!(Format::of_key("a/b.JSON"), Some(Format::Json));
        assert_eq!(Format::of_key("x.ndjson"), Some(Format::Jsonl));
        assert_eq!(Format::of_key("x.parquet"), Some(Format::Parquet));
        assert_eq!(Format::of_key("x.csv"), None);
        assert_eq!(Format::of_key("noext"), None);
    }
}
