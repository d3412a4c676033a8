//! A watch over the bytes a Redis server sends, under the client's parser.
//!
//! The client parses each reply whole into memory, whatever its size: a
//! server that is not Redis, or that lies, could answer one `GET` with
//! gigabytes, or a `SCAN` with millions of three-byte values that take
//! fifty bytes each once parsed. [`Watched`] follows the RESP framing of
//! what it reads (lengths and element counts, never the values) and fails
//! the connection, before the parser holds it, when one reply is longer
//! than [`Limits::bytes`] or holds more than [`Limits::values`] values, or
//! when what comes is not RESP at all. An honest server never comes near
//! the limits: values are read with `GETRANGE` cut to the largest object
//! taken, and listings ask for 1,000 names a batch.
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The message every refusal starts with.
const TOO_BIG: &str = "the Redis server's reply";

/// What a refusal of bytes that are not RESP says.
const NOT_RESP: &str = "is not RESP";

/// Why a watch failed its connection, once it did. The client fails the
/// commands waiting on a closed connection with its own words (a
/// pipeline's, "broken pipe"), so the commands' side reads the reason here.
#[derive(Debug, Clone, Default)]
pub(super) struct Refusal(Arc<OnceLock<String>>);

impl Refusal {
    pub(super) fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// The API error code of the refusal `why`.
    pub(super) fn code(why: &str) -> &'static str {
        if why.contains(NOT_RESP) {
            "storage_rejected"
        } else {
            "storage_answer_too_big"
        }
    }
}

/// How large one reply may be.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Bytes of one reply, framing included.
    pub bytes: u64,
    /// Values in one reply, the reply itself and every element included.
    pub values: u64,
}

/// Nesting deeper than this is refused (the client's parser refuses past 100).
const MAX_DEPTH: usize = 128;

/// The longest header line with a length (`$<n>`, `*<n>`, ...) taken.
const MAX_LENGTH_DIGITS: usize = 24;

/// Where the scanner is in the stream.
#[derive(Debug, Clone, Copy)]
enum At {
    /// At the type byte of the next value.
    Type,
    /// In the line after a type byte, which ends at `\r\n` as the client
    /// reads it (a bare `\n` does not end it); `after_cr`: the byte before
    /// was `\r`. For a length-carrying type its digits are gathered in
    /// [`Scanner::digits`].
    Line { kind: u8, after_cr: bool },
    /// Inside a string's payload and its CRLF: bytes still to come.
    Payload(u64),
}

/// Follows RESP2 and RESP3 framing and counts each reply's size.
#[derive(Debug)]
struct Scanner {
    limits: Limits,
    at: At,
    digits: Vec<u8>,
    /// Elements still to come in each open aggregate, innermost last.
    open: Vec<u64>,
    /// Bytes and values of the reply being read.
    bytes: u64,
    values: u64,
}

impl Scanner {
    fn new(limits: Limits) -> Self {
        Scanner {
            limits,
            at: At::Type,
            digits: Vec::with_capacity(MAX_LENGTH_DIGITS),
            open: Vec::new(),
            bytes: 0,
            values: 0,
        }
    }

    /// Follows `data`, the next bytes of the stream. A refusal says how
    /// many of them end complete replies before the one refused.
    fn feed(&mut self, data: &[u8]) -> Result<(), Refused> {
        let (mut at, mut clean) = (0, 0);
        while at < data.len() {
            let used = self
                .step(&data[at..])
                .map_err(|why| Refused { why, clean })?;
            at += used;
            if self.bytes == 0 {
                clean = at; // a reply ended here
            }
        }
        Ok(())
    }

    /// Takes the next bytes of `data`: a type byte, the rest of a line, or
    /// of a payload. They count before they are acted on, so a value that
    /// ends a reply counts in that reply. The bytes used.
    fn step(&mut self, data: &[u8]) -> Result<usize, String> {
        let (used, ended) = match self.at {
            At::Type => (1, false),
            At::Line { after_cr, .. } => match line_end(data, after_cr) {
                Some(newline) => (newline + 1, true),
                None => (data.len(), false),
            },
            At::Payload(left) => (left.min(data.len() as u64) as usize, false),
        };
        self.count_bytes(used as u64)?;
        match self.at {
            At::Type => self.start_value(data[0])?,
            At::Line { kind, .. } => self.line(kind, &data[..used], ended)?,
            At::Payload(left) => self.payload(left - used as u64),
        }
        Ok(used)
    }

    fn payload(&mut self, left: u64) {
        if left == 0 {
            self.at = At::Type;
            self.value_done();
        } else {
            self.at = At::Payload(left);
        }
    }

