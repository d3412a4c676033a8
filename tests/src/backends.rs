//! The storage servers the backend tests talk to, and a fresh bucket on each.
//!
//! Endpoints come from the environment `tests/run.sh` (through
//! `tests/emulators.sh`) sets: moto and s3s-fs for S3, fake-gcs-server for
//! GCS, Azurite for Azure, the test Redis. A missing variable or a server that
//! does not answer fails the test with what to run; nothing is skipped. The
//! Databricks Files API has no emulator: [`DatabricksFake`] serves the four
//! calls in-process.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use labelsync::{
    security::net::NetPolicy,
    storage::{BackendKind, Secrets, Storage, StorageEnv},
};
use serde_json::{Value, json};

/// Azurite's published development account.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// An endpoint from the environment, or a failure saying how to get one.
pub fn endpoint(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: start the storage emulators with `bash tests/emulators.sh` (tests/run.sh does)")
    })
}

/// A bucket / container name nobody else uses (lowercase, DNS-safe).
pub fn bucket_name() -> String {
    format!("t{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Storage settings that let backends reach the emulators on 127.0.0.1.
pub fn test_env() -> StorageEnv {
    StorageEnv {
        net: NetPolicy::allow_all(),
        ..StorageEnv::default()
    }
}

/// Opens a backend the way a sync does.
pub async fn open(kind: BackendKind, config: Value, secrets: Value) -> Arc<dyn Storage> {
    let secrets = Secrets::new(secrets.as_object().cloned().unwrap_or_default());
    labelsync::storage::open_with(kind, &config, &secrets, &test_env())
        .await
        .unwrap_or_else(|e| panic!("open {kind}: {e}"))
}

/// A whole object's bytes.
pub async fn read_object(storage: &dyn Storage, key: &str) -> labelsync::Result<Vec<u8>> {
    let object = storage.get(key, None).await?;
    let chunks: Vec<Bytes> = futures::TryStreamExt::try_collect(object.body)
        .await
        .map_err(|e| labelsync::Error::Transient(e.to_string()))?;
    Ok(chunks.concat())
}

/// Creates an S3 bucket (moto takes any credentials; s3s-fs checks them).
pub async fn create_s3_bucket(endpoint: &str, key: &str, secret: &str, bucket: &str) {
    s3_client(endpoint, key, secret)
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!("create bucket {bucket} at {endpoint}: {e:?} (is the S3 emulator running?)")
        });
}

/// Writes `object` to an S3 bucket with the SDK alone, past the backend's
/// key checks: for keys a user's bucket may hold and labelsync refuses to
/// write (a NUL, say).
pub async fn put_s3_object(endpoint: &str, key: &str, secret: &str, bucket: &str, object: &str) {
    s3_client(endpoint, key, secret)
        .put_object()
        .bucket(bucket)
        .key(object)
        .body(bytes::Bytes::from_static(b"x").into())
        .send()
        .await
        .unwrap_or_else(|e| panic!("put {object:?} into {bucket} at {endpoint}: {e:?}"));
}

