//! `GET /api/v1/resolve`: presigned redirects that fetch the right bytes and
//! expire (s3s-fs and Azurite check signatures and expiry), the Range-aware
//! proxy on a 20 MB object (S3 and local), `If-None-Match`, and the refusals
//! (traversal, other projects' buckets, local serving off).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use labelsync::storage::BackendKind;
use labelsync_tests::{
    AppOptions, TestApp,
    backends::{
        AZURITE_ACCOUNT, AZURITE_KEY, DatabricksFake, bucket_name, create_azure_container,
        create_gcs_bucket, create_s3_bucket, endpoint, open,
    },
    eventually, spawn_app,
};
use serde_json::{Value, json};

const SIZE: usize = 20 << 20;

fn options(local_serving: bool) -> AppOptions {
    let mut options = AppOptions::with_storages();
    options
        .env
        .push(("LOCAL_FILES_SERVING_ENABLED", local_serving.to_string()));
    options
}

fn s3s() -> (String, Value) {
    let key = std::env::var("TEST_S3S_ACCESS_KEY").unwrap_or_else(|_| "labelsync-test".into());
    let secret =
        std::env::var("TEST_S3S_SECRET_KEY").unwrap_or_else(|_| "labelsync-test-secret".into());
    (
        endpoint("TEST_S3S_ENDPOINT"),
        json!({ "access_key_id": key, "secret_access_key": secret }),
    )
}

async fn source(
    app: &TestApp,
    project: i64,
    backend: &str,
    config: Value,
    secrets: Value,
    presign: bool,
    ttl: i64,
) {
    let (status, body) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "source", "backend": backend, "config": config,
                "secrets": secrets, "presign": presign, "presign_ttl_seconds": ttl,
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn resolve(
    app: &TestApp,
    project: i64,
    uri: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let url = format!("{}/api/v1/resolve", app.base);
    let mut req = no_redirects()
        .get(url)
        .query(&[("project_id", project.to_string()), ("uri", uri.to_owned())]);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

fn pattern() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8).collect()
}

/// A bucket on s3s-fs (which checks signatures and expiry) and a source of
/// `project` on it: (bucket, config, secrets).
async fn an_s3s_bucket_and_source(
    app: &TestApp,
    project: i64,
    presign: bool,
    ttl: i64,
) -> (String, Value, Value) {
    let (bucket, config, s3_secrets) = an_s3s_bucket().await;
    source(
        app,
        project,
        "s3",
        config.clone(),
        s3_secrets.clone(),
        presign,
        ttl,
    )
    .await;
    (bucket, config, s3_secrets)
}

