//! SSRF guard for user-supplied endpoints (`endpoint_url`, Redis `host`,
//! Databricks `host`).
//!
//! A storage config is user input: without a guard, "sync my bucket at
//! http://169.254.169.254/" reads the cloud metadata service, and a Redis
//! `host` of 10.0.0.5 probes the private network. Addresses that are loopback,
//! private, link-local (metadata), CGNAT, unspecified or multicast are refused
//! unless the deployment allows them with `LABELSYNC_ALLOW_PRIVATE_ENDPOINTS`
//! (`true`, or a comma-separated CIDR allowlist such as `10.1.0.0/16,127.0.0.1/32`).
//!
//! The check runs twice: when a config is validated (for a clear 400), and on
//! every connection through [`GuardedResolver`], which the HTTP clients use
//! as their DNS resolver, so a name that resolves to a public address at
//! validation and to a private one later (DNS rebinding) is still refused.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{Error, Result};

/// One `address/prefix-length` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = s.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (width - u32::from(prefix))
            }
        }
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), 32, self.prefix)
                    == masked(u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128, self.prefix)
                    == masked(u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

/// The setting that lets storages reach non-public addresses.
pub const STORAGES_SETTING: &str = "LABELSYNC_ALLOW_PRIVATE_ENDPOINTS";
/// The setting that lets webhooks reach non-public addresses.
pub const WEBHOOKS_SETTING: &str = "LABELSYNC_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS";
/// How long a name's lookup may take: past glibc's retry of a lost query
/// (5 s a try, two tries). The system resolver cannot be cancelled (its
/// thread runs on), but the request waiting for it is let go.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(12);

/// Which non-public addresses a deployment lets one kind of outgoing
/// connection reach, and the setting that says so: a refusal names it, so
/// an operator does not open the wrong kind (storages and webhooks have
/// settings of their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPolicy {
    rule: NetRule,
    setting: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NetRule {
    /// Public addresses only (the default).
    PublicOnly,
    /// Anything (tests, private deployments with trusted users).
    AllowAll,
    /// Public addresses plus these blocks.
    Allow(Vec<Cidr>),
}

impl Default for NetPolicy {
    /// Storages' public addresses only.
    fn default() -> Self {
        NetPolicy::public_only()
    }
}

impl NetPolicy {
    /// Storages may reach public addresses only.
    pub fn public_only() -> Self {
        NetPolicy {
            rule: NetRule::PublicOnly,
            setting: STORAGES_SETTING,
        }
    }

    /// Storages may reach anything (tests).
    pub fn allow_all() -> Self {
        NetPolicy {
            rule: NetRule::AllowAll,
            setting: STORAGES_SETTING,
        }
    }

    /// Parses `LABELSYNC_ALLOW_PRIVATE_ENDPOINTS` (storages).
    pub fn parse(value: Option<&str>) -> Result<Self> {
        NetPolicy::parse_setting(STORAGES_SETTING, value)
    }

    /// Parses the value of `setting`: true/false, or CIDR blocks.
    pub fn parse_setting(setting: &'static str, value: Option<&str>) -> Result<Self> {
        let policy = |rule| NetPolicy { rule, setting };
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(policy(NetRule::PublicOnly));
        };
        match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => return Ok(policy(NetRule::AllowAll)),
            "false" | "0" | "no" => return Ok(policy(NetRule::PublicOnly)),
            _ => {}
        }
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Cidr::parse(s).ok_or_else(|| {
                    Error::invalid(
                        "invalid_setting",
                        None,
                        format!("{setting}: {s:?} is not true/false or a CIDR like 10.0.0.0/8"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(|blocks| policy(NetRule::Allow(blocks)))
    }

    /// Whether every address is allowed (no lookup needed to check a name).
    pub fn allows_all(&self) -> bool {
        self.rule == NetRule::AllowAll
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        match &self.rule {
            NetRule::AllowAll => true,
            NetRule::PublicOnly => is_public(ip),
            NetRule::Allow(blocks) => is_public(ip) || blocks.iter().any(|b| b.contains(ip)),
        }
    }

    /// Refuses `ip` with a message naming the setting that would allow it.
    /// The message does not say which address a name resolved to: API
    /// users would learn the server's internal DNS answers from it.
    pub fn check_ip(&self, host: &str, ip: IpAddr, field: &'static str) -> Result<()> {
        if self.allows(ip) {
            return Ok(());
        }
        tracing::debug!(host, %ip, "endpoint refused by the SSRF guard");
        Err(self.refusal(host, field))
    }

    /// The refusal of `host`, the same whether it resolves to an address
    /// not allowed or does not resolve at all: two answers told an API user
    /// which names the server's internal DNS knows (`db.corp.internal`).
    fn refusal(&self, host: &str, field: &'static str) -> Error {
        Error::invalid(
            "endpoint_not_allowed",
            Some(field),
            format!(
                "{host} is (or resolves to) a private, loopback, link-local or metadata address, \
                 or does not resolve; it may not be reached unless the server sets {}",
                self.setting
            ),
        )
    }

    /// Checks a host name or literal address (of the request's `field`),
    /// resolving names. `port` only feeds the resolver.
    pub async fn check_host(&self, host: &str, port: u16, field: &'static str) -> Result<()> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.check_ip(host, ip, field);
        }
        if self.allows_all() {
            return Ok(());
        }
        // A name whose nameserver never answers would hold the request
        // for the resolver's whole retry sequence: a transient failure
        // (a run retries; the API answers 503), not a refusal: a slow
        // nameserver says nothing of the name.
        let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((bare, port)));
        let addrs = match lookup.await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => {
                tracing::debug!(host, error = %e, "endpoint name does not resolve");
                return Err(self.refusal(host, field));
            }
            Err(_) => {
                return Err(Error::Transient(format!(
                    "{host} did not resolve within {} s; try again later",
                    LOOKUP_TIMEOUT.as_secs()
                )));
            }
        };
        for addr in addrs {
            self.check_ip(host, addr.ip(), field)?;
        }
        Ok(())
    }

    /// Checks an endpoint URL given by a user: http(s), a host, no user
    /// name or password, and an allowed address. Returns the parsed URL.
    pub async fn check_url(&self, raw: &str, field: &'static str) -> Result<reqwest::Url> {
        let url = parse_endpoint(raw, field)?;
        // Credentials in the URL would be sent as a second Authorization
        // header by some clients, and echoed wherever the endpoint is shown.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::invalid(
                "invalid_config",
                Some(field),
                "the endpoint URL must not hold a user name or password: give credentials as secrets",
            ));
        }
        let host = url.host_str().unwrap_or_default().to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        self.check_host(&host, port, field).await?;
        Ok(url)
    }
}

