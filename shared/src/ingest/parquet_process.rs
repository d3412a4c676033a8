//! Parquet files are read in a child process, one per file: the worker
//! binary run as `labelsync-worker parse-parquet` (`LABELSYNC_PARQUET_PARSER`),
//! the spooled file as its standard input. The `parquet` crate trusts what a
//! file declares: a count in a page header becomes an allocation (a
//! `DELTA_LENGTH_BYTE_ARRAY` page of 2^40 values asks for 4 TiB, which
//! aborts the process), a nested structure a recursion. The walks of
//! `parquet_footer` and `parquet_pages` refuse what they know of before the
//! crate reads it, but whatever they miss would abort the worker, and the
//! object's every retry with it. In a child it is that object's error.
//!
//! The child limits its own address space to the parse budget plus
//! [`CHILD_OVERHEAD`] before it reads anything, and answers on its standard
//! output, a socket, one JSON line per message ([`Message`]): before each
//! row group it asks for that group's memory and waits, and the parent
//! reserves it from the worker's parse budget (`super::budget`) and answers
//! one byte; then one line per row. The parent counts the rows itself,
//! checks every row again as a task (`parse::check_task`), and ends the child
//! when it wants no more rows. A child that dies, takes over [`SILENCE`]
//! over one message, or says something else ends its file with an error naming
//! what it printed (the crate's panic or the failed allocation); the rows
//! it sent before stand, as for a file that breaks off.
use std::{
    cell::{Cell, RefCell},
    fs::File,
    io::{self, BufRead, BufReader, Read, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::{net::UnixStream, process::ExitStatusExt},
    },
    path::Path,
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    budget::Growing,
    parse::{self, Limits, RowEvent},
};

/// The worker binary's hidden subcommand that runs a child.
pub const SUBCOMMAND: &str = "parse-parquet";
/// What a child may map beyond the parse budget (its hard limit), and
/// beyond what it mapped and was granted when a row group starts (its soft
/// limit for that group): its binary, stack and allocator, and the row
/// being built. The crate builds a row whole before `check_task` can
/// refuse it, so a row far over `LABELSYNC_MAX_TASK_BYTES` (a few times
/// this) ends its file here, where the in-process parse refused that row
/// alone.
pub const CHILD_OVERHEAD: u64 = 256 << 20;
/// A child that takes longer than this over one message (a row, a request
/// for memory) is taken for hung and killed: a row group's pages are read
/// and a row written in far less.
const SILENCE: Duration = Duration::from_secs(300);
/// What is kept of a child's standard error for the object's error.
const STDERR_KEPT: usize = 2048;

/// One line from the child.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// Reading the next row group holds this many bytes: wait for a byte.
    Reserve(u64),
    /// The next row, a task's data, read as written (`crate::json`): the
    /// parent's check of it is a guard of its own.
    Row(#[serde(deserialize_with = "crate::json::as_written")] Value),
    /// The next row could not be a task; the message names the row.
    RowError(String),
    /// The file is read.
    Done,
    /// The file cannot be read further (the rows sent stand).
    Failed(String),
}

/// Reads `file` in a child process run from `parser`, handing each row to
/// `emit` until it returns false; as [`parse::parse_parquet`] does in
/// process.
pub fn parse(
    parser: &Path,
    file: File,
    limits: Limits,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<(), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| start_failed(parser, &e))?;
    let mut child =
        Reader(spawn(parser, file, theirs, limits).map_err(|e| start_failed(parser, &e))?);
    let stderr = child.0.stderr.take().map(keep_tail);
    let mut rows = 0i64;
    let ended = converse(&ours, limits, &mut rows, emit);
    let status = child.end();
    let said = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    match ended {
        Ended::Done | Ended::Stopped => Ok(()),
        Ended::Failed(message) => Err(message),
        Ended::Broken(why) => Err(broken(rows, why, status, &said)),
    }
}

/// A running child, ended (killed and reaped) however its parse ends.
struct Reader(Child);