/// A new bucket on s3s-fs: (bucket, config, secrets).
async fn an_s3s_bucket() -> (String, Value, Value) {
    let (s3_url, s3_secrets) = s3s();
    let bucket = bucket_name();
    let (k, s) = (
        s3_secrets["access_key_id"].as_str().unwrap(),
        s3_secrets["secret_access_key"].as_str().unwrap(),
    );
    create_s3_bucket(&s3_url, k, s, &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": s3_url });
    (bucket, config, s3_secrets)
}

const CAT: &[u8] = b"the pixels of a cat";

/// Presigning sources of `project` with a 2 s TTL on s3s-fs, Azurite and
/// fake-gcs-server, each holding `img/cat.jpg`: the S3 and Azure URIs (which
/// redirect) and the GCS URI (no signer: proxied).
async fn presigning_sources_holding_a_cat(app: &TestApp, project: i64) -> ([String; 2], String) {
    let [s3, azure, gcs] = sources_holding_a_cat(app, project, true, 2).await;
    ([s3, azure], gcs)
}

/// Sources of `project` on s3s-fs, Azurite and fake-gcs-server (`presign`
/// with `ttl` seconds), each holding `img/cat.jpg`: their URIs.
async fn sources_holding_a_cat(
    app: &TestApp,
    project: i64,
    presign: bool,
    ttl: i64,
) -> [String; 3] {
    let (s3_bucket, s3_config, s3_secrets) =
        an_s3s_bucket_and_source(app, project, presign, ttl).await;
    let azure_url = endpoint("TEST_AZURITE_ENDPOINT");
    let container = bucket_name();
    create_azure_container(&azure_url, &container).await;
    let azure_config = json!({ "account_name": AZURITE_ACCOUNT, "container": container, "endpoint_url": azure_url });
    let azure_secrets = json!({ "account_key": AZURITE_KEY });
    source(
        app,
        project,
        "azure",
        azure_config.clone(),
        azure_secrets.clone(),
        presign,
        ttl,
    )
    .await;
    let gcs_url = endpoint("TEST_GCS_ENDPOINT");
    let gcs_bucket = bucket_name();
    create_gcs_bucket(&gcs_url, &gcs_bucket).await;
    let gcs_config = json!({ "bucket": gcs_bucket, "endpoint_url": gcs_url });
    source(
        app,
        project,
        "gcs",
        gcs_config.clone(),
        json!({}),
        presign,
        ttl,
    )
    .await;
    for (kind, config, secrets) in [
        (BackendKind::S3, &s3_config, &s3_secrets),
        (BackendKind::Azure, &azure_config, &azure_secrets),
        (BackendKind::Gcs, &gcs_config, &json!({})),
    ] {
        open(kind, config.clone(), secrets.clone())
            .await
            .put("img/cat.jpg", Bytes::from_static(CAT), Some("image/jpeg"))
            .await
            .unwrap();
    }
    [
        format!("s3://{s3_bucket}/img/cat.jpg"),
        format!("azure-blob://{container}/img/cat.jpg"),
        format!("gs://{gcs_bucket}/img/cat.jpg"),
    ]
}

/// `uri` resolves to an uncached redirect whose URL serves the bytes; returns
/// that URL.
async fn redirects_to_a_url_serving_the_bytes(
    app: &TestApp,
    project: i64,
    uri: &str,
    body: &Bytes,
) -> String {
    let resp = resolve(app, project, uri, &[]).await;
    assert_eq!(resp.status(), 303, "{uri}");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let fetched = reqwest::get(&location).await.unwrap();
    assert_eq!(fetched.status(), 200, "{uri}: {location}");
    assert_eq!(fetched.bytes().await.unwrap(), body, "{uri}");
    location
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_redirects_fetch_the_bytes_and_expire() {
    let app = spawn_app(options(false)).await;
    let project = app.project("media").await;
    let (signing, gcs_uri) = presigning_sources_holding_a_cat(&app, project).await;
    let body = Bytes::from_static(CAT);
    let mut signed = Vec::new();
    for uri in signing {
        let location = redirects_to_a_url_serving_the_bytes(&app, project, &uri, &body).await;
        signed.push((uri, location));
    }
    // fake-gcs-server storages have no signer (no key): proxied instead.
    let resp = resolve(&app, project, &gcs_uri, &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), body);

    // The TTL was 2 s: the signed URLs stop working.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (uri, location) in signed {
        let status = reqwest::get(&location).await.unwrap().status();
        assert!(
            status == 403 || status == 401,
            "{uri}: expired URL answered {status}"
        );
    }
    app.stop().await;
}

/// The 20 MB pattern as a local file under `media/` and as an object on an
/// s3s-fs source with presign off (proxied too): the pattern and the two
/// URIs.
async fn a_20_mb_object_on_local_and_s3(app: &TestApp, project: i64) -> (Vec<u8>, [String; 2]) {
    let data = pattern();
    let dir = app.doc_root.path().join("media");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("big.bin"), &data).unwrap();
    source(
        app,
        project,
        "local",
        json!({ "path": "media" }),
        json!({}),
        false,
        900,
    )
    .await;
    let (bucket, config, s3_secrets) = an_s3s_bucket_and_source(app, project, false, 900).await;
    open(BackendKind::S3, config, s3_secrets)
        .await
        .put("big.bin", Bytes::from(data.clone()), None)
        .await
        .unwrap();
    (
        data,
        [
            "/data/local-files/?d=media/big.bin".to_owned(),
            format!("s3://{bucket}/big.bin"),
        ],
    )
}

/// Ranges from the start, the middle and the end, and an open-ended one past
/// the maximum, each a 206 with its bytes.
async fn ranges_are_served_with_their_bytes(app: &TestApp, project: i64, uri: &str, data: &[u8]) {
    let max = 8 << 20;
    let total = SIZE as u64;
    let cases: [(&str, u64, u64); 4] = [
        ("bytes=0-99", 0, 99),
        ("bytes=10000000-10000099", 10_000_000, 10_000_099),
        ("bytes=-100", total - 100, total - 1),
        // Open-ended past the maximum: shortened, and said so.
        ("bytes=100-", 100, 100 + max - 1),
    ];
    for (range, start, end) in cases {
        let resp = resolve(app, project, uri, &[("range", range)]).await;
        assert_eq!(resp.status(), 206, "{uri} {range}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {start}-{end}/{total}").as_str(),
            "{uri} {range}"
        );
        assert_eq!(resp.headers()["accept-ranges"], "bytes");
        let got = resp.bytes().await.unwrap();
        assert_eq!(
            got.as_ref(),
            &data[start as usize..=end as usize],
            "{uri} {range}"
        );
    }
}