    fn count_bytes(&mut self, n: u64) -> Result<(), String> {
        self.bytes += n;
        if self.bytes > self.limits.bytes {
            return Err(format!(
                "{TOO_BIG} is longer than {} bytes: the value is over the largest object taken (LABELSYNC_MAX_OBJECT_BYTES, at most 512 MiB for Redis), or the server is not Redis",
                self.limits.bytes
            ));
        }
        Ok(())
    }

    /// Takes a value's type byte.
    fn start_value(&mut self, kind: u8) -> Result<(), String> {
        if !b"+-:$*_,#!=(%~>|".contains(&kind) {
            return Err(format!(
                "{TOO_BIG} {NOT_RESP} (a value starts with byte {kind:#04x}): the server is not Redis"
            ));
        }
        self.values += 1;
        if self.values > self.limits.values {
            return Err(format!(
                "{TOO_BIG} holds more than {} values: the server is not Redis, or not one to list",
                self.limits.values
            ));
        }
        self.digits.clear();
        self.at = At::Line {
            kind,
            after_cr: false,
        };
        Ok(())
    }

    /// Reads on in a header line: `chunk` is its next bytes, the last of
    /// them its `\r\n` when it `ended`.
    fn line(&mut self, kind: u8, chunk: &[u8], ended: bool) -> Result<(), String> {
        if has_length(kind) {
            self.digits.extend_from_slice(chunk);
            if self.digits.len() > MAX_LENGTH_DIGITS {
                return Err(format!(
                    "{TOO_BIG} {NOT_RESP} (a length line that never ends)"
                ));
            }
        }
        if !ended {
            let after_cr = chunk.last() == Some(&b'\r');
            self.at = At::Line { kind, after_cr };
        } else {
            self.at = At::Type;
            if has_length(kind) {
                self.header(kind)?;
            } else {
                self.value_done();
            }
        }
        Ok(())
    }

    /// Acts on a complete length header of a `kind` value.
    fn header(&mut self, kind: u8) -> Result<(), String> {
        let text = std::str::from_utf8(&self.digits).unwrap_or("");
        let length: i64 = text
            .trim_end_matches(['\r', '\n'])
            .parse()
            .map_err(|_| format!("{TOO_BIG} {NOT_RESP} (a length {text:?})"))?;
        let Ok(length) = u64::try_from(length) else {
            // A null (`$-1`, `*-1`, `~-1`, an empty push `>-1`); the
            // client waits forever for a negative verbatim or blob error,
            // and refuses a negative map or attribute.
            if b"=!%|".contains(&kind) {
                return Err(format!("{TOO_BIG} {NOT_RESP} (a negative length {length})"));
            }
            self.value_done();
            return Ok(());
        };
        let elements = match kind {
            b'$' | b'=' | b'!' => {
                if length > self.limits.bytes {
                    return Err(format!(
                        "{TOO_BIG} announces a {length}-byte value, over the {}-byte limit (LABELSYNC_MAX_OBJECT_BYTES, at most 512 MiB for Redis)",
                        self.limits.bytes
                    ));
                }
                self.at = At::Payload(length + 2);
                return Ok(());
            }
            b'%' => length.saturating_mul(2),
            b'|' => length.saturating_mul(2).saturating_add(1), // and the value it describes
            _ => length,
        };
        if elements > self.limits.values {
            return Err(format!(
                "{TOO_BIG} announces {elements} values, more than {}: the server is not Redis, or not one to list",
                self.limits.values
            ));
        }
        if elements == 0 {
            self.value_done();
        } else if self.open.len() >= MAX_DEPTH {
            return Err(format!("{TOO_BIG} nests deeper than {MAX_DEPTH} levels"));
        } else {
            self.open.push(elements);
        }
        Ok(())
    }

    /// A value ended: it counts in its aggregate, which may end in turn;
    /// when none is open, the reply ended and the next starts from zero.
    fn value_done(&mut self) {
        while let Some(left) = self.open.last_mut() {
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.open.pop();
        }
        self.bytes = 0;
        self.values = 0;
    }
}

/// Where the line ends in `data`: the `\n` of its `\r\n`, given whether
/// the byte before `data` was `\r`.
fn line_end(data: &[u8], after_cr: bool) -> Option<usize> {
    let mut before = after_cr;
    for (i, &b) in data.iter().enumerate() {
        if b == b'\n' && before {
            return Some(i);
        }
        before = b == b'\r';
    }
    None
}

/// A refusal: why, and how many bytes of the refused read end complete
/// replies (those pass to the client; the refusal comes at the next read).
#[derive(Debug)]
struct Refused {
    why: String,
    clean: usize,
}

/// Types whose line is a length: strings and aggregates.
fn has_length(kind: u8) -> bool {
    b"$*=!%~>|".contains(&kind)
}