/// Syntax check of an endpoint URL (no network): http or https with a host.
pub fn parse_endpoint(raw: &str, field: &'static str) -> Result<reqwest::Url> {
    let url = reqwest::Url::parse(raw).map_err(|e| {
        Error::invalid(
            "invalid_config",
            Some(field),
            format!("{raw:?} is not a URL: {e}"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid(
            "invalid_config",
            Some(field),
            format!("{raw:?} must be an http:// or https:// URL with a host"),
        ));
    }
    Ok(url)
}

/// IPv4-mapped and IPv4-compatible IPv6 (`::ffff:10.0.0.1`, `::10.0.0.1`)
/// are judged as the IPv4 they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Routable on the public internet: none of the special-purpose blocks an
/// attacker would aim a server-side request at.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local() // 169.254/16, cloud metadata
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF 192.0.0/24
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_ipv4(v6) {
                // A translator (NAT64) or relay (6to4) would deliver to this
                // IPv4 address: judge that one.
                return is_public(IpAddr::V4(v4));
            }
            let [first, second, ..] = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local, incl. fd00:ec2::254 metadata
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated, still routed by some stacks)
                // The rest of 64:ff9b::/32, incl. local-use NAT64 64:ff9b:1::/48
                // (RFC 8215), whose IPv4 position its operator chooses.
                || (first == 0x64 && second == 0xff9b))
        }
    }
}