async fn a_range_past_the_end_is_416(app: &TestApp, project: i64, uri: &str) {
    let total = SIZE as u64;
    let resp = resolve(app, project, uri, &[("range", "bytes=30000000-")]).await;
    assert_eq!(resp.status(), 416, "{uri}");
    assert_eq!(
        resp.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some(format!("bytes */{total}").as_str()),
        "{uri}"
    );
}

/// A range from the last offset there is (`bytes=18446744073709551615-`)
/// is past the end of any object: 416 with the size on every backend, not
/// each storage's arithmetic (Azure's overflowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_from_the_last_offset_is_416_everywhere() {
    let app = spawn_app(options(false)).await;
    let project = app.project("far ranges").await;
    for uri in sources_holding_a_cat(&app, project, false, 60).await {
        let range = [("range", "bytes=18446744073709551615-")];
        let resp = resolve(&app, project, &uri, &range).await;
        assert_eq!(resp.status(), 416, "{uri}");
        let size = resp
            .headers()
            .get("content-range")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(size, Some(format!("bytes */{}", CAT.len())), "{uri}");
    }
    app.stop().await;
}

/// The whole object is served with an ETag, and `If-None-Match` with it gets
/// a 304.
async fn the_whole_object_is_served_and_cached_by_etag(
    app: &TestApp,
    project: i64,
    uri: &str,
    data: &[u8],
) {
    let whole = resolve(app, project, uri, &[]).await;
    assert_eq!(whole.status(), 200, "{uri}");
    let etag = whole.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(whole.headers()["content-length"], SIZE.to_string().as_str());
    assert_eq!(whole.bytes().await.unwrap().as_ref(), data, "{uri}");
    let cached = resolve(app, project, uri, &[("if-none-match", &etag)]).await;
    assert_eq!(cached.status(), 304, "{uri}");
    assert!(cached.bytes().await.unwrap().is_empty());
    // The weak comparison (a proxy that compressed it weakened the tag).
    let weak = format!("W/{etag}");
    let cached = resolve(app, project, uri, &[("if-none-match", &weak)]).await;
    assert_eq!(cached.status(), 304, "{uri} {weak}");
    a_range_is_served_while_its_if_range_holds(app, project, uri, &etag).await;
}

