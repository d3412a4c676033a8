//! Redis as a storage: keys under `path` are objects, their string values
//! the bodies (task JSON in Tasks mode; export writes `SET <path><key>`).
//!
//! Listing uses `SCAN` (never `KEYS`, which blocks the server). `SCAN`
//! returns keys in no order and its cursor does not survive a restart of
//! the listing, while runs resume by key order (`start_after`); so a listing
//! gathers the matching key names first, sorts them, and pages through them.
//! Only names are held (a Redis dataset fits in the server's memory, and its
//! names in ours); values are read one object at a time.
use std::time::Duration;

mod conn;
mod replies;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use super::{
    BackendKind, GetRange, KeyShape, ListOptions, Object, ObjectMeta, Page, Secrets, Storage,
    StorageEnv, bytes_stream, check_key, paginate, parse_config, retry::retry,
};
use crate::{Error, Result};
use conn::Conn;

/// The most of a value read at once: Redis' own limit on a string
/// (`proto-max-bulk-len`). A value is read whole, so the smaller of this
/// and `LABELSYNC_MAX_OBJECT_BYTES` bounds what one read holds.
const MAX_REDIS_VALUE: u64 = 512 << 20;

/// SCAN batches in a row that bring no key under the prefix, after which a listing
/// gives up. A real Redis answers empty batches while it walks keys the
/// prefix does not match, about 1,000 keys a batch (COUNT): this many is a
/// hundred million keys in a row, and a server that answers nothing
/// forever must not be asked forever.
const MAX_BARREN_SCANS: u32 = 100_000;

fn default_port() -> u16 {
    6379
}

/// The `config` object of a `redis` storage (docs/API.md); unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub db: i64,
    /// Key prefix of every object (`config.path` in docs/API.md).
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub tls: bool,
}