fn s3_client(endpoint: &str, key: &str, secret: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            key, secret, None, None, "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Creates a bucket on fake-gcs-server (it checks no auth).
pub async fn create_gcs_bucket(endpoint: &str, bucket: &str) {
    let resp = reqwest::Client::new()
        .post(format!("{endpoint}/storage/v1/b"))
        .json(&json!({ "name": bucket }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("fake-gcs-server at {endpoint}: {e}"));
    assert!(
        resp.status().is_success(),
        "create GCS bucket: {}",
        resp.status()
    );
}

/// Creates a container on Azurite with a SharedKey-signed request: the one
/// call object_store does not make.
pub async fn create_azure_container(account_url: &str, container: &str) {
    let url = reqwest::Url::parse(&format!("{account_url}/{container}?restype=container"))
        .expect("container URL");
    let put = AzuritePut::new(&url, 0, "", "\nrestype:container");
    let request = reqwest::Client::new()
        .put(url.clone())
        .header(header::CONTENT_LENGTH, "0");
    put.send(request, "create container").await;
}

/// Writes a blob named exactly `name` (UTF-8, any character a URL path can
/// carry once escaped) straight through Azurite's REST API, as another
/// tool would: not through the backend under test.
pub async fn put_azure_blob(account_url: &str, container: &str, name: &str, body: &[u8]) {
    let mut url = reqwest::Url::parse(&format!("{account_url}/{container}")).expect("URL");
    url.path_segments_mut()
        .expect("a base URL")
        .extend(name.split('/'));
    let put = AzuritePut::new(&url, body.len(), "x-ms-blob-type:BlockBlob\n", "");
    let request = reqwest::Client::new()
        .put(url.clone())
        .header("x-ms-blob-type", "BlockBlob")
        .body(body.to_vec());
    put.send(request, &format!("put {name:?}")).await;
}

/// A Shared Key signed PUT to Azurite: its date, version and signature.
struct AzuritePut {
    date: String,
    authorization: String,
}

const AZURITE_VERSION: &str = "2021-08-06";

impl AzuritePut {
    /// Signs a PUT of `length` bytes to `url`, with the `x-ms-` headers
    /// other than date and version (`headers`, each line ended) and the
    /// canonical query (`query`, each parameter after a newline).
    fn new(url: &reqwest::Url, length: usize, headers: &str, query: &str) -> Self {
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let length = if length == 0 {
            String::new()
        } else {
            length.to_string()
        };
        let string_to_sign = format!(
            "PUT\n\n\n{length}\n\n\n\n\n\n\n\n\n{headers}x-ms-date:{date}\nx-ms-version:{AZURITE_VERSION}\n/{AZURITE_ACCOUNT}{}{query}",
            url.path()
        );
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &STANDARD.decode(AZURITE_KEY).expect("key"),
        );
        let signature = STANDARD.encode(ring::hmac::sign(&key, string_to_sign.as_bytes()).as_ref());
        AzuritePut {
            date,
            authorization: format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
        }
    }

    /// Sends `request` with the signature's headers; panics unless it
    /// succeeded.
    async fn send(self, request: reqwest::RequestBuilder, what: &str) {
        let resp = request
            .header("x-ms-date", self.date)
            .header("x-ms-version", AZURITE_VERSION)
            .header(header::AUTHORIZATION, self.authorization)
            .send()
            .await
            .unwrap_or_else(|e| panic!("Azurite: {what}: {e}"));
        let status = resp.status();
        assert!(
            status.is_success(),
            "{what}: {status} {}",
            resp.text().await.unwrap_or_default()
        );
    }
}

/// The Databricks Files API, in memory: directories list with page tokens
/// (in reverse order, so the client's own sorting is exercised), files get
/// with Range, put, delete; every call needs the bearer token. A directory
/// named `forbidden` answers 403 to listings.
///
/// Any other path answers 200 with the path it was asked for (when the
/// token is right), as the workspace's other APIs would: a request that
/// escaped the Files API shows, and every request's path is logged
/// ([`DatabricksFake::requests`]).
#[derive(Clone)]
pub struct DatabricksFake {
    pub url: String,
    pub token: String,
    files: Arc<Mutex<BTreeMap<String, Bytes>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

#[derive(serde::Deserialize)]
struct DirQuery {
    page_size: Option<usize>,
    page_token: Option<String>,
}

impl DatabricksFake {
    pub async fn start() -> Self {
        let files = Arc::new(Mutex::new(BTreeMap::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let token = "dapi-test-token".to_owned();
        let state = (files.clone(), token.clone());
        let app = Router::new()
            .route("/api/2.0/fs/directories/{*path}", get(list_dir))
            .route(
                "/api/2.0/fs/files/{*path}",
                get(get_file).put(put_file).delete(delete_file),
            )
            .fallback(other_api)
            .with_state(state)
            .layer(axum::middleware::from_fn_with_state(
                requests.clone(),
                log_request,
            ));
        let listener = labelsync::http::listen(crate::LOOPBACK).expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        DatabricksFake {
            url,
            token,
            files,
            requests,
        }
    }

    /// The path of every request received so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }

    pub fn len(&self) -> usize {
        self.files.lock().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type FakeState = (Arc<Mutex<BTreeMap<String, Bytes>>>, String);

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error_code": code, "message": message })),
    )
        .into_response()
}

/// The bearer check of every fake call: `None` when the token is right,
/// else the 401 the real API answers.
fn refused(headers: &HeaderMap, token: &str) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    (given != Some(&format!("Bearer {token}"))).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Invalid access token.",
        )
    })
}

async fn log_request(
    State(requests): State<Arc<Mutex<Vec<String>>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    requests
        .lock()
        .expect("lock")
        .push(request.uri().path().to_owned());
    next.run(request).await
}

/// Another workspace API (SCIM `Me`, another volume's listing...): it
/// answers whoever holds the token.
async fn other_api(
    State((_, token)): State<FakeState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = refused(&headers, &token) {
        return resp;
    }
    axum::Json(json!({ "api": uri.path(), "userName": "admin@example.com" })).into_response()
}