/// A `Range` with an `If-Range` is served only while the object's ETag is
/// the one given (a strong match); else the whole object, so a client
/// resuming a download does not splice two versions. It was ignored.
async fn a_range_is_served_while_its_if_range_holds(
    app: &TestApp,
    project: i64,
    uri: &str,
    etag: &str,
) {
    let weak = format!("W/{etag}");
    let (inside, outside) = ("bytes=0-99", "bytes=30000000-");
    let cases = [
        (inside, etag, 206),
        (inside, "\"stale\"", 200),
        (inside, weak.as_str(), 200),
        (inside, "Fri, 31 Dec 1999 23:59:59 GMT", 200),
        // A range outside the client's version is 416; outside another, whole.
        (outside, etag, 416),
        (outside, "\"stale\"", 200),
    ];
    for (range, if_range, status) in cases {
        let headers = [("range", range), ("if-range", if_range)];
        let resp = resolve(app, project, uri, &headers).await;
        assert_eq!(resp.status(), status, "{uri} {range} If-Range: {if_range}");
        if status == 416 {
            continue;
        }
        let length = if status == 206 { 100 } else { SIZE };
        assert_eq!(
            resp.headers()["content-length"],
            length.to_string().as_str(),
            "{uri} If-Range: {if_range}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_serves_ranges_of_a_20_mb_object() {
    let app = spawn_app(options(true)).await;
    let project = app.project("ranges").await;
    let (data, uris) = a_20_mb_object_on_local_and_s3(&app, project).await;
    for uri in uris {
        ranges_are_served_with_their_bytes(&app, project, &uri, &data).await;
        a_range_past_the_end_is_416(&app, project, &uri).await;
        the_whole_object_is_served_and_cached_by_etag(&app, project, &uri, &data).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_refuses_traversal_and_other_projects() {
    let app = spawn_app(options(true)).await;
    let mine = app.project("mine").await;
    let theirs = app.project("theirs").await;
    std::fs::create_dir_all(app.doc_root.path().join("media")).unwrap();
    std::fs::write(app.doc_root.path().join("media/a.jpg"), b"a").unwrap();
    std::fs::write(app.doc_root.path().join("secret.txt"), b"secret").unwrap();
    source(
        &app,
        mine,
        "local",
        json!({ "path": "media" }),
        json!({}),
        false,
        900,
    )
    .await;
    let (s3_url, s3_secrets) = s3s();
    source(
        &app,
        theirs,
        "s3",
        json!({ "bucket": "their-bucket", "endpoint_url": s3_url }),
        s3_secrets,
        false,
        900,
    )
    .await;

    assert_eq!(
        resolve(&app, mine, "/data/local-files/?d=media/a.jpg", &[])
            .await
            .status(),
        200
    );
    for (uri, status) in [
        ("/data/local-files/?d=media/../secret.txt", 400),
        ("/data/local-files/?d=media/%2e%2e/secret.txt", 400),
        ("/data/local-files/?d=/etc/passwd", 400),
        // Inside the root, but in no storage of the project.
        ("/data/local-files/?d=secret.txt", 404),
        ("/data/local-files/?d=media/missing.jpg", 404),
        ("s3://their-bucket/a.jpg", 404),
        ("http://169.254.169.254/latest/meta-data", 400),
    ] {
        let resp = resolve(&app, mine, uri, &[]).await;
        assert_eq!(resp.status(), status, "{uri}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"]["message"].is_string(), "{uri}: {body}");
    }
    // A symlink out of the root is not followed.
    std::os::unix::fs::symlink("/etc/passwd", app.doc_root.path().join("media/link.txt")).unwrap();
    assert_eq!(
        resolve(&app, mine, "/data/local-files/?d=media/link.txt", &[])
            .await
            .status(),
        404
    );
    app.stop().await;

    let off = spawn_app(options(false)).await;
    let project = off.project("off").await;
    std::fs::create_dir_all(off.doc_root.path().join("media")).unwrap();
    source(
        &off,
        project,
        "local",
        json!({ "path": "media" }),
        json!({}),
        false,
        900,
    )
    .await;
    let resp = resolve(&off, project, "/data/local-files/?d=media/a.jpg", &[]).await;
    assert_eq!(resp.status(), 403, "local serving is off by default");
    off.stop().await;
}

/// A 1 GiB object streams through the proxy without being held in memory
/// (the server runs in this test's process: its peak RSS is the bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_object_is_proxied_in_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let app = spawn_app(options(true)).await;
    let project = app.project("big").await;
    let dir = app.doc_root.path().join("media");
    std::fs::create_dir_all(&dir).unwrap();
    // Sparse: a GiB of zeros that takes no disk.
    std::fs::File::create(dir.join("huge.bin"))
        .unwrap()
        .set_len(GIB)
        .unwrap();
    local_media_source(&app, project).await;
    let mut resp = resolve(&app, project, "/data/local-files/?d=media/huge.bin", &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], GIB.to_string().as_str());
    let mut total = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len() as u64;
    }
    assert_eq!(total, GIB);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kb < 300 * 1024,
        "peak RSS {} MiB while proxying 1 GiB",
        peak_kb / 1024
    );
    app.stop().await;
}

/// GCS with a service-account key redirects to a V4 signed URL for the
/// storage's TTL (fake-gcs-server ignores signatures, so the signature itself
/// is verified in tests/storage.rs and expiry cannot be observed here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_with_a_key_redirects_to_a_signed_url() {
    let app = spawn_app(options(false)).await;
    let project = app.project("gcs").await;
    let url = endpoint("TEST_GCS_ENDPOINT");
    let bucket = bucket_name();
    create_gcs_bucket(&url, &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": url });
    open(BackendKind::Gcs, config.clone(), json!({}))
        .await
        .put("img/dog.jpg", Bytes::from_static(b"woof"), None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("key.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let key = json!({
        "type": "service_account", "project_id": "p", "private_key_id": "k1",
        "private_key": std::fs::read_to_string(&pem).unwrap(),
        "client_email": "labelsync@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",
    });
    source(
        &app,
        project,
        "gcs",
        config,
        json!({ "credentials_json": key.to_string() }),
        true,
        60,
    )
    .await;
    let resp = resolve(&app, project, &format!("gs://{bucket}/img/dog.jpg"), &[]).await;
    assert_eq!(resp.status(), 303);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains("X-Goog-Expires=60&"), "{location}");
    assert!(location.contains("X-Goog-Signature="), "{location}");
    assert_eq!(
        reqwest::get(&location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        b"woof"
    );
    app.stop().await;
}