/// The IPv4 address a NAT64 well-known-prefix address (`64:ff9b::/96`,
/// RFC 6052) or a 6to4 address (`2002:AABB:CCDD::/48`, RFC 3056) carries.
/// The local-use NAT64 prefix `64:ff9b:1::/48` puts it where its operator
/// chose, so it is refused whole by [`is_public`] instead.
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let octets = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        std::net::Ipv4Addr::new(a, b, c, d)
    };
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(octets(hi, lo)),
        [0x2002, hi, lo, ..] => Some(octets(hi, lo)),
        _ => None,
    }
}

/// A DNS resolver for the storage HTTP clients that drops addresses the
/// policy refuses, and fails when none is left: the guard at connect time.
/// A name's addresses are looked up once for every connection opened
/// within [`DNS_KEPT`] ([`DnsCache`]); the policy judges them at each use.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<NetPolicy>,
    cache: Arc<DnsCache>,
}

impl GuardedResolver {
    pub fn new(policy: NetPolicy) -> Self {
        GuardedResolver::keeping(policy, DNS_KEPT)
    }

    /// A resolver that keeps a name's addresses `kept` (tests).
    fn keeping(policy: NetPolicy, kept: Duration) -> Self {
        GuardedResolver {
            policy: Arc::new(policy),
            cache: Arc::new(DnsCache::new(kept)),
        }
    }

    /// Resolves `host` and keeps the allowed addresses.
    pub async fn resolve(&self, host: &str) -> std::io::Result<Vec<SocketAddr>> {
        let addrs = self.cache.addresses(host).await?;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|ip| self.policy.allows(*ip))
            .map(|ip| SocketAddr::new(ip, 0))
            .collect();
        if allowed.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{host} resolves only to private or metadata addresses; \
                     set {} to reach it",
                    self.policy.setting
                ),
            ));
        }
        Ok(allowed)
    }
}

/// How long a name's addresses serve new connections. Short, so a moved
/// endpoint is followed soon; long enough that the connections a worker
/// opens at once (a batch's reads: 64) share one lookup. Each lookup is a
/// blocking `getaddrinfo` on its own thread and, in a cluster, one or more
/// round trips to its DNS server (a name with few dots tries the search
/// domains first).
const DNS_KEPT: Duration = Duration::from_secs(10);

/// At most this many names are kept: endpoints are user input, so their
/// count is not bounded by the deployment. A name past it is looked up
/// for each connection, as without the cache.
const DNS_NAMES: usize = 1024;

/// The addresses names resolved to, each looked up once for all the
/// connections that ask within [`DNS_KEPT`] (those asking while it runs
/// wait for it). A failed lookup is every waiter's answer, then forgotten.
#[derive(Debug)]
struct DnsCache {
    names: Mutex<HashMap<String, Arc<Lookup>>>,
    kept: Duration,
    /// Lookups made, not answered from the cache (tests count them).
    lookups: AtomicU64,
}

/// A lookup's addresses, or its failure's kind and message (`io::Error` is
/// not `Clone`, and every waiter gets the answer).
type Answer = std::result::Result<Arc<[IpAddr]>, (std::io::ErrorKind, String)>;

/// One lookup of a name, shared by its waiters.
#[derive(Debug)]
struct Lookup {
    started: Instant,
    answer: tokio::sync::OnceCell<Answer>,
    /// Where the next connection starts in the addresses: successive ones
    /// take them in turn, as successive lookups of a name with several
    /// (an object store's) would have.
    turn: AtomicUsize,
}

impl DnsCache {
    fn new(kept: Duration) -> Self {
        DnsCache {
            names: Mutex::default(),
            kept,
            lookups: AtomicU64::new(0),
        }
    }

    /// `host`'s addresses, from the cache or one lookup; an IP literal is
    /// its own.
    async fn addresses(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let lookup = self.lookup_of(host);
        let answer = lookup.answer.get_or_init(|| self.look_up(host)).await;
        match answer {
            Ok(addrs) => Ok(in_turn(addrs, lookup.turn.fetch_add(1, Ordering::Relaxed))),
            Err((kind, message)) => {
                self.forget(host, &lookup);
                Err(std::io::Error::new(*kind, message.clone()))
            }
        }
    }