impl RedisConfig {
    pub async fn parse(config: &serde_json::Value, env: &StorageEnv) -> Result<Self> {
        let config: RedisConfig = parse_config(BackendKind::Redis, config)?;
        if config.host.trim().is_empty() || config.host.contains(['/', '@', ' ']) {
            return Err(Error::invalid(
                "invalid_config",
                Some("config.host"),
                "config.host must be a host name or address",
            ));
        }
        if !(0..=1_000_000).contains(&config.db) {
            return Err(Error::invalid(
                "invalid_config",
                Some("config.db"),
                "config.db must be a database number (0, 1, ...)",
            ));
        }
        env.net
            .check_host(&config.host, config.port, "config.host")
            .await?;
        Ok(config)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// The keys of one Redis database under the storage's `path`, each value an
/// object. Listings use `SCAN` (never `KEYS`) and are sorted; no presign.
#[derive(Debug)]
pub struct RedisStorage {
    config: RedisConfig,
    conn: Conn,
    /// The longest value read: see [`MAX_REDIS_VALUE`].
    max_value: u64,
}

impl RedisStorage {
    pub async fn open(config: RedisConfig, secrets: &Secrets, env: &StorageEnv) -> Result<Self> {
        // The name was checked when the config was saved; check again now,
        // right before connecting (DNS may have changed since).
        env.net
            .check_host(&config.host, config.port, "config.host")
            .await?;
        let auth = secrets.get("password").map_or(String::new(), |p| {
            format!(":{}@", utf8_percent_encode(p, NON_ALPHANUMERIC))
        });
        let host = if config.host.contains(':') && !config.host.starts_with('[') {
            format!("[{}]", config.host) // a bare IPv6 address
        } else {
            config.host.clone()
        };
        // Only the AUTH and SELECT of the handshake come from the URL: the
        // connection, and its TLS, are made here (`connect`).
        let url = format!("redis://{auth}{host}:{}/{}", config.port, config.db);
        let what = format!("redis {}:{}", config.host, config.port);
        let client = redis::Client::open(url.as_str()).map_err(|e| {
            Error::invalid("invalid_config", Some("config"), format!("{what}: {e}"))
        })?;
        let max_value = env.max_object_bytes.clamp(1, MAX_REDIS_VALUE);
        let limits = replies::Limits {
            bytes: max_value.max(super::retry::MAX_PAGE_BYTES as u64) + (64 << 10),
            values: super::MAX_GATHERED_NAMES as u64 + 16,
        };
        let dial = conn::Dial {
            config: config.clone(),
            handshake: client.get_connection_info().redis_settings().clone(),
            limits,
            net: env.net.clone(),
            response_timeout: env.request_timeout,
            what: what.clone(),
        };
        let conn = retry(&what, || Conn::open(dial.clone())).await?;
        Ok(RedisStorage {
            config,
            conn,
            max_value,
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.config.path)
    }

    /// Every matching key name (relative to `path`), sorted. A server
    /// that answers batches with no key under the prefix forever, each
    /// with a cursor saying more follow, is given up on after
    /// [`MAX_BARREN_SCANS`].
    async fn scan_names(&self, opts: &ListOptions) -> Result<Vec<String>> {
        let under = self.full_key(&opts.prefix);
        let pattern = format!("{}*", glob_escape(&under));
        let conn = &self.conn;
        let mut cursor: u64 = 0;
        let mut names = Vec::new();
        let mut barren_in_a_row = 0u32;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) =
                retry("redis SCAN", || conn.cmd(&scan, "redis SCAN")).await?;
            // A key under the prefix is progress, wanted or not (a resumed
            // or one-level listing passes over many).
            let progress = batch.iter().any(|full| full.starts_with(&under));
            names.extend(batch.into_iter().filter_map(|full| {
                // A server may answer names the pattern does not match.
                let key = full.strip_prefix(self.config.path.as_str())?.to_owned();
                let rest = key.strip_prefix(opts.prefix.as_str())?;
                let wanted = (opts.recursive || !rest.contains('/'))
                    && opts.start_after.as_ref().is_none_or(|after| key > *after);
                wanted.then_some(key)
            }));
            if names.len() > super::MAX_GATHERED_NAMES {
                let under = format!("keys under {under:?}");
                let why = "Redis cannot list in key order";
                let advice = "give the storage a narrower prefix";
                return Err(super::too_many_names("redis SCAN", &under, why, advice));
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
            barren_in_a_row = if progress { 0 } else { barren_in_a_row + 1 };
            if barren_in_a_row >= MAX_BARREN_SCANS {
                return Err(Error::invalid(
                    "storage_rejected",
                    None,
                    format!(
                        "redis SCAN: the server answered {MAX_BARREN_SCANS} batches in a row with no key under the prefix, each saying more follow; the listing cannot go on"
                    ),
                ));
            }
        }
        // SCAN may return a key twice (rehashing); sort and dedup.
        names.sort_unstable();
        names.dedup();
        Ok(names)
    }
}

/// The `GETRANGE` bounds (both inclusive, negative from the end) that
/// read `range` of a value, cut to its first `max` bytes: an honest
/// server never sends more than the limit.
fn getrange_bounds(range: Option<GetRange>, max: u64) -> (i64, i64) {
    let at = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let last = at(max).max(1) - 1; // offset of the last byte taken, from the start
    match range {
        None => (0, last),
        Some(GetRange::From(start)) => (at(start), at(start).saturating_add(last)),
        Some(GetRange::Bounded { start, end }) => {
            (at(start), at(end).min(at(start).saturating_add(last)))
        }
        // `-0` would read from the start: no bytes is start past end.
        Some(GetRange::Suffix(0)) => (1, 0),
        Some(GetRange::Suffix(n)) => (-at(n.min(max)), -1),
    }
}

/// Bytes `range` asks of a value of `size` bytes.
fn wanted(range: Option<GetRange>, size: u64) -> u64 {
    match range {
        None => size,
        Some(GetRange::From(start)) => size.saturating_sub(start),
        Some(GetRange::Bounded { start, end }) => {
            (end.min(size.saturating_sub(1)) + 1).saturating_sub(start)
        }
        Some(GetRange::Suffix(n)) => n.min(size),
    }
}

/// Escapes glob metacharacters so a prefix matches literally in `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

struct Listing {
    names: std::vec::IntoIter<String>,
    conn: Conn,
    path: String,
    page_size: usize,
}

#[async_trait]
impl Storage for RedisStorage {
    fn kind(&self) -> BackendKind {
        BackendKind::Redis
    }

    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>> {
        // Gathering the names is itself async; it happens at the first page.
        let this = RedisStorage {
            config: self.config.clone(),
            conn: self.conn.clone(),
            max_value: self.max_value,
        };
        enum State {
            Start(Box<RedisStorage>, ListOptions),
            Paging(Listing),
        }
        paginate(
            State::Start(Box::new(this), opts),
            |state: State| async move {
                let mut listing = match state {
                    State::Start(storage, opts) => Listing {
                        names: storage.scan_names(&opts).await?.into_iter(),
                        conn: storage.conn.clone(),
                        path: storage.config.path.clone(),
                        page_size: opts.page_size.max(1),
                    },
                    State::Paging(listing) => listing,
                };
                let keys: Vec<String> = listing.names.by_ref().take(listing.page_size).collect();
                if keys.is_empty() {
                    return Ok(None);
                }
                // One round trip for the sizes of the page.
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("STRLEN").arg(format!("{}{key}", listing.path));
                }
                let sizes: Vec<i64> =
                    retry("redis STRLEN", || listing.conn.pipe(&pipe, "redis STRLEN")).await?;
                let objects = keys
                    .into_iter()
                    .zip(sizes)
                    .map(|(key, size)| ObjectMeta {
                        key,
                        size: Some(size),
                        last_modified: None,
                        etag: None,
                    })
                    .collect();
                Ok(Some((
                    Page {
                        objects,
                        errors: Vec::new(),
                    },
                    State::Paging(listing),
                )))
            },
        )
    }

    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object> {
        check_key(key, KeyShape::Name)?;
        let full = self.full_key(key);
        let what = format!("redis GET {full}");
        let what = &what;
        let (start, end) = getrange_bounds(range, self.max_value);
        let mut pipe = redis::pipe();
        pipe.cmd("GETRANGE").arg(&full).arg(start).arg(end);
        pipe.cmd("STRLEN").arg(&full);
        pipe.cmd("EXISTS").arg(&full);
        let (value, size): (Vec<u8>, i64) = retry(what, || {
            let pipe = &pipe;
            async move {
                let (value, size, exists): (Vec<u8>, i64, bool) =
                    self.conn.pipe(pipe, what).await?;
                if !exists {
                    return Err(Error::NotFound(format!("{what}: no such key")));
                }
                Ok((value, size))
            }
        })
        .await?;
        let size = u64::try_from(size).unwrap_or(0);
        if wanted(range, size) > self.max_value {
            return Err(Error::invalid(
                "storage_answer_too_big",
                None,
                format!(
                    "{what}: the value is {size} bytes; a Redis value is read whole, and at most {} bytes of it are taken (LABELSYNC_MAX_OBJECT_BYTES, at most 512 MiB)",
                    self.max_value
                ),
            ));
        }
        Ok(Object {
            body: bytes_stream(Bytes::from(value)),
            size: Some(size),
            etag: None,
            content_type: None,
        })
    }

    async fn put(&self, key: &str, body: Bytes, _content_type: Option<&str>) -> Result<()> {
        check_key(key, KeyShape::Name)?;
        let full = self.full_key(key);
        let what = format!("redis SET {full}");
        let what = &what;
        let mut set = redis::cmd("SET");
        set.arg(&full).arg(body.as_ref());
        retry(what, || self.conn.cmd::<()>(&set, what)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key, KeyShape::Name)?;
        let full = self.full_key(key);
        let what = format!("redis DEL {full}");
        let what = &what;
        let mut del = redis::cmd("DEL");
        del.arg(&full);
        retry(what, || self.conn.cmd::<()>(&del, what)).await
    }

    async fn presign(&self, _key: &str, _ttl: Duration) -> Result<Option<String>> {
        Ok(None)
    }

    fn task_uri(&self, key: &str) -> String {
        format!(
            "redis://{}:{}/{}/{}",
            self.config.host,
            self.config.port,
            self.config.db,
            self.full_key(key)
        )
    }
}

/// The redis backend as [`super::backend`] lists it.
pub struct Descriptor;

#[async_trait::async_trait]
impl super::Backend for Descriptor {
    fn secret_names(&self) -> &'static [&'static str] {
        &["password"]
    }