/// A `dbx://` URI whose key leaves its volume (`..`, plain or
/// percent-encoded, `.`, an empty segment) is a 400 `invalid_key` and makes
/// no request at all: the storage's token reaches neither another workspace
/// API nor another volume (#14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databricks_keys_stay_in_their_volume() {
    let app = spawn_app(options(false)).await;
    let project = app.project("dbx").await;
    let fake = DatabricksFake::start().await;
    let config =
        |volume: &str| json!({ "host": fake.url, "catalog": "c", "schema": "s", "volume": volume });
    let secrets = json!({ "token": fake.token });
    for (volume, key, body) in [
        ("v", "a.jpg", "mine"),
        ("other_volume", "secret.csv", "theirs"),
    ] {
        open(BackendKind::Databricks, config(volume), secrets.clone())
            .await
            .put(key, Bytes::from(body), None)
            .await
            .unwrap();
    }
    source(
        &app,
        project,
        "databricks",
        config("v"),
        secrets,
        false,
        900,
    )
    .await;
    let resp = resolve(&app, project, "dbx://Volumes/c/s/v/a.jpg", &[]).await;
    assert_eq!(resp.status(), 200);
    // The etag the listing gives the file (its time and size), which a
    // browser's `If-None-Match` can name: a 304.
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{:x}-4\"", 1_700_000_000_000_i64));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"mine");
    let cached = [("if-none-match", etag.as_str())];
    let resp = resolve(&app, project, "dbx://Volumes/c/s/v/a.jpg", &cached).await;
    assert_eq!(resp.status(), 304);

    let before = fake.requests().len();
    for uri in [
        "dbx://Volumes/c/s/v/../../../../../../../../api/2.0/preview/scim/v2/Me",
        "dbx://Volumes/c/s/v/../../other_volume/secret.csv",
        "dbx://Volumes/c/s/v/../other_volume/secret.csv",
        "dbx://Volumes/c/s/v/%2e%2e/other_volume/secret.csv",
        "dbx://Volumes/c/s/v/.%2E/other_volume/secret.csv",
        "dbx://Volumes/c/s/v/a\\..\\..\\other_volume\\secret.csv",
        "dbx://Volumes/c/s/v/./a.jpg",
        "dbx://Volumes/c/s/v//a.jpg",
    ] {
        let resp = resolve(&app, project, uri, &[]).await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            (status.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_key")),
            "{uri}: {body}"
        );
    }
    let after = fake.requests();
    assert_eq!(
        after[before..],
        [] as [String; 0],
        "refused keys reached the workspace"
    );
    app.stop().await;
}

/// Local keys no file can have (a NUL, a path through a file, a name past
/// the file system's limit) answer 400 or 404, never 503; resolve serves
/// only what listing shows, so not a file reached through a directory
/// symlink, even one that stays inside the document root (#14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_resolve_agrees_with_listing_and_answers_bad_keys_with_4xx() {
    let app = spawn_app(options(true)).await;
    let project = app.project("local keys").await;
    let root = app.doc_root.path();
    std::fs::create_dir_all(root.join("media/real")).unwrap();
    std::fs::create_dir_all(root.join("elsewhere")).unwrap();
    std::fs::write(root.join("media/a.jpg"), b"a").unwrap();
    std::fs::write(root.join("media/real/b.jpg"), b"b").unwrap();
    std::fs::write(root.join("elsewhere/c.jpg"), b"c").unwrap();
    std::os::unix::fs::symlink(root.join("elsewhere"), root.join("media/linked")).unwrap();
    local_media_source(&app, project).await;

    let long = format!("/data/local-files/?d=media/{}.jpg", "x".repeat(300));
    for (uri, status) in [
        ("/data/local-files/?d=media/a.jpg", 200),
        ("/data/local-files/?d=media/real/b.jpg", 200),
        ("/data/local-files/?d=media/a%00.jpg", 400),
        ("/data/local-files/?d=media/a.jpg/x", 404),
        (long.as_str(), 400),
        ("/data/local-files/?d=media/linked/c.jpg", 404),
    ] {
        let resp = resolve(&app, project, uri, &[]).await;
        let got = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_eq!(got, status, "{uri}: {body}");
    }
    // A page in the bucket is served, but not as a page of this origin
    // (where the console's session cookie would let its script act).
    std::fs::write(
        root.join("media/page.html"),
        b"<script>fetch('/api/v1/tokens')</script>",
    )
    .unwrap();
    let resp = resolve(&app, project, "/data/local-files/?d=media/page.html", &[]).await;
    assert_eq!(resp.status(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        header("content-security-policy").as_deref(),
        Some("sandbox")
    );
    assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"));
    // An image stays plain media (a sandbox would only get in a viewer's way).
    let resp = resolve(&app, project, "/data/local-files/?d=media/a.jpg", &[]).await;
    assert!(resp.headers().get("content-security-policy").is_none());
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    app.stop().await;
}