    /// The current lookup of `host`, or a new one (kept while there is
    /// room).
    fn lookup_of(&self, host: &str) -> Arc<Lookup> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lookup) = names.get(host).filter(|l| l.started.elapsed() < self.kept) {
            return lookup.clone();
        }
        if names.len() >= DNS_NAMES {
            names.retain(|_, l| l.started.elapsed() < self.kept);
        }
        let lookup = Arc::new(Lookup {
            started: Instant::now(),
            answer: tokio::sync::OnceCell::new(),
            turn: AtomicUsize::new(0),
        });
        if names.len() < DNS_NAMES || names.contains_key(host) {
            names.insert(host.to_owned(), lookup.clone());
        }
        lookup
    }

    async fn look_up(&self, host: &str) -> Answer {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, 0))).await {
            Ok(Ok(found)) => Ok(found.map(|a| a.ip()).collect()),
            Ok(Err(e)) => Err((e.kind(), e.to_string())),
            Err(_) => Err((
                std::io::ErrorKind::TimedOut,
                format!(
                    "{host} did not resolve within {} s",
                    LOOKUP_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// Drops `lookup` (a failed one) so the next connection looks again.
    fn forget(&self, host: &str, lookup: &Arc<Lookup>) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if names.get(host).is_some_and(|l| Arc::ptr_eq(l, lookup)) {
            names.remove(host);
        }
    }
}

/// `addrs` starting at the `turn`-th (modulo their count).
fn in_turn(addrs: &[IpAddr], turn: usize) -> Vec<IpAddr> {
    let start = turn % addrs.len().max(1);
    addrs[start..]
        .iter()
        .chain(&addrs[..start])
        .copied()
        .collect()
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addrs = GuardedResolver::resolve(&this, name.as_str()).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

impl aws_smithy_runtime_api::client::dns::ResolveDns for GuardedResolver {
    fn resolve_dns<'a>(
        &'a self,
        name: &'a str,
    ) -> aws_smithy_runtime_api::client::dns::DnsFuture<'a> {
        aws_smithy_runtime_api::client::dns::DnsFuture::new(async move {
            let addrs = GuardedResolver::resolve(self, name)
                .await
                .map_err(aws_smithy_runtime_api::client::dns::ResolveDnsError::new)?;
            Ok(addrs.into_iter().map(|a| a.ip()).collect())
        })
    }
}

impl redis::io::AsyncDNSResolver for GuardedResolver {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        host: &'b str,
        port: u16,
    ) -> redis::RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        Box::pin(async move {
            let addrs = GuardedResolver::resolve(self, host).await?;
            let with_port = addrs.into_iter().map(move |mut a| {
                a.set_port(port);
                a
            });
            Ok(Box::new(with_port) as Box<dyn Iterator<Item = SocketAddr> + Send>)
        })
    }
}

/// Makes aws-lc the process's TLS provider. Two providers are compiled in
/// (ring for sqlx, aws-lc for the cloud SDKs), and rustls refuses to pick one
/// for clients that ask for "the default" (the Redis client does).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means one is installed already, which is as good.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// A reqwest client for storage traffic: guarded DNS, a 10 s connect
/// timeout, and `read_timeout` as the longest wait for the next bytes of a
/// response (`LABELSYNC_STORAGE_TIMEOUT_SECS`), so a server that stops
/// answering fails the request instead of holding it open.
pub fn http_client(
    policy: &NetPolicy,
    read_timeout: std::time::Duration,
) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_config()?)
        .dns_resolver(Arc::new(GuardedResolver::new(policy.clone())))
        // A proxy from the environment (HTTPS_PROXY, ...) would resolve the
        // storage's host itself, past the guard.
        .no_proxy()
        .user_agent(concat!("labelsync/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(read_timeout)
        // A redirect could lead anywhere, including to a metadata address by
        // literal IP (which skips DNS); storage APIs do not redirect.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))
}

/// Clients kept by what they were made for (a handful of keys in a
/// process), made at the first ask and handed out as clones, which share
/// the client's pool of connections: see [`HttpClients`], and the S3
/// backend's `SdkClients`.
pub struct Kept<K, C>(Arc<std::sync::Mutex<Vec<(K, C)>>>);

impl<K, C> Clone for Kept<K, C> {
    fn clone(&self) -> Self {
        Kept(self.0.clone())
    }
}

impl<K, C> Default for Kept<K, C> {
    fn default() -> Self {
        Kept(Arc::default())
    }
}

impl<K, C> std::fmt::Debug for Kept<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let made = self.0.lock().map_or(0, |m| m.len());
        f.debug_struct("Kept").field("made", &made).finish()
    }
}

