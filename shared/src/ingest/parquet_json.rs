//! A Parquet row as JSON, written as the `parquet` crate's
//! `Row::to_json_value` writes it, but with every conversion checked. The
//! crate panics on a date or timestamp that chrono cannot hold (`i64::MAX`
//! microseconds, which is how Postgres' `infinity` is often exported), and
//! formats a decimal in time quadratic in its declared scale and unbounded
//! in its length: a file of a few hundred bytes failed its neighbours'
//! batch or held a core for hours. A value that cannot be written is its
//! row's error, which names the column.
use base64::{Engine, prelude::BASE64_STANDARD};
use chrono::{DateTime, TimeZone, Utc};
use parquet::{
    data_type::Decimal,
    record::{Field, Row},
};
use serde_json::{Map, Value};

/// The widest unscaled decimal read, in bytes (a DECIMAL(38), the widest
/// most engines write, takes 16), and the largest scale: what a task may
/// hold as a decimal string stays a few hundred characters.
const MAX_DECIMAL_BYTES: usize = 32;
const MAX_DECIMAL_SCALE: i32 = 1_000;

/// `row` as a JSON object of its columns.
pub fn row(row: &Row) -> Result<Value, String> {
    let mut object = Map::new();
    for (name, value) in row.get_column_iter() {
        let value = field(value).map_err(|e| format!("column {name}: {e}"))?;
        object.insert(name.clone(), value);
    }
    Ok(Value::Object(object))
}

fn field(value: &Field) -> Result<Value, String> {
    Ok(match value {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float16(n) => float(f64::from(*n)),
        Field::Float(n) => float(f64::from(*n)),
        Field::Double(n) => float(*n),
        Field::Decimal(d) => Value::String(decimal(d)?),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(BASE64_STANDARD.encode(b.data())),
        Field::Date(days) => Value::String(date(*days)?),
        Field::TimeMillis(t) => Value::String(time_of_day(*t as u64, 1_000)),
        Field::TimeMicros(t) => Value::String(time_of_day(*t as u64, 1_000_000)),
        Field::TimestampMillis(t) => {
            let at = instant(Utc.timestamp_millis_opt(*t).single(), *t, "milliseconds")?;
            Value::String(at.format("%Y-%m-%d %H:%M:%S%.3f %:z").to_string())
        }
        Field::TimestampMicros(t) => {
            let at = instant(Utc.timestamp_micros(*t).single(), *t, "microseconds")?;
            Value::String(at.format("%Y-%m-%d %H:%M:%S%.6f %:z").to_string())
        }
        Field::Group(group) => row(group)?,
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(field)
                .collect::<Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut object = Map::new();
            for (key, value) in map.entries() {
                let key = match field(key)? {
                    Value::String(key) => key,
                    other => other.to_string(),
                };
                object.insert(key, field(value)?);
            }
            Value::Object(object)
        }
    })
}