    fn key_shape(&self) -> super::KeyShape {
        super::KeyShape::Name
    }

    fn values_are_task_json(&self) -> bool {
        true
    }

    /// The server, its database and the key prefix (not TLS).
    fn place(&self, config: &serde_json::Value, _env: &StorageEnv) -> Option<serde_json::Value> {
        let c: RedisConfig = parse_config(BackendKind::Redis, config).ok()?;
        let host = c.host.trim().to_ascii_lowercase();
        Some(serde_json::json!([host, c.port, c.db, c.path]))
    }

    async fn validate(
        &self,
        config: &serde_json::Value,
        env: &StorageEnv,
    ) -> Result<serde_json::Value> {
        RedisConfig::parse(config, env).await.map(|c| c.to_json())
    }

    async fn open(
        &self,
        config: &serde_json::Value,
        secrets: &Secrets,
        env: &StorageEnv,
    ) -> Result<std::sync::Arc<dyn super::Storage>> {
        Ok(std::sync::Arc::new(
            RedisStorage::open(RedisConfig::parse(config, env).await?, secrets, env).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    use super::*;
    use crate::security::net::NetPolicy;

    /// How a hostile server answers.
    #[derive(Debug, Clone, Copy)]
    enum Hostile {
        /// Every `SCAN` with this many new names and a cursor that never
        /// comes back to 0.
        Scans(usize),
        /// `GETRANGE` with `head`, then `filler` until the client leaves.
        EndlessValue {
            head: &'static [u8],
            filler: &'static [u8],
        },
        /// The first connection never answers a `GETRANGE` (a server
        /// that stopped talking); later ones answer the value `hi`.
        StallsFirst,
        /// The first connection closes at a `GETRANGE`; later ones never
        /// answer anything, not even the handshake.
        ClosesThenSilent,
        /// The first `GETRANGE` is answered `-LOADING` (a restarted
        /// server reading its data); later ones with the value `hi`.
        LoadingFirst,
    }

    /// A server speaking just enough RESP: `+OK` to everything but what
    /// `hostile` says (a hostile or broken server). Its port.
    async fn fake_server(hostile: Hostile) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            for nth in 0.. {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                match hostile {
                    Hostile::ClosesThenSilent if nth > 0 => held.push(socket),
                    _ => drop(tokio::spawn(answer(socket, hostile, nth == 0))),
                }
            }
        });
        port
    }