impl Reader {
    /// Kills the child, done or not (it has nothing more to give), and
    /// tells how it ended.
    fn end(&mut self) -> Option<ExitStatus> {
        self.0.kill().ok();
        self.0.wait().ok()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.end();
    }
}

fn spawn(parser: &Path, file: File, theirs: UnixStream, limits: Limits) -> io::Result<Child> {
    let budget = limits.budget.map_or(512 << 20, |b| b.bytes());
    // Built and dropped here: the Command holds the child's end of the
    // socket, and the parent sees the child's end only once it is closed.
    Command::new(parser)
        .arg(SUBCOMMAND)
        .arg(limits.max_task_bytes.to_string())
        .arg(budget.to_string())
        // The child needs no setting, and gets no secret.
        .env_clear()
        .envs(std::env::var_os("PATH").map(|path| ("PATH", path)))
        .stdin(file)
        .stdout(OwnedFd::from(theirs))
        .stderr(Stdio::piped())
        .spawn()
}

fn start_failed(parser: &Path, error: &io::Error) -> String {
    format!(
        "the Parquet reader could not be started ({}: {error}); set LABELSYNC_PARQUET_PARSER to the labelsync-worker binary",
        parser.display()
    )
}

/// How a conversation with a child ended.
enum Ended {
    Done,
    /// `emit` wanted no more rows.
    Stopped,
    Failed(String),
    /// The child died or misbehaved: why.
    Broken(String),
}