impl<K: PartialEq + Clone, C: Clone> Kept<K, C> {
    /// The client kept for `key`, else the one `make` makes (then kept).
    pub fn get_or_make<E>(
        &self,
        key: &K,
        make: impl FnOnce() -> std::result::Result<C, E>,
    ) -> std::result::Result<C, E> {
        // A poisoned list is only a cache: its clients are still whole.
        let mut made = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, client)) = made.iter().find(|(k, _)| k == key) {
            return Ok(client.clone());
        }
        let client = make()?;
        made.push((key.clone(), client.clone()));
        Ok(client)
    }
}

/// The [`http_client`]s of one process's storages, one per policy and read
/// timeout: clones share a client, and so its pool of connections.
/// Storages on one endpoint (every GCS bucket is on one host; S3 storages
/// of one bucket; a worker's backend opened again after a minute, see
/// `storage::opened`) reuse the connections, and their TCP and TLS
/// handshakes, that earlier requests opened. Nothing on a connection
/// belongs to one storage: each request carries its own credentials, and
/// a new connection passes the guard when it resolves its host. Kept by
/// the storages' settings (`storage::StorageEnv`), so a process (or a test)
/// with its own settings has its own clients.
pub type HttpClients = Kept<(NetPolicy, std::time::Duration), reqwest::Client>;

impl HttpClients {
    /// The client for `policy` and `read_timeout`, made at the first ask.
    pub fn get(
        &self,
        policy: &NetPolicy,
        read_timeout: std::time::Duration,
    ) -> Result<reqwest::Client> {
        self.get_or_make(&(policy.clone(), read_timeout), || {
            http_client(policy, read_timeout)
        })
    }
}

