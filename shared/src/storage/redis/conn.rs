//! The Redis storage's connection to its server.
//!
//! Made here rather than by the client: the name is resolved through the
//! SSRF guard, TLS is checked by the platform's verifier (as the HTTP
//! backends' is), and every reply is watched for its size
//! ([`super::replies`]) before the client's parser holds it. The client's
//! multiplexed connection never reconnects, so a server restarted, a
//! connection cut by the network, one that stopped answering (a command
//! timed out) or one the watch closed is dialled again by the next
//! command: only the commands in flight when it broke fail (transient, so
//! retried), not every command until the storage is opened again.
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::{RedisConfig, replies};
use crate::{
    Error, Result,
    security::net::{GuardedResolver, NetPolicy},
};

/// Time for a connection, its TLS and the client's handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an idle connection waits before the kernel asks whether the
/// server is still there (a balancer or firewall may drop an idle flow
/// without a word), and between the asks.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The storage's connection: clones share it.
#[derive(Clone)]
pub(super) struct Conn(Arc<Dialer>);

/// What a connection is made from.
#[derive(Clone)]
pub(super) struct Dial {
    pub config: RedisConfig,
    /// AUTH and SELECT, as the client sends them.
    pub handshake: redis::RedisConnectionInfo,
    pub limits: replies::Limits,
    pub net: NetPolicy,
    /// Time for the answer to each command (`LABELSYNC_STORAGE_TIMEOUT_SECS`).
    pub response_timeout: Duration,
    /// The server, as errors name it.
    pub what: String,
}

/// How to dial, and the live connection.
struct Dialer {
    dial: Dial,
    slot: tokio::sync::Mutex<Slot>,
    /// Dials ended: a command that waited for the slot while another
    /// dialled takes that dial's outcome rather than dialling again (a
    /// batch's reads share the storage: one by one, each would wait a
    /// connect timeout of its own).
    dials_ended: AtomicU64,
}

/// The live link, or why the last dial failed.
#[derive(Default)]
struct Slot {
    live: Option<Link>,
    failed: Option<Error>,
}

/// One connection, and why its watch closed it if it did.
#[derive(Clone)]
struct Link {
    client: MultiplexedConnection,
    refusal: replies::Refusal,
    /// Set when a command on it failed in a way that leaves it unusable.
    broken: Arc<AtomicBool>,
    driver: Arc<Driver>,
}

impl Link {
    fn usable(&self) -> bool {
        !self.broken.load(Ordering::SeqCst)
            && self.refusal.get().is_none()
            && !self.driver.0.is_finished()
    }
}

/// The task that drives a connection, stopped when the last clone of its
/// link is dropped. Left alone, it would wait for every answer still owed
/// (forever, from a server that stopped talking) with its socket open.
struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Conn").field(&self.0.dial.what).finish()
    }
}

impl Conn {
    /// Connects, as every later dial will (the caller retries).
    pub(super) async fn open(dial: Dial) -> Result<Conn> {
        let dialer = Dialer {
            dial,
            slot: tokio::sync::Mutex::default(),
            dials_ended: AtomicU64::new(0),
        };
        let conn = Conn(Arc::new(dialer));
        conn.link().await?;
        Ok(conn)
    }

    pub(super) async fn cmd<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        what: &str,
    ) -> Result<T> {
        let mut link = self.link().await?;
        let answer = cmd.query_async(&mut link.client).await;
        settle(answer, &link, what)
    }

    pub(super) async fn pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        what: &str,
    ) -> Result<T> {
        let mut link = self.link().await?;
        let answer = pipe.query_async(&mut link.client).await;
        settle(answer, &link, what)
    }

    /// The live link, dialled first if the last one broke (one dial at a
    /// time: the commands that find none wait for it, and take its
    /// failure as theirs).
    async fn link(&self) -> Result<Link> {
        let d = &*self.0;
        let seen = d.dials_ended.load(Ordering::SeqCst);
        let mut slot = d.slot.lock().await;
        if let Some(link) = slot.live.as_ref().filter(|link| link.usable()) {
            return Ok(link.clone());
        }
        if let Some(failed) = slot.failed.as_ref()
            && d.dials_ended.load(Ordering::SeqCst) != seen
        {
            return Err(failed.clone());
        }
        let dialled = connect(&d.dial).await;
        slot.live = dialled.as_ref().ok().cloned();
        slot.failed = dialled.as_ref().err().cloned();
        d.dials_ended.fetch_add(1, Ordering::SeqCst);
        dialled
    }
}