/// Reads the child's messages until it is done or `emit` wants no more;
/// holds each row group's reservation until the next is asked for.
fn converse(
    stream: &UnixStream,
    limits: Limits,
    rows: &mut i64,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Ended {
    if let Err(e) = stream.set_write_timeout(Some(SILENCE)) {
        return Ended::Broken(e.to_string());
    }
    let until = Cell::new(Instant::now());
    let mut reader = BufReader::with_capacity(
        64 << 10,
        Deadline {
            stream,
            until: &until,
        },
    );
    let mut grant = Grant {
        limits,
        bytes: 0,
        held: None,
    };
    let mut line = Vec::new();
    loop {
        until.set(Instant::now() + SILENCE);
        let message = match next_message(&mut reader, &until, &mut line, &mut grant, emit) {
            Ok(message) => message,
            Err(why) => return Ended::Broken(why),
        };
        let event = match message {
            Message::Reserve(bytes) => {
                if let Err(why) = grant.group(bytes, emit) {
                    return Ended::Broken(why);
                }
                if let Err(e) = (&mut &*stream).write_all(b"\n") {
                    return Ended::Broken(format!("could not answer it: {e}"));
                }
                continue;
            }
            Message::Row(data) => parse::parquet_task(*rows, data, limits),
            Message::RowError(message) => RowEvent::Error(*rows, message),
            Message::Done => return Ended::Done,
            Message::Failed(message) => return Ended::Failed(message),
        };
        *rows += 1;
        if !emit(event) {
            return Ended::Stopped;
        }
    }
}

/// The child's next message. A long one's text is held under a
/// reservation of its own as it is read, as a JSONL line's is; a wait for
/// it is no silence of the child's, and moves the deadline on by as long.
/// The text and its reservation go before the group's is taken again (the
/// parsed row waits with it, as it always did).
fn next_message(
    reader: &mut impl BufRead,
    until: &Cell<Instant>,
    line: &mut Vec<u8>,
    grant: &mut Grant,
    emit: &mut dyn FnMut(RowEvent) -> bool,
) -> Result<Message, String> {
    // A row is at most max_task_bytes as the row check counts it; its JSON
    // text can be longer (escapes), its envelope and an error message (cut
    // to storable length) are small.
    let max = grant
        .limits
        .max_task_bytes
        .saturating_mul(6)
        .saturating_add(64 << 10);
    line.clear();
    let mut growing = None;
    let read = parse::read_line(reader, line, max, &mut |capacity| {
        let Some(budget) = grant.limits.budget.filter(|_| capacity > 0) else {
            growing = None;
            return;
        };
        let began = Instant::now();
        growing
            .get_or_insert_with(|| budget.grower())
            .grow_to(capacity, &mut || grant.let_go_to_wait(emit));
        until.set(until.get() + began.elapsed());
    });
    match read {
        Ok(Some(true)) => {}
        Ok(Some(false)) => return Err(format!("it wrote a line over {max} bytes")),
        Ok(None) => return Err("it ended without finishing".into()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(format!(
                "it took over {} s over one message",
                SILENCE.as_secs()
            ));
        }
        Err(e) => return Err(format!("reading its answer failed: {e}")),
    }
    let parsed = grant.parse(line, line.capacity(), growing.as_mut(), emit);
    line.clear();
    line.shrink_to(super::budget::SMALL);
    drop(growing);
    grant.take_again(emit);
    parsed.map_err(|e| format!("it wrote something unreadable: {e}"))
}

/// What the parent holds of the worker's parse budget for a child.
struct Grant {
    limits: Limits,
    /// The current row group's bytes, and their reservation.
    bytes: u64,
    held: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl Grant {
    /// Reserves a row group's memory, the last group's let go first. A
    /// child asks for no more than the budget: it refuses such a group.
    /// The parse's rows are handed on before it waits (see
    /// `parse::Limits::reserve_bytes`).
    fn group(&mut self, bytes: u64, emit: &mut dyn FnMut(RowEvent) -> bool) -> Result<(), String> {
        self.held = None;
        if let Some(budget) = self.limits.budget
            && bytes > budget.bytes()
        {
            return Err(format!(
                "it asked for {bytes} bytes, more than the parse budget"
            ));
        }
        self.bytes = bytes;
        self.held = self.reserve_group(emit);
        Ok(())
    }

    fn reserve_group(
        &self,
        emit: &mut dyn FnMut(RowEvent) -> bool,
    ) -> Option<tokio::sync::SemaphorePermit<'static>> {
        let bytes = usize::try_from(self.bytes).unwrap_or(usize::MAX);
        self.limits.budget?.reserve(bytes, &mut || {
            emit(RowEvent::WillWait);
        })
    }

    /// Parses a line, a long one under a reservation of its own as a JSONL
    /// line is (`growing`: the one its text of `capacity` bytes took as it
    /// was read).
    fn parse(
        &mut self,
        line: &[u8],
        capacity: usize,
        growing: Option<&mut Growing<'static>>,
        emit: &mut dyn FnMut(RowEvent) -> bool,
    ) -> serde_json::Result<Message> {
        let Some(bytes) = super::parse::reservation(line) else {
            return serde_json::from_slice(line);
        };
        let budget = self.limits.budget;
        let mut will_wait = || self.let_go_to_wait(emit);
        let _short = match growing {
            Some(growing) => {
                growing.grow_to(bytes.saturating_add(capacity), &mut will_wait);
                None
            }
            None => budget.and_then(|budget| budget.reserve(bytes, &mut will_wait)),
        };
        serde_json::from_slice(line)
    }

    /// Lets the group's reservation go and hands the parse's rows on, for a
    /// line's reservation to wait: a holder never waits for a second
    /// reservation (`super::budget`), or two parses could each hold half
    /// of the budget and wait for the rest.
    fn let_go_to_wait(&mut self, emit: &mut dyn FnMut(RowEvent) -> bool) {
        self.held = None;
        emit(RowEvent::WillWait);
    }

    /// Takes the group's reservation again if a line's wait let it go.
    fn take_again(&mut self, emit: &mut dyn FnMut(RowEvent) -> bool) {
        if self.held.is_none() {
            self.held = self.reserve_group(emit);
        }
    }
}

/// The child's socket, read until `until`: a child must finish each
/// message in time, however it trickles it.
struct Deadline<'a> {
    stream: &'a UnixStream,
    until: &'a Cell<Instant>,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self
            .until
            .get()
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(io::ErrorKind::TimedOut)?;
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

/// The error of a file whose child died or misbehaved, with what it
/// printed last (where a failed allocation or a panic says why).
fn broken(rows: i64, why: String, status: Option<ExitStatus>, said: &str) -> String {
    let how = match status.and_then(|s| s.signal()) {
        Some(signal) => format!(" (killed by signal {signal})"),
        None => String::new(),
    };
    let said = said.trim();
    let said = if said.is_empty() {
        String::new()
    } else {
        format!("; it said: {said}")
    };
    crate::error::storable(&format!(
        "the Parquet reader stopped on this file after {rows} row(s): {why}{how}{said}. It may use LABELSYNC_PARSE_BUDGET_BYTES plus {} MiB of memory; if the file is valid, report it with the file",
        CHILD_OVERHEAD >> 20
    ))
}

/// Reads a child's standard error to its end on a thread (so a chatty
/// child never blocks on it) and keeps the last [`STDERR_KEPT`] bytes.
fn keep_tail(mut stderr: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            let excess = kept.len().saturating_sub(STDERR_KEPT);
            kept.drain(..excess);
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

/// Runs the child when the process was started as one (`labelsync-worker
/// parse-parquet MAX_TASK_BYTES BUDGET_BYTES`); `None` otherwise. Called
/// first thing in the worker's `main`, before any runtime or thread starts.
pub fn run_if_child() -> Option<ExitCode> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(SUBCOMMAND) {
        return None;
    }
    let numbers: Option<Vec<u64>> = args.map(|a| a.parse().ok()).collect();
    let Some(&[max_task_bytes, budget]) = numbers.as_deref() else {
        eprintln!("usage: labelsync-worker {SUBCOMMAND} MAX_TASK_BYTES BUDGET_BYTES");
        return Some(ExitCode::from(2));
    };
    Some(match child(max_task_bytes, budget) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labelsync-worker {SUBCOMMAND}: {e}");
            ExitCode::FAILURE
        }
    })
}