/// The TLS settings of every [`http_client`]: what reqwest builds by
/// default (the process's crypto provider, TLS 1.2 and 1.3, the platform's
/// verifier, HTTP/2 or 1.1 by ALPN). Left to reqwest, every client built
/// reads and parses each file of the system's CA directory: several
/// milliseconds of CPU per storage opened, paid by all of a fresh worker's
/// first batches at once, on the cores their reads need.
fn tls_config() -> Result<rustls::ClientConfig> {
    let mut config = tls_client_config()?;
    // As reqwest offers with its `http2` feature on (the workspace
    // enables it): servers that speak HTTP/2 (GCS) keep it.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS settings for storage traffic, with no ALPN: the process's crypto
/// provider, TLS 1.2 and 1.3 and the platform's verifier, made once per
/// process (the Redis backend speaks TLS with them as they are).
pub fn tls_client_config() -> Result<rustls::ClientConfig> {
    use rustls_platform_verifier::BuilderVerifierExt;
    static CONFIG: std::sync::LazyLock<std::result::Result<rustls::ClientConfig, String>> =
        std::sync::LazyLock::new(|| {
            let provider = rustls::crypto::CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
            Ok(rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(rustls::ALL_VERSIONS)
                .map_err(|e| e.to_string())?
                .with_platform_verifier()
                .map_err(|e| e.to_string())?
                .with_no_client_auth())
        });
    CONFIG
        .clone()
        .map_err(|e| Error::Internal(format!("cannot set up TLS for storage traffic: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl s_server` on a free loopback port with a fresh self-signed
    /// certificate for `localhost`; killed when dropped.
    struct UntrustedTls {
        server: std::process::Child,
        port: u16,
        /// Holds the certificate and key while the server runs.
        _files: tempfile::TempDir,
    }

    impl UntrustedTls {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            let made = std::process::Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args([
                    "-subj",
                    "/CN=localhost",
                    "-addext",
                    "subjectAltName=DNS:localhost",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .expect("openssl (apt install openssl)");
            assert!(made.status.success(), "{made:?}");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let server = std::process::Command::new("openssl")
                .args(["s_server", "-quiet", "-www", "-accept"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("-cert")
                .arg(&cert)
                .arg("-key")
                .arg(&key)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("openssl s_server");
            UntrustedTls {
                server,
                port,
                _files: dir,
            }
        }
    }

    impl Drop for UntrustedTls {
        fn drop(&mut self) {
            let _ = self.server.kill();
            let _ = self.server.wait();
        }
    }

    /// Storage clients share one TLS setup made once per process: it still
    /// verifies certificates, so a server whose certificate no root vouches
    /// for is refused during the handshake, by every client built.
    #[tokio::test]
    async fn storage_clients_refuse_an_untrusted_certificate() {
        let server = UntrustedTls::start();
        let url = format!("https://localhost:{}/", server.port);
        for _ in 0..2 {
            let client = http_client(&NetPolicy::allow_all(), std::time::Duration::from_secs(5))
                .expect("client");
            let mut last = None;
            // s_server takes a moment to listen.
            for _ in 0..50 {
                match client.get(&url).send().await {
                    Err(err) if err.is_connect() && !format!("{err:?}").contains("ertificate") => {
                        last = Some(err);
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    other => {
                        let err = other.expect_err("an untrusted certificate was accepted");
                        let chain = format!("{err:?}");
                        assert!(chain.contains("InvalidCertificate"), "{chain}");
                        last = None;
                        break;
                    }
                }
            }
            assert!(last.is_none(), "the TLS server never answered: {last:?}");
        }
    }

    #[tokio::test]
    async fn endpoints_hold_no_user_name_or_password() {
        let policy = NetPolicy::public_only();
        for raw in ["https://user:pass@8.8.8.8", "https://user@8.8.8.8"] {
            let err = policy
                .check_url(raw, "config.endpoint_url")
                .await
                .unwrap_err();
            assert!(err.to_string().contains("user name or password"), "{err}");
        }
        let fine = policy.check_url("https://8.8.8.8:9000/base", "config.endpoint_url");
        assert!(fine.await.is_ok());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_private_and_metadata_addresses() {
        let p = NetPolicy::public_only();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!p.allows(ip(bad)), "{bad} must be refused");
        }
        for good in ["8.8.8.8", "52.216.0.1", "2600:1f18::1"] {
            assert!(p.allows(ip(good)), "{good} must be allowed");
        }
    }

    /// IPv6 forms that reach a private IPv4 address through a translator or
    /// relay, and site-local addresses, are refused like the address itself.
    #[test]
    fn refuses_nat64_6to4_and_site_local_forms() {
        let p = NetPolicy::public_only();
        for bad in [
            "64:ff9b::7f00:1",        // NAT64 of 127.0.0.1
            "64:ff9b::a9fe:a9fe",     // NAT64 of 169.254.169.254
            "64:ff9b::10.0.0.1",      // NAT64 of 10.0.0.1, dotted form
            "64:ff9b::c0a8:101",      // NAT64 of 192.168.1.1
            "64:ff9b:1::808:808",     // local-use NAT64: refused whole
            "64:ff9b:1:ffff::1",      // local-use NAT64: refused whole
            "2002:7f00:1::",          // 6to4 of 127.0.0.1
            "2002:a9fe:a9fe::1",      // 6to4 of 169.254.169.254
            "2002:0a00:0001:1234::5", // 6to4 of 10.0.0.1
            "2002:6440:1::",          // 6to4 of 100.64.0.1 (CGNAT)
            "fec0::1",                // site-local
            "feff:ffff::1",           // site-local, top of the block
        ] {
            assert!(!p.allows(ip(bad)), "{bad} must be refused");
        }
        for good in [
            "64:ff9b::808:808", // NAT64 of 8.8.8.8
            "2002:808:808::1",  // 6to4 of 8.8.8.8
            "64:ff9a::7f00:1",  // not the NAT64 prefix
            "2003::1",          // not 6to4
        ] {
            assert!(p.allows(ip(good)), "{good} must be allowed");
        }
    }

    #[test]
    fn allowlist_and_parse() {
        let p = NetPolicy::parse(Some("10.1.0.0/16, 127.0.0.1")).unwrap();
        assert!(p.allows(ip("10.1.200.3")));
        assert!(p.allows(ip("127.0.0.1")));
        assert!(!p.allows(ip("10.2.0.1")));
        assert!(!p.allows(ip("169.254.169.254")));
        assert_eq!(
            NetPolicy::parse(Some("true")).unwrap(),
            NetPolicy::allow_all()
        );
        assert_eq!(NetPolicy::parse(None).unwrap(), NetPolicy::public_only());
        assert!(NetPolicy::parse(Some("10.0.0.0/99")).is_err());
        assert!(NetPolicy::parse(Some("everything")).is_err());
    }

    #[tokio::test]
    async fn checks_urls_and_names() {
        let p = NetPolicy::public_only();
        let err = p
            .check_url(
                "http://169.254.169.254/latest/meta-data",
                "config.endpoint_url",
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("LABELSYNC_ALLOW_PRIVATE_ENDPOINTS"),
            "{err}"
        );
        assert!(p.check_url("http://[::1]:9000", "f").await.is_err());
        assert!(p.check_url("ftp://example.com", "f").await.is_err());
        // A name is resolved before it is judged, and the message does not
        // tell what it resolved to.
        let err = p
            .check_host("localhost", 80, "f")
            .await
            .unwrap_err()
            .to_string();
        assert!(!err.contains("127.0.0.1") && !err.contains("::1"), "{err}");
        // A name that does not resolve is refused alike: it was
        // `endpoint_unreachable`, "cannot resolve", which told a caller
        // which internal names exist.
        let unknown = p
            .check_host("no-such-host.invalid", 80, "f")
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            unknown.replace("no-such-host.invalid", "localhost"),
            err,
            "{unknown}"
        );
        assert!(
            NetPolicy::allow_all()
                .check_url("http://127.0.0.1:9000", "f")
                .await
                .is_ok()
        );
        let resolver = GuardedResolver::new(NetPolicy::public_only());
        assert!(resolver.resolve("localhost").await.is_err());
    }

    /// The connections a batch opens at once share one lookup; the policy
    /// still judges the kept addresses at every use; an IP literal is never
    /// looked up; a name is looked up again once its addresses are old.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_name_is_looked_up_once_for_the_connections_opened_together() {
        let open = GuardedResolver::new(NetPolicy::allow_all());
        let together = (0..64).map(|_| open.resolve("localhost"));
        for addrs in futures::future::join_all(together).await {
            let addrs = addrs.expect("localhost resolves");
            assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        }
        assert_eq!(open.cache.lookups.load(Ordering::Relaxed), 1);
        open.resolve("127.0.0.1").await.expect("a literal");
        assert_eq!(open.cache.lookups.load(Ordering::Relaxed), 1);

        let guarded = GuardedResolver::new(NetPolicy::public_only());
        for _ in 0..3 {
            assert!(guarded.resolve("localhost").await.is_err());
        }
        assert_eq!(guarded.cache.lookups.load(Ordering::Relaxed), 1);

        let brief = GuardedResolver::keeping(NetPolicy::allow_all(), Duration::ZERO);
        for _ in 0..3 {
            brief
                .resolve("localhost")
                .await
                .expect("localhost resolves");
        }
        assert_eq!(brief.cache.lookups.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn successive_connections_take_a_names_addresses_in_turn() {
        let addrs: Vec<IpAddr> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(in_turn(&addrs, 0), addrs);
        assert_eq!(in_turn(&addrs, 4), [addrs[1], addrs[2], addrs[0]]);
        assert!(in_turn(&addrs[..0], 7).is_empty());
    }
}
