//! The Redis storage's connection to its server.
//!
//! Made here rather than by the client: the name is resolved through the
//! SSRF guard, TLS is checked by the platform's verifier (as the HTTP
//! backends' is), and every reply is watched for its size
//! ([`super::replies`]) before the client's parser holds it. The client's
//! multiplexed connection never reconnects, so a server restarted, a
//! connection cut by the network or one the watch closed is dialled again
//! by the next command: only the commands in flight when it broke fail
//! (transient, so retried), not every command until the storage is opened
//! again.
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::{RedisConfig, replies};
use crate::{
    Error, Result,
    security::net::{GuardedResolver, NetPolicy},
};

/// Time for a connection and its TLS handshake; the server's first
/// answers (AUTH, SELECT) then have the response timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The storage's connection: clones share it.
#[derive(Clone)]
pub(super) struct Conn(Arc<Dialer>);

/// What a connection is made from, and the live one.
struct Dialer {
    config: RedisConfig,
    /// AUTH and SELECT, as the client sends them.
    handshake: redis::RedisConnectionInfo,
    limits: replies::Limits,
    net: NetPolicy,
    what: String,
    /// `None` once the live link broke, until the next command dials.
    link: tokio::sync::Mutex<Option<Link>>,
}

/// One connection, and why its watch closed it if it did.
#[derive(Clone)]
struct Link {
    client: MultiplexedConnection,
    refusal: replies::Refusal,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Conn").field(&self.0.what).finish()
    }
}

impl Conn {
    /// Connects, as every later dial will (the caller retries).
    pub(super) async fn open(
        config: RedisConfig,
        handshake: redis::RedisConnectionInfo,
        limits: replies::Limits,
        net: NetPolicy,
        what: String,
    ) -> Result<Conn> {
        let dialer = Dialer {
            config,
            handshake,
            limits,
            net,
            what,
            link: tokio::sync::Mutex::new(None),
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
        self.settle(answer, &link, what).await
    }

    pub(super) async fn pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        what: &str,
    ) -> Result<T> {
        let mut link = self.link().await?;
        let answer = pipe.query_async(&mut link.client).await;
        self.settle(answer, &link, what).await
    }

    /// The live link, dialled first if the last one broke (one dial at a
    /// time: the commands that find none wait for it).
    async fn link(&self) -> Result<Link> {
        let mut live = self.0.link.lock().await;
        if let Some(link) = live.as_ref() {
            return Ok(link.clone());
        }
        let d = &*self.0;
        let link = connect(&d.config, &d.handshake, d.limits, &d.net, &d.what).await?;
        *live = Some(link.clone());
        Ok(link)
    }

    /// A command's answer; a link that broke under it is let go, so the
    /// next command (the retry) dials again.
    async fn settle<T>(&self, answer: redis::RedisResult<T>, link: &Link, what: &str) -> Result<T> {
        let err = match answer {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if err.is_unrecoverable_error() || link.refusal.get().is_some() {
            let mut live = self.0.link.lock().await;
            if live.as_ref().is_some_and(|l| l.refusal.same(&link.refusal)) {
                *live = None;
            }
        }
        Err(failure(&link.refusal, &err, what))
    }
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
    {
        Error::Transient(msg)
    } else {
        Error::invalid("storage_rejected", None, msg)
    }
}

/// A command's failure: the watch's refusal when it closed the connection
/// (not retried), else as the client says ([`classify`]).
fn failure(refusal: &replies::Refusal, err: &redis::RedisError, what: &str) -> Error {
    match refusal.get() {
        Some(why) => Error::invalid(replies::Refusal::code(why), None, format!("{what}: {why}")),
        None => classify(err, what),
    }
}

/// A connection to the storage's server: its name resolved through the
/// SSRF guard, TLS when the config asks, and every reply watched for its
/// size, under the client's handshake (AUTH, SELECT).
async fn connect(
    config: &RedisConfig,
    handshake: &redis::RedisConnectionInfo,
    limits: replies::Limits,
    net: &NetPolicy,
    what: &str,
) -> Result<Link> {
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = tcp_connect(&config.host, config.port, net).await?;
        if config.tls {
            tls_connect(tcp, &config.host).await.map(Transport::Tls)
        } else {
            Ok(Transport::Plain(tcp))
        }
    });
    let transport = connected
        .await
        .map_err(|_| Error::Transient(format!("{what}: no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| classify(&e.into(), what))?;
    match transport {
        Transport::Plain(tcp) => attach(tcp, handshake, limits, what).await,
        Transport::Tls(tls) => attach(tls, handshake, limits, what).await,
    }
}

/// The client's connection over `stream`, its replies watched, after the
/// handshake; its driver runs on a task of its own until the last clone of
/// the connection is dropped.
async fn attach<S>(
    stream: S,
    handshake: &redis::RedisConnectionInfo,
    limits: replies::Limits,
    what: &str,
) -> Result<Link>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let settings = redis::AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
    let refusal = replies::Refusal::default();
    let watched = replies::Watched::new(stream, limits, refusal.clone());
    let made = MultiplexedConnection::new_with_config(handshake, watched, settings).await;
    let (client, driver) = made.map_err(|e| failure(&refusal, &e, what))?;
    tokio::spawn(driver);
    Ok(Link { client, refusal })
}

enum Transport {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// A TCP connection to the first of `host`'s allowed addresses that takes one.
async fn tcp_connect(
    host: &str,
    port: u16,
    net: &NetPolicy,
) -> std::io::Result<tokio::net::TcpStream> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let mut last = None;
    for mut addr in GuardedResolver::new(net.clone()).resolve(bare).await? {
        addr.set_port(port);
        match tokio::net::TcpStream::connect(addr).await {
            Ok(tcp) => {
                tcp.set_nodelay(true)?;
                return Ok(tcp);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{host} has no address"))))
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