/// A connection whose replies are watched: reading fails, for good, as
/// soon as one breaks a limit, so the client drops the connection and
/// the command waiting gets the reason.
pub(super) struct Watched<S> {
    inner: S,
    scanner: Scanner,
    refusal: Refusal,
}

impl<S> Watched<S> {
    pub(super) fn new(inner: S, limits: Limits, refusal: Refusal) -> Self {
        Watched {
            inner,
            scanner: Scanner::new(limits),
            refusal,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(why) = this.refusal.get() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                why.to_owned(),
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Err(refused) = this.scanner.feed(&buf.filled()[before..]) {
            // Nothing of the reply refused reaches the parser; the
            // complete replies before it in this read do (their commands
            // get their answers), and the next read fails.
            buf.set_filled(before + refused.clean);
            let _ = this.refusal.0.set(refused.why.clone());
            if refused.clean == 0 {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, refused.why)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        bytes: 64,
        values: 8,
    };

    /// What a scanner says of `stream` fed in pieces of `piece` bytes.
    fn scan(stream: &[u8], piece: usize) -> Result<(), String> {
        let mut scanner = Scanner::new(LIMITS);
        stream
            .chunks(piece)
            .try_for_each(|c| scanner.feed(c).map_err(|refused| refused.why))
    }

    /// Replies within the limits pass, however the stream is cut; each
    /// reply counts from zero, so many small ones never add up.
    #[test]
    fn honest_replies_pass_in_any_pieces() {
        let replies: &[&[u8]] = &[
            b"+OK\r\n",
            b"$5\r\nhello\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b":42\r\n",
            b"*2\r\n$1\r\n0\r\n*3\r\n$1\r\na\r\n$1\r\nb\r\n$0\r\n\r\n",
            b"%1\r\n+k\r\n_\r\n",
            b"|1\r\n+a\r\n:1\r\n$2\r\nok\r\n",
            b"-ERR wrong\r\n",
            b"=7\r\ntxt:abc\r\n",
            b"!3\r\nERR\r\n",
            b"~1\r\n#t\r\n",
            b">2\r\n+message\r\n(12345\r\n",
        ];
        let stream: Vec<u8> = replies.iter().flat_map(|r| r.iter().copied()).collect();
        let stream = stream.repeat(20);
        for piece in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(scan(&stream, piece), Ok(()), "pieces of {piece}");
        }
    }

    /// A string longer than the limit is refused from its header, one
    /// whose header lies is refused at the limit, and so are too many
    /// values, or too many announced, and a line that never ends.
    #[test]
    fn replies_over_a_limit_or_not_resp_are_refused() {
        let long = [b"$1000\r\n".as_slice(), &[b'x'; 100]].concat();
        let lying = [b"+".as_slice(), &[b'x'; 100]].concat();
        let many = b"*9\r\n"
            .iter()
            .chain(&b":1\r\n".repeat(9))
            .copied()
            .collect::<Vec<_>>();
        let cases: &[(&[u8], &str)] = &[
            (&long, "announces a 1000-byte value"),
            (&lying, "longer than 64 bytes"),
            (&many, "announces 9 values"),
            (&b"*2\r\n".repeat(9), "more than 8 values"),
            (
                b"$123456789012345678901234567890\r\n",
                "a length line that never ends",
            ),
            (b"$12a\r\n", "a length"),
            (b"HTTP/1.1 200 OK\r\n", "a value starts with byte 0x48"),
            // The client ends lines only at CRLF: one line, not 40 replies.
            (&b"+\n".repeat(40), "longer than 64 bytes"),
            (&b":1\n".repeat(40), "longer than 64 bytes"),
            (&b"$5\n".repeat(10), "a length line that never ends"),
            (b"=-1\r\n+OK\r\n", "a negative length -1"),
            (b"!-5\r\n", "a negative length -5"),
            (b"%-1\r\n", "a negative length -1"),
        ];
        for (stream, expected) in cases {
            for piece in [1, 5, stream.len()] {
                let err = scan(stream, piece).expect_err(expected);
                assert!(err.contains(expected), "{err} (wanted {expected:?})");
            }
        }
    }

    /// A refusal passes the complete replies of its read before the one
    /// refused: their commands get their answers.
    #[test]
    fn a_refusal_passes_the_replies_before_it() {
        let mut scanner = Scanner::new(LIMITS);
        let refused = scanner
            .feed(b"+OK\r\n:1\r\n$1000\r\nxx")
            .expect_err("too long");
        assert_eq!(refused.clean, 9, "{refused:?}");
        let mut scanner = Scanner::new(LIMITS);
        let refused = scanner
            .feed(b"*2\r\n:1\r\n$1000\r\n")
            .expect_err("too long");
        assert_eq!(refused.clean, 0, "{refused:?}");
    }
}