/// A float as a JSON number; NaN and the infinities, which JSON has no
/// number for, as null.
fn float(n: f64) -> Value {
    serde_json::Number::from_f64(n)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn instant(at: Option<DateTime<Utc>>, raw: i64, unit: &str) -> Result<DateTime<Utc>, String> {
    at.ok_or_else(|| {
        format!("the timestamp {raw} ({unit} since 1970) is out of the range a date can hold")
    })
}

fn date(days: i32) -> Result<String, String> {
    let at = Utc.timestamp_opt(i64::from(days) * 86_400, 0).single();
    let at = at.ok_or_else(|| {
        format!("the date {days} (days since 1970) is out of the range a date can hold")
    })?;
    Ok(at.format("%Y-%m-%d").to_string())
}

/// `HH:MM:SS.fff` of `total` units since midnight, `per_second` units a
/// second (a negative time read as the crate reads it, as unsigned).
fn time_of_day(total: u64, per_second: u64) -> String {
    let (seconds, fraction) = (total / per_second, total % per_second);
    let width = if per_second == 1_000 { 3 } else { 6 };
    format!(
        "{:02}:{:02}:{:02}.{fraction:0width$}",
        seconds / 3_600,
        seconds % 3_600 / 60,
        seconds % 60
    )
}

/// The decimal's plain notation (`-0.00123`; a scale of 0 keeps the
/// point: `5.`, as the crate writes it).
fn decimal(d: &Decimal) -> Result<String, String> {
    let (precision, scale, bytes) = (d.precision(), d.scale(), d.data());
    if scale < 0 || precision < scale {
        return Err(format!(
            "DECIMAL({precision}, {scale}) is not a valid decimal type"
        ));
    }
    if bytes.len() > MAX_DECIMAL_BYTES || scale > MAX_DECIMAL_SCALE {
        return Err(format!(
            "a DECIMAL({precision}, {scale}) value of {} bytes is wider than the {MAX_DECIMAL_BYTES} bytes and the scale of {MAX_DECIMAL_SCALE} read",
            bytes.len()
        ));
    }
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let digits = magnitude_digits(bytes, negative);
    let scale = scale as usize;
    let mut out = String::with_capacity(digits.len() + scale + 3);
    if negative {
        out.push('-');
    }
    if digits.len() <= scale {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', scale - digits.len()));
        out.push_str(&digits);
    } else {
        let (whole, fraction) = digits.split_at(digits.len() - scale);
        out.push_str(whole);
        out.push('.');
        out.push_str(fraction);
    }
    Ok(out)
}

/// The decimal digits of the absolute value of `bytes`, a big-endian
/// two's-complement integer (negative when `negative`); `0` for none.
fn magnitude_digits(bytes: &[u8], negative: bool) -> String {
    let mut magnitude = bytes.to_vec();
    if negative {
        // Two's complement: invert, then add one from the last byte up.
        magnitude.iter_mut().for_each(|b| *b = !*b);
        for b in magnitude.iter_mut().rev() {
            let (sum, carry) = b.overflowing_add(1);
            *b = sum;
            if !carry {
                break;
            }
        }
    }
    let mut digits = Vec::new();
    while magnitude.iter().any(|&b| b != 0) {
        let mut remainder = 0u32;
        for b in magnitude.iter_mut() {
            let current = (remainder << 8) | u32::from(*b);
            *b = (current / 10) as u8;
            remainder = current % 10;
        }
        digits.push(char::from(b'0' + remainder as u8));
    }
    if digits.is_empty() {
        digits.push('0');
    }
    digits.iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use parquet::data_type::ByteArray;

    use super::*;

    /// What the crate writes, for values it can write.
    fn crates(fields: Vec<(String, Field)>) -> (Value, Value) {
        let row_value = Row::new(fields);
        (row(&row_value).expect("written"), row_value.to_json_value())
    }

    #[test]
    fn writes_what_the_crate_writes() {
        let mut fields = vec![
            ("null".to_owned(), Field::Null),
            ("bool".to_owned(), Field::Bool(true)),
            ("byte".to_owned(), Field::Byte(-8)),
            ("short".to_owned(), Field::Short(-300)),
            ("int".to_owned(), Field::Int(i32::MIN)),
            ("long".to_owned(), Field::Long(-7)),
            ("ubyte".to_owned(), Field::UByte(200)),
            ("ushort".to_owned(), Field::UShort(60_000)),
            ("uint".to_owned(), Field::UInt(u32::MAX)),
            ("ulong".to_owned(), Field::ULong(u64::MAX)),
            ("nan".to_owned(), Field::Double(f64::NAN)),
            ("infinity".to_owned(), Field::Float(f32::INFINITY)),
            ("double".to_owned(), Field::Double(-1.25e300)),
            ("float".to_owned(), Field::Float(1.5)),
            ("str".to_owned(), Field::Str("é\u{1F600}".into())),
            (
                "bytes".to_owned(),
                Field::Bytes(ByteArray::from(vec![0, 1, 255])),
            ),
            ("date".to_owned(), Field::Date(-719_162)),
            ("time_ms".to_owned(), Field::TimeMillis(45_296_789)),
            ("negative_ms".to_owned(), Field::TimeMillis(-5)),
            ("time_us".to_owned(), Field::TimeMicros(-1)),
            (
                "ts_ms".to_owned(),
                Field::TimestampMillis(1_700_000_000_123),
            ),
            ("ts_us".to_owned(), Field::TimestampMicros(-1)),
        ];
        let decimals = [
            Decimal::from_i32(0, 5, 2),
            Decimal::from_i32(5, 3, 0),
            Decimal::from_i32(-123, 9, 5),
            Decimal::from_i32(123, 3, 3),
            Decimal::from_i64(i64::MIN, 19, 4),
            Decimal::from_bytes(ByteArray::from(vec![0x80; 16]), 38, 10),
            Decimal::from_bytes(ByteArray::from(vec![0x7f, 0xff, 0x00, 0x01]), 10, 2),
            Decimal::from_bytes(ByteArray::from(Vec::<u8>::new()), 4, 2),
        ];
        for (i, d) in decimals.into_iter().enumerate() {
            fields.push((format!("decimal{i}"), Field::Decimal(d)));
        }
        let group = Row::new(fields.clone());
        fields.push(("group".to_owned(), Field::Group(group)));
        let (ours, theirs) = crates(fields);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn dates_and_decimals_it_cannot_write_are_errors() {
        let cases = [
            Field::TimestampMicros(i64::MAX),
            Field::TimestampMillis(i64::MIN),
            Field::Date(i32::MAX),
            Field::Decimal(Decimal::from_bytes(
                ByteArray::from(vec![1]),
                i32::MAX,
                i32::MAX,
            )),
            Field::Decimal(Decimal::from_bytes(ByteArray::from(vec![1; 33]), 80, 2)),
        ];
        for case in cases {
            let started = std::time::Instant::now();
            let err = row(&Row::new(vec![("at".to_owned(), case.clone())]))
                .expect_err(&format!("{case:?} is refused"));
            assert!(err.starts_with("column at: "), "{err}");
            assert!(started.elapsed().as_millis() < 100, "{case:?} took long");
        }
    }
}