/// A command's answer; a link that broke under it (dropped, timed out,
/// refused by the watch) is marked so, and the next command (the retry)
/// dials again.
fn settle<T>(answer: redis::RedisResult<T>, link: &Link, what: &str) -> Result<T> {
    let err = match answer {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    if err.is_unrecoverable_error() || err.is_timeout() || link.refusal.get().is_some() {
        link.broken.store(true, Ordering::SeqCst);
    }
    Err(failure(&link.refusal, &err, what))
}

/// Classifies a Redis error.
fn classify(err: &redis::RedisError, what: &str) -> Error {
    let msg = format!("{what}: {err}");
    let text = err.to_string();
    if text.contains("LABELSYNC_ALLOW_PRIVATE_ENDPOINTS") {
        return Error::invalid("endpoint_not_allowed", Some("config.host"), msg);
    }
    if err.kind() == redis::ErrorKind::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("AUTH")
    {
        Error::Unauthenticated(msg)
    } else if text.contains("NOPERM") {
        Error::PermissionDenied(msg)
    } else if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        // LOADING (a restarted server reading its data), TRYAGAIN, MASTERDOWN
        || matches!(err.retry_method(), redis::RetryMethod::WaitAndRetry)
    {
        Error::Transient(msg)
    } else {
        Error::invalid("storage_rejected", None, msg)
    }
}

/// A command's failure: the watch's refusal when it closed the connection
/// under the command (not retried), else as the client says
/// ([`classify`]; an error the server answered stays its own).
fn failure(refusal: &replies::Refusal, err: &redis::RedisError, what: &str) -> Error {
    match refusal.get() {
        Some(why) if err.is_io_error() || err.is_unrecoverable_error() => {
            Error::invalid(replies::Refusal::code(why), None, format!("{what}: {why}"))
        }
        _ => classify(err, what),
    }
}

/// A connection to the storage's server: its name resolved through the
/// SSRF guard, TLS when the config asks, and every reply watched for its
/// size, under the client's handshake (AUTH, SELECT). All of it within
/// [`CONNECT_TIMEOUT`], as the client's own connect was: the client sends
/// the handshake with no timeout, and a server that takes a connection and
/// never answers must not hold the storage's opening forever.
async fn connect(d: &Dial) -> Result<Link> {
    let what = d.what.as_str();
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let io = |e: std::io::Error| classify(&e.into(), what);
        let tcp = tcp_connect(&d.config.host, d.config.port, &d.net)
            .await
            .map_err(io)?;
        if d.config.tls {
            let tls = tls_connect(tcp, &d.config.host)
                .await
                .map_err(|e| tls_failure(e, what))?;
            attach(tls, d, what).await
        } else {
            attach(tcp, d, what).await
        }
    });
    connected.await.map_err(|_| {
        Error::Transient(format!(
            "{what}: no connection and handshake within {CONNECT_TIMEOUT:?}"
        ))
    })?
}

/// The client's connection over `stream`, its replies watched, after the
/// handshake; its driver runs on a task of its own until the last clone of
/// the link is dropped.
async fn attach<S>(stream: S, d: &Dial, what: &str) -> Result<Link>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let settings =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(d.response_timeout));
    let refusal = replies::Refusal::default();
    let watched = replies::Watched::new(stream, d.limits, refusal.clone());
    let made = MultiplexedConnection::new_with_config(&d.handshake, watched, settings).await;
    let (client, driver) = made.map_err(|e| failure(&refusal, &e, what))?;
    let driver = Arc::new(Driver(tokio::spawn(driver)));
    Ok(Link {
        client,
        refusal,
        broken: Arc::default(),
        driver,
    })
}