/// The child: limits its memory, then reads the file on its standard input
/// and answers on its standard output (a socket to the parent).
fn child(max_task_bytes: u64, budget: u64) -> io::Result<()> {
    let hard = budget.saturating_add(CHILD_OVERHEAD);
    limit_memory(hard, hard)?;
    let file = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let socket = UnixStream::from(io::stdout().as_fd().try_clone_to_owned()?);
    let limits = Limits {
        max_task_bytes: usize::try_from(max_task_bytes).unwrap_or(usize::MAX),
        budget: Some(super::budget::process_budget(
            usize::try_from(budget).unwrap_or(usize::MAX),
        )),
        object_size: file.metadata().ok().map(|m| m.len()),
    };
    let answers = RefCell::new(Answers {
        out: io::BufWriter::with_capacity(64 << 10, &socket),
        hard,
        failed: None,
    });
    let parsed = parse::guarded(|| {
        parse::parse_parquet(
            file,
            limits,
            &mut |bytes| answers.borrow_mut().ask(bytes, &socket),
            &mut |event| {
                answers.borrow_mut().send(match event {
                    RowEvent::Task(_, task) => Message::Row(task.data),
                    RowEvent::Error(_, message) => Message::RowError(message),
                    // The child's rows are in its parent's chunks.
                    RowEvent::WillWait => return true,
                })
            },
        )
    });
    answers.into_inner().finish(parsed)
}

/// Sets the process's address-space limits (soft, hard).
fn limit_memory(soft: u64, hard: u64) -> io::Result<()> {
    rustix::process::setrlimit(
        rustix::process::Resource::As,
        rustix::process::Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        },
    )?;
    Ok(())
}

/// The bytes the process maps now (`VmSize`).
fn mapped_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmSize:"))?;
    let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib << 10)
}

/// The child's side of the socket.
struct Answers<'a> {
    out: io::BufWriter<&'a UnixStream>,
    /// The child's hard memory limit.
    hard: u64,
    /// The first write that failed: the parent is gone.
    failed: Option<io::Error>,
}