/// A 416 says the object's size (`Content-Range: bytes */size`), and no
/// error message shows where the document root is on the server (#14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_ranges_say_the_size_and_messages_hide_the_document_root() {
    let app = spawn_app(options(true)).await;
    let project = app.project("416").await;
    let root = app.doc_root.path().to_owned();
    std::fs::create_dir_all(root.join("media")).unwrap();
    std::fs::write(root.join("media/a.jpg"), b"0123456789").unwrap();
    local_media_source(&app, project).await;
    for range in ["bytes=10-", "bytes=20-30", "bytes=-0"] {
        let resp = resolve(
            &app,
            project,
            "/data/local-files/?d=media/a.jpg",
            &[("range", range)],
        )
        .await;
        assert_eq!(resp.status(), 416, "{range}");
        assert_eq!(
            resp.headers()
                .get("content-range")
                .map(|v| v.to_str().unwrap().to_owned()),
            Some("bytes */10".to_owned()),
            "{range}"
        );
    }

    let shown = [
        root.display().to_string(),
        root.canonicalize().unwrap().display().to_string(),
    ];
    for path in [
        "../..".to_owned(),
        "missing".to_owned(),
        "media/a.jpg".to_owned(),
        root.join("missing").display().to_string(),
        root.join("media/../..").display().to_string(),
    ] {
        let (status, body) = app
            .post(
                "/api/v1/storages",
                json!({ "project_id": project, "role": "source", "backend": "local", "config": { "path": path } }),
            )
            .await;
        assert_eq!(status, 400, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        for root in &shown {
            assert!(!message.contains(root.as_str()), "{path}: {message}");
        }
    }
    app.stop().await;
}

/// A range answered without the object's size (`Content-Range: bytes
/// 0-3/*`, as some S3-compatible servers send it) is served whole, as a
/// 200: it went out as a 200 holding only the range's bytes, which a
/// client takes for the whole object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_answered_without_a_size_is_served_whole() {
    use labelsync_tests::fault_proxy::{FaultProxy, Mode};
    let app = spawn_app(options(false)).await;
    let project = app.project("sizes").await;
    let (bucket, config, secrets) = an_s3s_bucket().await;
    let s3_url = config["endpoint_url"].as_str().unwrap().to_owned();
    open(BackendKind::S3, config, secrets.clone())
        .await
        .put("cat.jpg", Bytes::from_static(CAT), None)
        .await
        .unwrap();
    let proxy = FaultProxy::start(&s3_url, Mode::UnknownTotals).await;
    let through = json!({ "bucket": bucket, "endpoint_url": proxy.url });
    source(&app, project, "s3", through, secrets, false, 900).await;
    let uri = format!("s3://{bucket}/cat.jpg");
    let resp = resolve(&app, project, &uri, &[("range", "bytes=0-3")]).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-range").is_none());
    assert_eq!(resp.bytes().await.unwrap().as_ref(), CAT);
    app.stop().await;
}

/// A local source on the document root's `media` folder (presign off, the
/// default TTL), the setup of the local resolve tests.
async fn local_media_source(app: &TestApp, project: i64) {
    source(
        app,
        project,
        "local",
        json!({ "path": "media" }),
        json!({}),
        false,
        900,
    )
    .await;
}

/// A cat under `dir/` of the document root, whose bytes name the directory.
fn local_cat(app: &TestApp, dir: &str) {
    std::fs::create_dir_all(app.doc_root.path().join(dir)).unwrap();
    std::fs::write(
        app.doc_root.path().join(dir).join("cat.jpg"),
        format!("the cat in {dir}"),
    )
    .unwrap();
}

/// The status of resolving `dir/cat.jpg`, and the body when it is 200.
async fn cat_in(app: &TestApp, project: i64, dir: &str) -> (u16, String) {
    let resp = resolve(
        app,
        project,
        &format!("/data/local-files/?d={dir}/cat.jpg"),
        &[],
    )
    .await;
    let status = resp.status().as_u16();
    let body = if status == 200 {
        resp.text().await.unwrap()
    } else {
        String::new()
    };
    (status, body)
}

/// Runs `sql` on the app's database directly: a change no API handler
/// makes, so nothing bumps the change counter.
async fn behind_the_counter(app: &TestApp, sql: &str) {
    let db = labelsync::db::connect(&app.database_url).await.unwrap();
    sea_orm::ConnectionTrait::execute_unprepared(&db, sql)
        .await
        .unwrap();
}

/// A server (with storages) whose resolve cache keeps entries `ttl_secs`,
/// a project with a local storage on `one/`, and a cat in `one/` and in
/// `two/`.
async fn a_cached_storage_in_one(ttl_secs: &str, title: &str) -> (TestApp, i64, Value) {
    let mut opts = options(true);
    opts.env
        .push(("LABELSYNC_RESOLVE_CACHE_SECS", ttl_secs.into()));
    let app = spawn_app(opts).await;
    let project = app.project(title).await;
    local_cat(&app, "one");
    local_cat(&app, "two");
    let storage = app
        .local_storage(project, json!({ "config": { "path": "one" } }))
        .await;
    (app, project, storage)
}