/// A TCP connection to `host`: its allowed addresses are tried at once,
/// and the first to answer is taken (as the client itself does), so an
/// address that drops packets does not cost the others their time.
async fn tcp_connect(
    host: &str,
    port: u16,
    net: &NetPolicy,
) -> std::io::Result<tokio::net::TcpStream> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs = GuardedResolver::new(net.clone()).resolve(bare).await?;
    if addrs.is_empty() {
        return Err(std::io::Error::other(format!("{host} has no address")));
    }
    let tries = addrs.into_iter().map(|mut addr| {
        addr.set_port(port);
        Box::pin(tokio::net::TcpStream::connect(addr))
    });
    let (tcp, _) = futures::future::select_ok(tries).await?;
    tcp.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
    Ok(tcp)
}

/// A TLS handshake's failure: one TLS itself refused (a certificate that
/// does not hold for the host, a server that does not speak TLS) will not
/// change by retrying; a broken connection may.
fn tls_failure(err: std::io::Error, what: &str) -> Error {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(refused) => Error::invalid(
            "storage_rejected",
            Some("config.tls"),
            format!("{what}: TLS: {refused}"),
        ),
        None => classify(&err.into(), what),
    }
}

/// TLS over `tcp`, the certificate checked for `host` by the platform's
/// verifier (as the HTTP backends check theirs).
async fn tls_connect(
    tcp: tokio::net::TcpStream,
    host: &str,
) -> std::io::Result<Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>> {
    let config = crate::security::net::tls_client_config().map_err(std::io::Error::other)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(bare.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Ok(Box::new(connector.connect(name, tcp).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that takes the connection and never answers the handshake
    /// is given up after [`CONNECT_TIMEOUT`] (the client would wait forever,
    /// and with it every job opening the storage).
    #[tokio::test]
    async fn a_server_that_never_answers_the_handshake_is_given_up() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let config = RedisConfig {
            host: "127.0.0.1".into(),
            port,
            db: 1, // a SELECT, which needs its answer
            path: String::new(),
            tls: false,
        };
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/1")).unwrap();
        let handshake = client.get_connection_info().redis_settings().clone();
        let limits = replies::Limits {
            bytes: 1 << 20,
            values: 1_000,
        };
        let started = std::time::Instant::now();
        let net = NetPolicy::allow_all();
        let dial = Dial {
            config,
            handshake,
            limits,
            net,
            response_timeout: Duration::from_secs(5),
            what: "redis test".into(),
        };
        let connecting = Conn::open(dial);
        let made = tokio::time::timeout(Duration::from_secs(30), connecting).await;
        let made = made.expect("still waiting for the handshake after 30 s");
        match made {
            Err(Error::Transient(message)) => assert!(message.contains("handshake"), "{message}"),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("connected to a server that never answered"),
        }
        assert!(started.elapsed() < Duration::from_secs(25));
        silent.abort();
    }

    /// A server that does not speak TLS, for a storage that asks for TLS,
    /// is a refusal at once, not a passing failure retried to the end.
    #[tokio::test]
    async fn a_server_that_does_not_speak_tls_is_refused() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let plain = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket.write_all(b"-ERR this is not TLS\r\n").await;
            }
        });
        let config = RedisConfig {
            host: "127.0.0.1".into(),
            port,
            db: 0,
            path: String::new(),
            tls: true,
        };
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        let dial = Dial {
            config,
            handshake: client.get_connection_info().redis_settings().clone(),
            limits: replies::Limits {
                bytes: 1 << 20,
                values: 1_000,
            },
            net: NetPolicy::allow_all(),
            response_timeout: Duration::from_secs(5),
            what: "redis test".into(),
        };
        match Conn::open(dial).await {
            Err(Error::Invalid { code, message, .. }) => {
                assert_eq!(code, "storage_rejected", "{message}");
                assert!(message.contains("TLS"), "{message}");
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("took a plain server for TLS"),
        }
        plain.abort();
    }
}