    /// Writes `head`, then `filler` in 1 MiB pieces at about 200 MiB/s
    /// (a client that holds it all fills no more than that), until the
    /// client goes away.
    async fn endless(write: &mut tokio::net::tcp::OwnedWriteHalf, head: &[u8], filler: &[u8]) {
        let piece = filler.repeat((1 << 20) / filler.len());
        if write.write_all(head).await.is_err() {
            return;
        }
        while write.write_all(&piece).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn answer(socket: tokio::net::TcpStream, hostile: Hostile, first: bool) {
        let (read, mut write) = socket.into_split();
        let mut read = BufReader::new(read);
        let mut next = 0u64;
        let mut loading = matches!(hostile, Hostile::LoadingFirst);
        loop {
            let mut line = String::new();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let count: usize = line.trim().trim_start_matches('*').parse().unwrap_or(0);
            let mut words = Vec::new();
            for _ in 0..count {
                let mut len = String::new();
                read.read_line(&mut len).await.unwrap();
                let len: usize = len.trim().trim_start_matches('$').parse().unwrap();
                let mut word = vec![0u8; len + 2];
                read.read_exact(&mut word).await.unwrap();
                words.push(String::from_utf8_lossy(&word[..len]).to_uppercase());
            }
            let reply = match (words.first().map(String::as_str), hostile) {
                (Some("GETRANGE"), Hostile::EndlessValue { head, filler }) => {
                    return endless(&mut write, head, filler).await;
                }
                (Some("SCAN"), Hostile::Scans(names)) => scan_reply(names, &mut next),
                (Some("GETRANGE"), Hostile::StallsFirst) if first => continue,
                (Some("GETRANGE"), Hostile::ClosesThenSilent) => return,
                (Some("GETRANGE"), Hostile::LoadingFirst) if loading => {
                    loading = false;
                    "-LOADING Redis is loading the dataset in memory\r\n".to_owned()
                }
                (Some("GETRANGE"), _) => "$2\r\nhi\r\n".to_owned(),
                (Some("STRLEN"), _) => ":2\r\n".to_owned(),
                (Some("EXISTS"), _) => ":1\r\n".to_owned(),
                _ => "+OK\r\n".to_owned(),
            };
            if write.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// A SCAN answer of `names` new names, numbered from `next`, and a
    /// cursor saying more follow.
    fn scan_reply(names: usize, next: &mut u64) -> String {
        let mut reply = format!("*2\r\n$1\r\n1\r\n*{names}\r\n");
        for _ in 0..names {
            let name = format!("k{next}");
            *next += 1;
            reply.push_str(&format!("${}\r\n{name}\r\n", name.len()));
        }
        reply
    }

    /// A storage on the fake server at `port`, taking objects of 1 MiB
    /// and waiting 2 s for an answer.
    async fn fake_storage(port: u16) -> RedisStorage {
        let env = StorageEnv {
            net: NetPolicy::allow_all(),
            max_object_bytes: 1 << 20,
            request_timeout: Duration::from_secs(2),
            ..StorageEnv::default()
        };
        let config = RedisConfig {
            host: "127.0.0.1".into(),
            port,
            db: 0,
            path: String::new(),
            tls: false,
        };
        RedisStorage::open(config, &Secrets::default(), &env)
            .await
            .unwrap()
    }

    /// The error a listing of a server answering `names` new names a SCAN
    /// batch, forever, stops with: its code and message.
    async fn refusal_of_endless_scans(names: usize) -> (&'static str, String) {
        let storage = fake_storage(fake_server(Hostile::Scans(names)).await).await;
        let mut listing = storage.list(ListOptions {
            prefix: String::new(),
            recursive: true,
            start_after: None,
            page_size: 100,
        });
        let first = tokio::time::timeout(Duration::from_secs(120), listing.next())
            .await
            .expect("the listing was still scanning after 120 s");
        match first {
            Some(Err(Error::Invalid { code, message, .. })) => (code, message),
            other => panic!("{:?}", other.map(|p| p.map(|p| p.objects.len()))),
        }
    }

    /// A SCAN whose batches never bring a key, and never end, stops the
    /// listing with an error saying so (it was asked forever: with nothing
    /// gathered, no limit was reached).
    #[tokio::test]
    async fn a_scan_of_empty_batches_that_never_ends_is_given_up() {
        let (code, message) = refusal_of_endless_scans(0).await;
        assert_eq!(code, "storage_rejected");
        assert!(message.contains("100000 batches in a row"), "{message}");
    }

    /// A SCAN that never ends stops the listing at `MAX_GATHERED_NAMES`, with an
    /// error saying so, instead of holding names until the worker dies.
    #[tokio::test]
    async fn a_scan_that_never_ends_stops_at_the_name_limit() {
        let (code, message) = refusal_of_endless_scans(10_000).await;
        assert_eq!(code, "storage_answer_too_big");
        assert!(message.contains("more than 1000000 keys"), "{message}");
    }

    /// A reply the client would hold whole, however large, is cut off
    /// when it passes a limit, whatever it claims: a string announced
    /// larger than the limit, a line that never ends, more values than a
    /// listing takes, and bytes after a string that are not RESP.
    #[tokio::test]
    async fn replies_without_end_are_cut_off_not_held() {
        let cases: [(&[u8], &[u8], &str, &str); 4] = [
            (
                b"$99999999999\r\n",
                b"x",
                "storage_answer_too_big",
                "announces a 99999999999-byte value",
            ),
            (
                b"+",
                b"x",
                "storage_answer_too_big",
                "is longer than 33619968 bytes",
            ),
            (
                b"%600000\r\n",
                b":1\r\n",
                "storage_answer_too_big",
                "announces 1200000 values",
            ),
            (
                b"$10\r\n",
                b"x",
                "storage_rejected",
                "a value starts with byte 0x78",
            ),
        ];
        for (head, filler, code, expected) in cases {
            let port = fake_server(Hostile::EndlessValue { head, filler }).await;
            let storage = fake_storage(port).await;
            let read = tokio::time::timeout(Duration::from_secs(20), storage.get("k", None)).await;
            match read.expect("the read was still taking bytes after 20 s") {
                Err(Error::Invalid {
                    code: got, message, ..
                }) => {
                    assert_eq!((got, message.contains(expected)), (code, true), "{message}");
                }
                Err(other) => panic!("{expected}: {other:?}"),
                Ok(object) => panic!("{expected}: read, size {:?}", object.size),
            }
        }
    }

    /// `GETRANGE` asks no more than the limit of any range, and the size
    /// a range wants is what HTTP would serve of it.
    #[test]
    fn ranges_are_cut_to_the_limit() {
        let bounded = |start, end| Some(GetRange::Bounded { start, end });
        assert_eq!(getrange_bounds(None, 100), (0, 99));
        assert_eq!(getrange_bounds(bounded(10, 19), 100), (10, 19));
        assert_eq!(getrange_bounds(bounded(10, 500), 100), (10, 109));
        assert_eq!(getrange_bounds(Some(GetRange::From(7)), 100), (7, 106));
        assert_eq!(
            getrange_bounds(Some(GetRange::Suffix(500)), 100),
            (-100, -1)
        );
        assert_eq!(getrange_bounds(Some(GetRange::Suffix(0)), 100), (1, 0));
        assert_eq!(wanted(None, 50), 50);
        assert_eq!(wanted(bounded(10, 500), 50), 40);
        assert_eq!(wanted(bounded(60, 70), 50), 0);
        assert_eq!(wanted(Some(GetRange::From(60)), 50), 0);
        assert_eq!(wanted(Some(GetRange::Suffix(500)), 50), 50);
    }

    /// An object's whole body.
    async fn body_of(object: Object) -> Vec<u8> {
        let body: Vec<Bytes> = futures::TryStreamExt::try_collect(object.body)
            .await
            .unwrap();
        body.concat()
    }

    /// A connection that stopped answering (a command timed out) is let
    /// go, and the retry dials again: the read succeeds on a new
    /// connection. (The client never reconnects: every retry waited on the
    /// silent one.)
    #[tokio::test]
    async fn a_connection_that_stops_answering_is_dialled_again() {
        let storage = fake_storage(fake_server(Hostile::StallsFirst).await).await;
        let read = tokio::time::timeout(Duration::from_secs(30), storage.get("k", None)).await;
        let object = read
            .expect("still reading after 30 s")
            .expect("read on a new connection");
        assert_eq!(body_of(object).await, b"hi");
    }

    /// A server still loading its data after a restart (`-LOADING`) is
    /// asked again, not taken as refusing the read for good.
    #[tokio::test]
    async fn a_server_loading_its_data_is_asked_again() {
        let storage = fake_storage(fake_server(Hostile::LoadingFirst).await).await;
        let object = storage.get("k", None).await.expect("read once loaded");
        assert_eq!(body_of(object).await, b"hi");
    }

    /// Commands that find the connection broken while one of them dials
    /// take that dial's outcome: eight commands against a server that
    /// takes connections and never answers fail together after one
    /// connect timeout, not one after another.
    #[tokio::test]
    async fn commands_waiting_for_a_dial_share_its_failure() {
        let storage = fake_storage(fake_server(Hostile::ClosesThenSilent).await).await;
        let mut pipe = redis::pipe();
        pipe.cmd("GETRANGE").arg("k").arg(0).arg(-1);
        let closed = storage.conn.pipe::<Vec<u8>>(&pipe, "first").await;
        assert!(matches!(closed, Err(Error::Transient(_))), "{closed:?}");
        let started = std::time::Instant::now();
        let ping = redis::cmd("PING");
        let pings = (0..8).map(|_| storage.conn.cmd::<()>(&ping, "ping"));
        let all = tokio::time::timeout(Duration::from_secs(40), futures::future::join_all(pings));
        let answers = all.await.expect("still dialling after 40 s");
        assert!(answers.iter().all(Result::is_err), "{answers:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(19), "{took:?}");
    }
}