/// Points `storage` at `dir/` behind the change counter.
async fn repoint_behind_the_counter(app: &TestApp, storage: &Value, dir: &str) {
    let sql = format!(
        "UPDATE storages SET config = '{{\"path\": \"{dir}\"}}' WHERE id = {}",
        storage["id"]
    );
    behind_the_counter(app, &sql).await;
}

/// Polls until `dir/cat.jpg` resolves to `status` on `app`, for at most
/// `within`; how long it took.
async fn until_cat(
    app: &TestApp,
    project: i64,
    dir: &str,
    status: u16,
    within: Duration,
) -> Duration {
    let started = std::time::Instant::now();
    while cat_in(app, project, dir).await.0 != status {
        assert!(
            started.elapsed() < within,
            "{dir}/cat.jpg never answered {status} on {}",
            app.base
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// `/resolve` keeps a project's storages in memory (`LABELSYNC_RESOLVE_CACHE_SECS`):
/// a change through the API is seen at once by the replica that made it and
/// within about a second by another (the change counter); a change that
/// bypasses the counter is kept until the entry's age runs out; a deleted
/// project is a 404 everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_changes_reach_every_replicas_resolve_cache() {
    let (app, project, storage) = a_cached_storage_in_one("6", "cached").await;
    let replica = labelsync_tests::spawn_replica(&app).await;
    let path = format!("/api/v1/storages/{}", storage["id"]);
    for server in [&app, &replica] {
        assert_eq!(
            cat_in(server, project, "one").await,
            (200, "the cat in one".into())
        );
        assert_eq!(cat_in(server, project, "two").await.0, 404);
    }

    // Moved through the API of the first replica: seen there at once.
    let (status, body) = app
        .patch(&path, json!({ "config": { "path": "two" } }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cat_in(&app, project, "one").await.0, 404);
    assert_eq!(
        cat_in(&app, project, "two").await,
        (200, "the cat in two".into())
    );
    // ... and on the other within the counter's second (plus slack).
    let took = until_cat(&replica, project, "two", 200, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(4),
        "replica saw the change after {took:?}"
    );
    assert_eq!(cat_in(&replica, project, "one").await.0, 404);

    // A change that bypasses the counter shows the cache is used, and that
    // its entries expire. First the first replica's own follower sees the
    // counter its change moved (and drops the cache once more), then the
    // entry is read again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(cat_in(&app, project, "two").await.0, 200);
    repoint_behind_the_counter(&app, &storage, "one").await;
    assert_eq!(
        cat_in(&app, project, "one").await.0,
        404,
        "the cached storage still points at two/"
    );
    until_cat(&app, project, "one", 200, Duration::from_secs(8)).await;

    // The project deleted on one replica: gone on both.
    let (status, body) = replica.delete(&format!("/api/v1/projects/{project}")).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(cat_in(&replica, project, "one").await.0, 404);
    until_cat(&app, project, "one", 404, Duration::from_secs(5)).await;
    replica.stop().await;
    app.stop().await;
}

/// A replica that cannot read the change counter stops answering from
/// memory within a few seconds, instead of keeping its entries for their
/// whole age (here 60 s): a change it cannot hear of is still seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_follow_changes_reads_storages_again() {
    let (app, project, storage) = a_cached_storage_in_one("60", "unfollowed").await;
    // The follower's first read has happened, then the entry is read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cat_in(&app, project, "one").await.0, 200);

    behind_the_counter(
        &app,
        "UPDATE change_counters SET name = 'unreadable' WHERE name = 'storages'",
    )
    .await;
    repoint_behind_the_counter(&app, &storage, "two").await;
    until_cat(&app, project, "two", 200, Duration::from_secs(8)).await;
    assert_eq!(cat_in(&app, project, "one").await.0, 404);
    app.stop().await;
}

/// A stored type that is not one plain `type/subtype` is not passed on: a
/// browser takes the last type of a list, so `video/mp4, text/html` ran as
/// a page of this origin, where the passive `video/` it starts with had
/// kept the sandbox off. Such an object is served as its key's type, and
/// sandboxed unless that is passive media.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_content_types_is_not_passed_on() {
    let app = spawn_app(options(false)).await;
    let project = app.project("types").await;
    let (bucket, config, secrets) = an_s3s_bucket_and_source(&app, project, false, 900).await;
    let backend = open(BackendKind::S3, config, secrets).await;
    let page = Bytes::from_static(b"<script>fetch('/api/v1/tokens')</script>");
    for (key, stored, served) in [
        ("page", "video/mp4, text/html", "application/octet-stream"),
        ("clip.mp4", "video/mp4,text/html", "video/mp4"),
        ("ok.mp4", "video/mp4; codecs=avc1", "video/mp4; codecs=avc1"),
    ] {
        backend.put(key, page.clone(), Some(stored)).await.unwrap();
        let resp = resolve(&app, project, &format!("s3://{bucket}/{key}"), &[]).await;
        assert_eq!(resp.status(), 200, "{key}");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(header("content-type").as_deref(), Some(served), "{key}");
        let sandboxed = header("content-security-policy").as_deref() == Some("sandbox");
        assert_eq!(sandboxed, !served.starts_with("video/"), "{key}");
    }
    app.stop().await;
}

/// A response the client stops reading is cut after
/// `LABELSYNC_WRITE_TIMEOUT_SECS` and its connection closed, and at the
/// connection cap it makes room for a new one after 10 s: such a
/// connection counted as inside a request for ever, so a thousand of them
/// (any reader of a project with a proxied object) filled
/// `LABELSYNC_MAX_CONNECTIONS` and the server accepted no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_its_client_stops_reading_is_cut() {
    for (timeout, cap) in [("2", "1024"), ("300", "1")] {
        let mut options = options(true);
        options
            .env
            .push(("LABELSYNC_WRITE_TIMEOUT_SECS", timeout.into()));
        options.env.push(("LABELSYNC_MAX_CONNECTIONS", cap.into()));
        let mut app = spawn_app(options).await;
        if cap == "1" {
            // A connection a request per: at a cap of one, the server may
            // close an idle kept-alive connection to let another in just as
            // the client sends on it, and a POST is not sent again (CI saw
            // it once).
            app.client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("a client");
        }
        let project = app.project("stalled").await;
        let media = app.doc_root.path().join("media");
        std::fs::create_dir_all(&media).unwrap();
        let size = 64 << 20;
        std::fs::write(media.join("big.bin"), vec![7u8; size]).unwrap();
        local_media_source(&app, project).await;
        let mut stalled = a_stalled_download(&app, project).await;
        if cap == "1" {
            // The cap's one connection is held: a new request gets in
            // once the stalled one may make room.
            let started = std::time::Instant::now();
            let (status, _) = app.get("/api/v1/projects").await;
            assert_eq!(status, 200);
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{:?}",
                started.elapsed()
            );
        } else {
            // Reads nothing for longer than the write timeout.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncReadExt::read_to_end(&mut stalled, &mut got),
        )
        .await;
        assert!(read.is_ok(), "the connection is closed, not left open");
        assert!(got.len() < size, "cut: {} of {size} bytes came", got.len());
        assert!(got.starts_with(b"HTTP/1.1 200"), "it had begun");
        app.stop().await;
    }
}