impl Answers<'_> {
    /// Writes `message`; false once a write failed.
    fn send(&mut self, message: Message) -> bool {
        let sent = serde_json::to_writer(&mut self.out, &message)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(e) = sent {
            self.failed.get_or_insert(e);
        }
        self.failed.is_none()
    }

    /// Asks for a row group's memory and waits for the parent's byte that
    /// grants it, then holds the child to it: what it maps now, the grant
    /// and [`CHILD_OVERHEAD`] (so a group that takes more than it declared
    /// fails here, whatever the budget). False when the parent is gone.
    fn ask(&mut self, bytes: u64, socket: &UnixStream) -> bool {
        if !self.send(Message::Reserve(bytes)) || self.out.flush().is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        if !matches!((&mut &*socket).read(&mut byte), Ok(1)) {
            return false;
        }
        let soft = mapped_bytes()
            .unwrap_or(0)
            .saturating_add(bytes)
            .saturating_add(CHILD_OVERHEAD);
        // Without the lower limit the hard one still holds.
        limit_memory(soft.min(self.hard), self.hard).ok();
        true
    }

    /// Says how the file ended.
    fn finish(mut self, parsed: Result<(), String>) -> io::Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.send(match parsed {
            Ok(()) => Message::Done,
            Err(message) => Message::Failed(message),
        });
        match self.failed.take() {
            Some(e) => Err(e),
            None => self.out.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Plays a child that writes `lines` (answering each reservation) and
    /// returns how the parent's side ended, the events it emitted and the
    /// bytes the child was sent.
    fn talk(lines: &[&str], stop_after: usize) -> (Ended, Vec<RowEvent>, Vec<u8>) {
        talk_within(Limits::default(), lines, stop_after)
    }

    fn talk_within(
        limits: Limits,
        lines: &[&str],
        stop_after: usize,
    ) -> (Ended, Vec<RowEvent>, Vec<u8>) {
        let mut events = Vec::new();
        let (ended, answers) = talk_to(limits, lines, &mut |event| {
            events.push(event);
            events.len() < stop_after
        });
        (ended, events, answers)
    }

    /// [`talk_within`], the parent's events handed to `emit`.
    fn talk_to(
        limits: Limits,
        lines: &[&str],
        emit: &mut dyn FnMut(RowEvent) -> bool,
    ) -> (Ended, Vec<u8>) {
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        let script: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let child = std::thread::spawn(move || {
            theirs.write_all(script.as_bytes()).expect("write");
            theirs
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            let mut answers = Vec::new();
            theirs.read_to_end(&mut answers).ok();
            answers
        });
        let mut rows = 0;
        let ended = converse(&ours, limits, &mut rows, emit);
        drop(ours);
        (ended, child.join().expect("child"))
    }

    /// [`talk_to`] on a thread of its own, each event given to `on_event`
    /// and what it returns kept: how the conversation ended and those,
    /// within 20 s (a parent that waits for ever fails the test).
    fn talk_in_time<T: Send + 'static>(
        limits: Limits,
        lines: Vec<String>,
        mut on_event: impl FnMut(&RowEvent) -> T + Send + 'static,
    ) -> (Ended, Vec<T>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            let mut seen = Vec::new();
            let (ended, _) = talk_to(limits, &lines, &mut |event| {
                seen.push(on_event(&event));
                true
            });
            tx.send((ended, seen)).ok();
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the conversation ends")
    }

    #[test]
    fn rows_are_counted_and_checked_again_and_reservations_answered() {
        let row = serde_json::to_string(&Message::Row(json!({"text": "a"}))).expect("row");
        let nul = serde_json::to_string(&Message::Row(json!({"text": "a\u{0}"}))).expect("row");
        let failed = serde_json::to_string(&Message::RowError("row 2: bad".into())).expect("err");
        let reserve = serde_json::to_string(&Message::Reserve(1 << 20)).expect("reserve");
        let done = serde_json::to_string(&Message::Done).expect("done");
        let lines = [&reserve[..], &row, &nul, &failed, &reserve, &row, &done];
        let (ended, events, answers) = talk(&lines, usize::MAX);
        assert!(matches!(ended, Ended::Done));
        assert_eq!(answers, b"\n\n", "one byte per reservation");
        let rows: Vec<(i64, bool)> = events
            .iter()
            .map(|e| match e {
                RowEvent::Task(row, _) => (*row, true),
                RowEvent::Error(row, _) => (*row, false),
                RowEvent::WillWait => (-1, false),
            })
            .collect();
        assert_eq!(rows, [(0, true), (1, false), (2, false), (3, true)]);
        let RowEvent::Error(_, message) = &events[1] else {
            panic!("a NUL is refused by the parent too");
        };
        assert!(message.contains("NUL"), "{message}");

        // A key serde_json reserves is refused by the parent too, not read
        // as the JSON in its string.
        let raw = json!({ "$serde_json::private::RawValue": "{\"a\": 1}" });
        let reserved = serde_json::to_string(&Message::Row(raw)).expect("row");
        let (_, events, _) = talk(&[&reserved, &done], usize::MAX);
        assert!(
            matches!(&events[..], [RowEvent::Error(0, m)] if m.contains("is reserved")),
            "{events:?}"
        );

        let (ended, events, _) = talk(&[&row, &row, &row], 2);
        assert!(matches!(ended, Ended::Stopped));
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn a_child_that_breaks_off_or_says_something_else_is_broken() {
        let row = serde_json::to_string(&Message::Row(json!({"text": "a"}))).expect("row");
        let cases: [(&[&str], &str); 3] = [
            (&[&row], "ended without finishing"),
            (&[&row, "{\"row\": "], "unreadable"),
            (&["[1, 2]"], "unreadable"),
        ];
        for (lines, why) in cases {
            let (ended, _, _) = talk(lines, usize::MAX);
            let Ended::Broken(said) = ended else {
                panic!("{lines:?} is not a finished conversation");
            };
            assert!(said.contains(why), "{lines:?}: {said}");
        }
        let message = broken(
            3,
            "it ended without finishing".into(),
            None,
            "\nmemory allocation of 8589934592 bytes failed\n",
        );
        assert!(
            message.starts_with("the Parquet reader stopped on this file after 3 row(s)")
                && message.contains("it said: memory allocation of 8589934592 bytes failed."),
            "{message}"
        );
    }

    /// Limits with a parse budget of 4 MiB of its own.
    fn within_4_mib() -> (&'static crate::ingest::budget::ByteBudget, Limits) {
        let budget: &'static _ =
            Box::leak(Box::new(crate::ingest::budget::ByteBudget::new(4 << 20)));
        let limits = Limits {
            budget: Some(budget),
            ..Limits::default()
        };
        (budget, limits)
    }

    /// A long row is parsed under a reservation of its own, and never waits
    /// for it holding the group's: that waited for ever once both came to
    /// more than the budget. Here the row's is the oldest growing one, so
    /// it takes past the budget and does not wait (the next test has it
    /// wait).
    #[test]
    fn a_long_row_never_waits_while_its_group_holds_the_budget() {
        let (_, limits) = within_4_mib();
        let reserve = serde_json::to_string(&Message::Reserve(3 << 20)).expect("reserve");
        let long = serde_json::to_string(&Message::Row(json!({"text": "a".repeat(200 << 10)})))
            .expect("row");
        let done = serde_json::to_string(&Message::Done).expect("done");
        let (ended, events) = talk_in_time(limits, vec![reserve, long, done], RowEvent::clone);
        assert!(matches!(ended, Ended::Done));
        assert!(matches!(events[..], [RowEvent::Task(0, _)]));

        let greedy = serde_json::to_string(&Message::Reserve(5 << 20)).expect("reserve");
        let (ended, _, _) = talk_within(limits, &[&greedy], usize::MAX);
        let Ended::Broken(why) = ended else {
            panic!("a child asking for more than the budget is broken");
        };
        assert!(why.contains("more than the parse budget"), "{why}");
    }

    /// A long row that must wait for room (an older line's reservation
    /// is the oldest) lets its group's reservation go first and says so
    /// (`RowEvent::WillWait`), then takes the group's again once the row
    /// is parsed: waiting holding it waited for ever here.
    #[test]
    fn a_long_row_lets_its_group_go_to_wait_and_takes_it_again() {
        let (budget, limits) = within_4_mib();
        let _older = budget.grower();
        let reserve = serde_json::to_string(&Message::Reserve(3 << 20)).expect("reserve");
        let long = serde_json::to_string(&Message::Row(json!({"text": "a".repeat(1 << 20)})))
            .expect("row");
        let done = serde_json::to_string(&Message::Done).expect("done");
        let (ended, events) = talk_in_time(limits, vec![reserve, long, done], |event| {
            (event.clone(), budget.bytes() - budget.free_bytes())
        });
        assert!(matches!(ended, Ended::Done));
        assert!(
            matches!(
                events[..],
                [(RowEvent::WillWait, _), (RowEvent::Task(0, _), held)] if held == 3 << 20
            ),
            "the group's held again as the row is handed on: {events:?}"
        );
        assert_eq!(budget.free_bytes(), budget.bytes(), "all let go at the end");
    }

    /// A long row's text is held under the parse budget while it is read,
    /// as a JSONL line's is: rows read whole before their parse reserved
    /// waited for it holding their text outside every budget.
    #[test]
    fn a_long_row_holds_its_text_of_the_budget_as_it_is_read() {
        let (budget, limits) = within_4_mib();
        let long = serde_json::to_string(&Message::Row(json!({"text": "a".repeat(1 << 20)})))
            .expect("row");
        let done = serde_json::to_string(&Message::Done).expect("done");
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        let child = std::thread::spawn(move || {
            let (first, rest) = long.as_bytes().split_at(512 << 10);
            theirs.write_all(first).expect("write");
            // What the parent holds of the budget with half the row read.
            let until = Instant::now() + Duration::from_secs(10);
            let mut held = 0;
            while held < 256 << 10 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
                held = budget.bytes() - budget.free_bytes();
            }
            let rest = format!("{}\n{done}\n", std::str::from_utf8(rest).expect("text"));
            theirs.write_all(rest.as_bytes()).expect("write");
            theirs
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            held
        });
        let (mut rows, mut events) = (0, Vec::new());
        let ended = converse(&ours, limits, &mut rows, &mut |event| {
            events.push(event);
            true
        });
        let held = child.join().expect("child");
        assert!(matches!(ended, Ended::Done));
        assert!(matches!(events[..], [RowEvent::Task(0, _)]), "{events:?}");
        assert!(held >= 256 << 10, "its text held while it was read: {held}");
        assert_eq!(budget.free_bytes(), budget.bytes(), "all let go at the end");
    }

    /// A parent about to wait for a row group's reservation says so first
    /// (`RowEvent::WillWait`): its parse's rows then go on to be committed,
    /// which is what frees the budget here. Waiting with them held could
    /// wait for ever (`super::super::budget`).
    #[test]
    fn a_parent_says_it_will_wait_before_it_waits_for_a_row_group() {
        let (budget, limits) = within_4_mib();
        let reserve = serde_json::to_string(&Message::Reserve(3 << 20)).expect("reserve");
        let row = serde_json::to_string(&Message::Row(json!({"text": "a"}))).expect("row");
        let done = serde_json::to_string(&Message::Done).expect("done");
        let mut held = Some(budget.try_take(3 << 20).expect("the budget"));
        let (ended, events) = talk_in_time(limits, vec![reserve, row, done], move |event| {
            if *event == RowEvent::WillWait {
                drop(held.take());
            }
            event.clone()
        });
        assert!(matches!(ended, Ended::Done));
        assert!(
            matches!(events[..], [RowEvent::WillWait, RowEvent::Task(0, _)]),
            "{events:?}"
        );
    }
}