async fn list_dir(
    State((files, token)): State<FakeState>,
    Path(path): Path<String>,
    Query(q): Query<DirQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = refused(&headers, &token) {
        return resp;
    }
    let dir = format!("/{}/", path.trim_end_matches('/'));
    // A directory of this name is one the token may not read.
    if dir.ends_with("/forbidden/") {
        return error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "User does not have READ VOLUME on this directory.",
        );
    }
    // A directory named `endless` has a next page, of new files, forever.
    if dir.ends_with("/endless/") {
        let start: usize = q.page_token.and_then(|t| t.parse().ok()).unwrap_or(0);
        let contents: Vec<Value> = (start..start + 1000)
            .map(|i| json!({ "path": format!("{dir}f{i}"), "name": format!("f{i}"), "is_directory": false, "file_size": 1 }))
            .collect();
        return axum::Json(
            json!({ "contents": contents, "next_page_token": (start + 1000).to_string() }),
        )
        .into_response();
    }
    // A directory named `hollow` has a next page, empty, forever.
    if dir.ends_with("/hollow/") {
        let next: u64 = q.page_token.and_then(|t| t.parse().ok()).unwrap_or(0) + 1;
        return axum::Json(json!({ "contents": [], "next_page_token": next.to_string() }))
            .into_response();
    }
    // A directory named `deep` holds a directory `a`, which holds one, ...
    if dir.contains("/deep/") {
        let sub = json!({ "path": format!("{dir}a/"), "name": "a", "is_directory": true });
        return axum::Json(json!({ "contents": [sub] })).into_response();
    }
    let files = files.lock().expect("lock");
    let mut entries: BTreeMap<String, Value> = BTreeMap::new();
    for (full, body) in files.range(dir.clone()..) {
        let Some(rest) = full.strip_prefix(&dir) else {
            break;
        };
        let entry = match rest.split_once('/') {
            Some((sub, _)) => {
                json!({ "path": format!("{dir}{sub}/"), "name": sub, "is_directory": true })
            }
            // A file named `understated-*` is listed as 1 byte: a server
            // whose listing and answers disagree.
            None => json!({
                "path": full, "name": rest, "is_directory": false,
                "file_size": if rest.starts_with("understated-") { 1 } else { body.len() },
                "last_modified": 1_700_000_000_000_i64,
            }),
        };
        entries.insert(entry["name"].as_str().unwrap_or_default().to_owned(), entry);
    }
    if entries.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("The directory {dir} does not exist."),
        );
    }
    let all: Vec<Value> = entries.into_values().rev().collect();
    let start: usize = q.page_token.and_then(|t| t.parse().ok()).unwrap_or(0);
    let size = q.page_size.unwrap_or(1000).clamp(1, 1000);
    let end = (start + size).min(all.len());
    let mut body = json!({ "contents": all[start..end] });
    if end < all.len() {
        body["next_page_token"] = json!(end.to_string());
    }
    axum::Json(body).into_response()
}

async fn get_file(
    State((files, token)): State<FakeState>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = refused(&headers, &token) {
        return resp;
    }
    let Some(body) = files
        .lock()
        .expect("lock")
        .get(&format!("/{path}"))
        .cloned()
    else {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The file does not exist.",
        );
    };
    let len = body.len() as u64;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(
            |(a, b)| match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
                (Some(a), Some(b)) => (a, b.min(len - 1)),
                (Some(a), None) => (a, len - 1),
                (None, Some(n)) => (len.saturating_sub(n), len - 1),
                (None, None) => (0, len - 1),
            },
        );
    // The listing's `last_modified` (1_700_000_000_000 ms), as an HTTP date.
    let modified = (header::LAST_MODIFIED, "Tue, 14 Nov 2023 22:13:20 GMT");
    match range {
        None => (
            [(header::CONTENT_TYPE, "application/octet-stream"), modified],
            body,
        )
            .into_response(),
        Some((a, b)) => (
            StatusCode::PARTIAL_CONTENT,
            [
                (
                    header::CONTENT_RANGE,
                    format!("bytes {a}-{b}/{len}").as_str(),
                ),
                modified,
            ],
            body.slice(a as usize..=b as usize),
        )
            .into_response(),
    }
}

async fn put_file(
    State((files, token)): State<FakeState>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(resp) = refused(&headers, &token) {
        return resp;
    }
    files.lock().expect("lock").insert(format!("/{path}"), body);
    StatusCode::NO_CONTENT.into_response()
}

async fn delete_file(
    State((files, token)): State<FakeState>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = refused(&headers, &token) {
        return resp;
    }
    match files.lock().expect("lock").remove(&format!("/{path}")) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The file does not exist.",
        ),
    }
}