/// A connection with a small receive window that asks for `media/big.bin`
/// and reads nothing.
async fn a_stalled_download(app: &TestApp, project: i64) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let uri = "%2Fdata%2Flocal-files%2F%3Fd%3Dmedia%2Fbig.bin";
    let head = format!(
        "GET /api/v1/resolve?project_id={project}&uri={uri} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The response has begun filling the socket.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream
}

/// One caller's proxied downloads take at most an eighth of the
/// connections the server takes (`too_many_downloads` past it): a storage
/// that trickles its bodies (one of the caller's own, pointed at a server
/// of theirs) held a connection per download for as long as it liked, and
/// one caller could fill the server's connection cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_proxied_downloads_take_an_eighth_of_the_connections() {
    let mut opts = options(false);
    opts.env.push(("LABELSYNC_MAX_CONNECTIONS", "16".into()));
    let app = spawn_app(opts).await;
    let project = app.project("trickles").await;
    let config = json!({ "bucket": "slow", "endpoint_url": trickling_server().await });
    let secrets = json!({ "access_key_id": "k", "secret_access_key": "s" });
    source(&app, project, "s3", config, secrets, false, 60).await;
    let uri = "s3://slow/photo.jpg";
    let first = resolve(&app, project, uri, &[]).await;
    let second = resolve(&app, project, uri, &[]).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = resolve(&app, project, uri, &[]).await;
    assert_eq!(third.status(), 429);
    // Asked to wait a moment (no Retry-After before): a place frees up as
    // soon as a body is sent.
    assert_eq!(
        third.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let refused: Value = third.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "too_many_downloads", "{refused}");
    drop(first);
    eventually("a download's place given back", || async {
        resolve(&app, project, uri, &[]).await.status() == 200
    })
    .await;
    drop(second);
    app.stop().await;
}

/// A server that answers every request with the headers of a 1 MB object
/// at once, then its bytes one every 200 ms: its address.
async fn trickling_server() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\netag: \"t\"\r\n\
                              content-type: image/jpeg\r\n\r\n";
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if conn.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}
