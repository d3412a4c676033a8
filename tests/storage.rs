//! The storage trait against every backend on real servers: one conformance
//! suite (pagination over several pages, prefix and non-recursive listing,
//! resume, range reads, put, delete, presign fetched and compared, write
//! check), then what `validate` says for bad credentials, a missing bucket and
//! an unreachable endpoint, then an import sync end to end through the API.
//!
//! Servers: s3s-fs (verifies SigV4: credentials and presigned URLs are really
//! checked) and moto (STS AssumeRole) for S3, fake-gcs-server for GCS,
//! Azurite for Azure, the test Redis, a temp directory for local, and the
//! in-process Files API fake for Databricks.
#![allow(clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use labelsync::{
    Error,
    storage::{BackendKind, Children, GetRange, ListOptions, Page, Role, Storage},
};
use labelsync_tests::{
    AppOptions,
    backends::{
        AZURITE_ACCOUNT, AZURITE_KEY, DatabricksFake, bucket_name, create_azure_container,
        create_gcs_bucket, create_s3_bucket, endpoint, open, put_azure_blob, put_s3_object,
    },
    eventually,
    fault_proxy::{FaultProxy, Mode},
    noise, spawn_app, spawn_ready_worker, write_parquet_with,
};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

const S3S_KEY: &str = "labelsync-test";
const S3S_SECRET: &str = "labelsync-test-secret";

fn s3s() -> (String, String, String) {
    let key = std::env::var("TEST_S3S_ACCESS_KEY").unwrap_or_else(|_| S3S_KEY.into());
    let secret = std::env::var("TEST_S3S_SECRET_KEY").unwrap_or_else(|_| S3S_SECRET.into());
    (endpoint("TEST_S3S_ENDPOINT"), key, secret)
}

/// A new bucket on s3s-fs: its storage config, secrets, and the storage.
async fn s3s_bucket() -> (Value, Value, Arc<dyn Storage>) {
    let (url, key, secret) = s3s();
    let bucket = bucket_name();
    create_s3_bucket(&url, &key, &secret, &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": url, "region": "us-east-1" });
    let secrets = json!({ "access_key_id": key, "secret_access_key": secret });
    let storage = open(BackendKind::S3, config.clone(), secrets.clone()).await;
    (config, secrets, storage)
}

/// A Parquet file of `rows` rows of 50 KB of incompressible text (about
/// 50 KB a row on disk), in row groups of 10.
fn noisy_parquet(rows: usize) -> Bytes {
    let files = tempfile::tempdir().expect("temporary directory");
    let path = files.path().join("file.parquet");
    write_parquet_with(&path, rows, 10, |i| noise(i as u64, 50_000));
    Bytes::from(std::fs::read(&path).expect("read"))
}

async fn keys(
    storage: &dyn Storage,
    prefix: &str,
    recursive: bool,
    after: Option<&str>,
) -> Vec<Page> {
    storage
        .list(ListOptions {
            prefix: prefix.into(),
            recursive,
            start_after: after.map(Into::into),
            page_size: 1000,
        })
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("list {prefix:?}: {e}"))
}

/// Every key under `prefix`, listed recursively in pages of `size`.
async fn in_pages_of(storage: &dyn Storage, prefix: &str, size: usize) -> Vec<Page> {
    storage
        .list(ListOptions {
            prefix: prefix.into(),
            recursive: true,
            start_after: None,
            page_size: size,
        })
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("list {prefix:?}: {e}"))
}

fn names(pages: &[Page]) -> Vec<String> {
    pages
        .iter()
        .flat_map(|p| p.objects.iter().map(|o| o.key.clone()))
        .collect()
}

async fn read(storage: &dyn Storage, key: &str, range: Option<GetRange>) -> (Vec<u8>, Option<u64>) {
    let object = storage
        .get(key, range)
        .await
        .unwrap_or_else(|e| panic!("get {key} {range:?}: {e}"));
    let size = object.size;
    let chunks: Vec<Bytes> = object.body.try_collect().await.unwrap();
    (chunks.concat(), size)
}

/// What a presign should give for this backend.
#[derive(PartialEq)]
enum Presign {
    /// A URL that serves the object's bytes.
    Url,
    /// `None`: the backend is proxied.
    Proxied,
}

/// The conformance suite every backend passes.
async fn conformance(storage: Arc<dyn Storage>, presign: Presign) {
    pages_of_2500_objects_list_every_key_once_in_order(storage.clone()).await;
    prefixes_and_recursion_choose_the_keys_listed(storage.clone()).await;
    range_reads_return_their_bytes(storage.clone()).await;
    overwrite_delete_and_delete_again(storage.clone()).await;
    presigned_urls_serve_the_bytes(storage.clone(), presign).await;
    the_write_check_removes_its_probe(storage.clone()).await;
    keys_never_leave_the_bucket(storage).await;
}

/// 2,500 objects, listed in pages of 1,000, each key once and in order, with
/// its size; and the listing resumes after a key.
async fn pages_of_2500_objects_list_every_key_once_in_order(storage: Arc<dyn Storage>) {
    let kind = storage.kind();
    let many: Vec<String> = (0..2500).map(|i| format!("many/{i:05}.txt")).collect();
    futures::stream::iter(many.clone())
        .map(|key| {
            let storage = storage.clone();
            async move {
                let body = Bytes::from(key.clone());
                storage.put(&key, body, Some("text/plain")).await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .unwrap_or_else(|e| panic!("{kind}: put: {e}"));
    let pages = keys(&*storage, "many/", true, None).await;
    let sizes: Vec<usize> = pages.iter().map(|p| p.objects.len()).collect();
    assert_eq!(sizes, [1000, 1000, 500], "{kind}: page sizes");
    assert_eq!(names(&pages), many, "{kind}: every key once, in order");
    for object in pages.iter().flat_map(|p| &p.objects) {
        assert_eq!(
            object.size,
            Some(object.key.len() as i64),
            "{kind}: size of {}",
            object.key
        );
    }
    // Resume after a key.
    let rest = names(&keys(&*storage, "many/", true, Some("many/01999.txt")).await);
    assert_eq!(rest, many[2000..], "{kind}: start_after");
}

/// Prefixes, recursion, unicode and spaces.
async fn prefixes_and_recursion_choose_the_keys_listed(storage: Arc<dyn Storage>) {
    let kind = storage.kind();
    for key in [
        "tree/a.json",
        "tree/sub/b.json",
        "tree/sp ace ü.txt",
        "tree-sibling.txt",
        "treetop.txt",
    ] {
        storage
            .put(key, Bytes::from_static(b"{}"), None)
            .await
            .unwrap();
    }
    assert_eq!(
        names(&keys(&*storage, "tree/", false, None).await),
        ["tree/a.json", "tree/sp ace ü.txt"],
        "{kind}: non-recursive"
    );
    assert_eq!(
        names(&keys(&*storage, "tree/", true, None).await),
        ["tree/a.json", "tree/sp ace ü.txt", "tree/sub/b.json"],
        "{kind}: recursive"
    );
    // A prefix without a trailing slash matches names, not just directories
    // (local and Databricks walk directories, so only the set is compared).
    let mut partial = names(&keys(&*storage, "tree", true, None).await);
    partial.sort();
    assert_eq!(
        partial,
        [
            "tree-sibling.txt",
            "tree/a.json",
            "tree/sp ace ü.txt",
            "tree/sub/b.json",
            "treetop.txt"
        ],
        "{kind}: prefix without a slash"
    );
    assert!(
        keys(&*storage, "nothing-here/", true, None)
            .await
            .iter()
            .all(|p| p.objects.is_empty())
    );
    a_key_as_the_prefix_lists_that_key_first(&*storage).await;
    one_level_of_the_tree(&*storage).await;
}

/// A key as the prefix lists that key, on the first page however small,
/// with names that share all of the key but its last character around it
/// (a retry run looks its objects up so, reading one page).
async fn a_key_as_the_prefix_lists_that_key_first(storage: &dyn Storage) {
    let kind = storage.kind();
    let key = "exact/ü a.json";
    for name in ["exact/ü a.jsoa", "exact/ü a.jsob", key, "exact/ü a.jsoz"] {
        let body = Bytes::from_static(b"{}");
        storage.put(name, body, None).await.expect("put");
    }
    for recursive in [false, true] {
        let mut pages = storage.list(ListOptions {
            prefix: key.into(),
            recursive,
            start_after: None,
            page_size: 1,
        });
        let first = pages.next().await.expect("a page").expect("listed");
        let first: Vec<&str> = first.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(
            first,
            [key],
            "{kind}: the first page (recursive: {recursive})"
        );
        let rest: Vec<Page> = pages.try_collect().await.expect("listed");
        assert_eq!(names(&rest), Vec::<String>::new(), "{kind}: the rest");
    }
}

/// `list_children` (partitioned listing's discovery): the S3, GCS and
/// Azure backends answer it, one level at a time, each level's objects exactly as
/// the non-recursive listing gives them (a flat run lists from them), and
/// whether the pages read hold the whole level, where an unfinished level
/// goes on (a later call reads on from there); the others say they cannot.
async fn one_level_of_the_tree(storage: &dyn Storage) {
    let kind = storage.kind();
    let tree = storage.list_children("tree/", None, 3).await.unwrap();
    if !matches!(
        kind,
        BackendKind::S3 | BackendKind::Gcs | BackendKind::Azure
    ) {
        assert_eq!(tree, None, "{kind}: cannot list by delimiter");
        return;
    }
    let flat = async |prefix: &str| {
        let pages = keys(storage, prefix, false, None).await;
        pages
            .into_iter()
            .flat_map(|p| p.objects)
            .collect::<Vec<_>>()
    };
    // A whole level (or the whole rest of one): nothing to go on from.
    let level = |prefixes: &[&str], objects| {
        Some(Children {
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            objects,
            next: None,
        })
    };
    assert_eq!(
        tree,
        level(&["tree/sub/"], flat("tree/").await),
        "{kind}: tree/"
    );
    assert_eq!(
        storage.list_children("tree/sub/", None, 3).await.unwrap(),
        level(&[], flat("tree/sub/").await),
        "{kind}: tree/sub/"
    );
    assert_eq!(
        storage
            .list_children("nothing-here/", None, 3)
            .await
            .unwrap(),
        level(&[], Vec::new()),
        "{kind}: nothing-here/"
    );
    // 2,500 keys directly under many/: three pages of 1,000 hold them all,
    // two only the first 2,000.
    let many = flat("many/").await;
    assert_eq!(many.len(), 2500, "{kind}: many/");
    assert_eq!(
        storage.list_children("many/", None, 3).await.unwrap(),
        level(&[], many.clone()),
        "{kind}: many/ in 3 pages"
    );
    let mut two = storage
        .list_children("many/", None, 2)
        .await
        .unwrap()
        .expect("many/");
    // Not the whole level: it says where it goes on.
    let next = two.next.take().expect("where many/ goes on");
    assert_eq!(
        Some(two),
        level(&[], many[..2000].to_vec()),
        "{kind}: many/ in 2 pages"
    );
    assert_eq!(
        storage
            .list_children("many/", Some(&next), 3)
            .await
            .unwrap(),
        level(&[], many[2000..].to_vec()),
        "{kind}: the rest of many/"
    );
    // The bucket's root: the conformance keys so far sit under many/ and
    // tree/, and tree-sibling.txt and treetop.txt directly.
    let root = storage
        .list_children("", None, 3)
        .await
        .unwrap()
        .expect("root");
    assert_eq!(root.objects, flat("").await, "{kind}: keys at the root");
    assert!(!root.objects.is_empty(), "{kind}: keys at the root");
    for prefix in ["many/", "tree/"] {
        assert!(
            root.prefixes.iter().any(|p| p == prefix),
            "{kind}: {prefix} in {:?}",
            root.prefixes
        );
    }
}

/// Range reads of `range.bin` (bytes 0 to 255), whole and in parts, and a
/// read of a unicode key.
async fn range_reads_return_their_bytes(storage: Arc<dyn Storage>) {
    let kind = storage.kind();
    let bytes: Vec<u8> = (0..=255).collect();
    storage
        .put(
            "range.bin",
            Bytes::from(bytes.clone()),
            Some("application/octet-stream"),
        )
        .await
        .unwrap();
    let (all, size) = read(&*storage, "range.bin", None).await;
    assert_eq!(
        (all, size),
        (bytes.clone(), Some(256)),
        "{kind}: whole object"
    );
    let (part, size) = read(
        &*storage,
        "range.bin",
        Some(GetRange::Bounded { start: 10, end: 19 }),
    )
    .await;
    assert_eq!(part, bytes[10..=19], "{kind}: bytes=10-19");
    assert_eq!(size, Some(256), "{kind}: a range read knows the whole size");
    assert_eq!(
        read(&*storage, "range.bin", Some(GetRange::From(250)))
            .await
            .0,
        bytes[250..],
        "{kind}: bytes=250-"
    );
    assert_eq!(
        read(&*storage, "range.bin", Some(GetRange::Suffix(3)))
            .await
            .0,
        bytes[253..],
        "{kind}: bytes=-3"
    );
    let (text, _) = read(&*storage, "tree/sp ace ü.txt", None).await;
    assert_eq!(text, b"{}", "{kind}: unicode key");
}

/// Overwrite, delete, delete again (`treetop.txt`, written by
/// [`prefixes_and_recursion_choose_the_keys_listed`]).
async fn overwrite_delete_and_delete_again(storage: Arc<dyn Storage>) {
    let kind = storage.kind();
    storage
        .put("treetop.txt", Bytes::from_static(b"v2"), None)
        .await
        .unwrap();
    assert_eq!(
        read(&*storage, "treetop.txt", None).await.0,
        b"v2",
        "{kind}: overwrite"
    );
    storage.delete("treetop.txt").await.unwrap();
    match storage.get("treetop.txt", None).await {
        Err(Error::NotFound(_)) => {}
        other => panic!("{kind}: get after delete: {other:?}"),
    }
    storage
        .delete("treetop.txt")
        .await
        .unwrap_or_else(|e| panic!("{kind}: deleting a missing object: {e}"));
    assert!(
        names(&keys(&*storage, "treetop", true, None).await).is_empty(),
        "{kind}: deleted"
    );
}

/// Presign: fetch the URL of `range.bin` and compare bytes.
async fn presigned_urls_serve_the_bytes(storage: Arc<dyn Storage>, presign: Presign) {
    let kind = storage.kind();
    let bytes: Vec<u8> = (0..=255).collect();
    let url = storage
        .presign("range.bin", Duration::from_secs(300))
        .await
        .unwrap();
    match (presign, url) {
        (Presign::Url, Some(url)) => {
            let resp = reqwest::get(&url).await.unwrap();
            assert_eq!(resp.status(), 200, "{kind}: presigned GET {url}");
            assert_eq!(
                resp.bytes().await.unwrap().as_ref(),
                bytes.as_slice(),
                "{kind}: presigned bytes"
            );
        }
        (Presign::Proxied, None) => {}
        (_, url) => panic!("{kind}: unexpected presign result {url:?}"),
    }
}

/// The write check a target's validate runs.
async fn the_write_check_removes_its_probe(storage: Arc<dyn Storage>) {
    let kind = storage.kind();
    storage
        .check(Role::Target, "checks/")
        .await
        .unwrap_or_else(|e| panic!("{kind}: check: {e}"));
    storage.check(Role::Source, "many/").await.unwrap();
    assert!(
        keys(&*storage, "checks/", true, None)
            .await
            .iter()
            .all(|p| p.objects.is_empty()),
        "{kind}: probe removed"
    );
}

/// Keys never leave the bucket, container or volume: `..` and `.`
/// segments (plain or percent-encoded) and NULs are refused before any
/// request (#14); for path-shaped backends (Azure, whose service takes a
/// `\` for a `/`, local, Databricks) between `\` separators too.
async fn keys_never_leave_the_bucket(storage: Arc<dyn Storage>) {
    let kind = storage.kind();
    let path_shaped = matches!(
        kind,
        BackendKind::Azure | BackendKind::Local | BackendKind::Databricks
    );
    let backslashed = ["tree\\..\\..\\outside.txt", "tree/..\\outside.txt"];
    let bad = [
        "../outside.txt",
        "tree/../../outside.txt",
        "tree/%2e%2e/%2E%2E/outside.txt",
        "./tree/a.json",
        "tree/a\0.json",
    ];
    let backslashed = backslashed.iter().filter(|_| path_shaped);
    for key in bad.iter().chain(backslashed) {
        let results = [
            storage.get(key, None).await.map(|_| ()),
            storage.put(key, Bytes::from_static(b"x"), None).await,
            storage.delete(key).await,
        ];
        for result in results {
            assert!(
                matches!(
                    result,
                    Err(Error::Invalid {
                        code: "invalid_key",
                        ..
                    })
                ),
                "{kind}: {key:?}: {result:?}"
            );
        }
    }
}

/// The `validate` code of a failed check.
async fn check_code(storage: Arc<dyn Storage>, role: Role) -> String {
    match storage.check(role, "").await {
        Err(Error::Invalid { code, message, .. }) => {
            assert!(!message.is_empty());
            eprintln!("{}: {code}: {message}", storage.kind());
            code.to_owned()
        }
        other => panic!(
            "{}: expected a validate error, got {other:?}",
            storage.kind()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_conformance_on_s3s_fs() {
    let (url, key, secret) = s3s();
    let bucket = bucket_name();
    create_s3_bucket(&url, &key, &secret, &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": url, "region": "us-east-1" });
    let secrets = json!({ "access_key_id": key, "secret_access_key": secret });
    let storage = open(BackendKind::S3, config.clone(), secrets.clone()).await;
    conformance(storage.clone(), Presign::Url).await;
    let wrong = json!({ "access_key_id": key, "secret_access_key": "not-the-secret" });
    signed_gets_pass_a_signature_check(
        &*storage,
        &*open(BackendKind::S3, config.clone(), wrong.clone()).await,
    )
    .await;
    signed_listings_pass_a_signature_check(
        &*storage,
        &*open(BackendKind::S3, config.clone(), wrong).await,
    )
    .await;
    // An endpoint spelled in capitals: URL parsing lowercases the host, and
    // the signed GETs sign the host they send.
    let capitals = json!({
        "bucket": bucket, "region": "us-east-1",
        "endpoint_url": url.replace("127.0.0.1", "LOCALHOST"),
    });
    let shouted = open(BackendKind::S3, capitals, secrets.clone()).await;
    for _ in 0..2 {
        assert_eq!(read(&*shouted, "range.bin", None).await.0.len(), 256);
    }

    // s3s-fs checks signatures: a tampered presigned URL is refused.
    let signed = storage
        .presign("range.bin", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let tampered = signed.replace("range.bin", "many/00000.txt");
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);

    // What validate says.
    let wrong = json!({ "access_key_id": key, "secret_access_key": "not-the-secret" });
    assert_eq!(
        check_code(
            open(BackendKind::S3, config.clone(), wrong).await,
            Role::Source
        )
        .await,
        "bad_credentials"
    );
    let missing = json!({ "bucket": bucket_name(), "endpoint_url": url });
    assert_eq!(
        check_code(
            open(BackendKind::S3, missing, secrets.clone()).await,
            Role::Source
        )
        .await,
        "bucket_not_found"
    );
    let nowhere = json!({ "bucket": bucket, "endpoint_url": "http://127.0.0.1:9" });
    assert_eq!(
        check_code(open(BackendKind::S3, nowhere, secrets).await, Role::Source).await,
        "endpoint_unreachable"
    );
}

/// The S3 backend's own signed GETs (after its first object request; see
/// `storage/s3/signed_get.rs`) on a server that checks signatures: a key
/// with every kind of character S3 escapes, a missing key, and a storage
/// with the wrong secret (`wrong`), whose first GET goes through the SDK
/// and the next ones not.
async fn signed_gets_pass_a_signature_check(storage: &dyn Storage, wrong: &dyn Storage) {
    let odd = "odd/a+b=c&d?e#f %25 ~!$'()*,;:@[]{}^`|\\ü€/x.json";
    storage
        .put(odd, Bytes::from_static(b"odd"), None)
        .await
        .unwrap();
    assert_eq!(read(storage, odd, None).await.0, b"odd");
    assert_eq!(
        read(storage, odd, Some(GetRange::Bounded { start: 1, end: 2 }))
            .await
            .0,
        b"dd"
    );
    match storage.get("odd/missing.json", None).await {
        Err(Error::NotFound(msg)) => assert!(msg.contains("NoSuchKey"), "{msg}"),
        other => panic!("a missing key: {:?}", other.map(|o| o.size)),
    }
    match storage.get(odd, Some(GetRange::From(100))).await {
        Err(Error::Invalid { code, .. }) => assert_eq!(code, "range_not_satisfiable"),
        other => panic!("a range past the end: {:?}", other.map(|o| o.size)),
    }
    for attempt in ["through the SDK", "signed by the backend"] {
        match wrong.get(odd, None).await {
            Err(Error::Unauthenticated(msg)) => {
                assert!(msg.contains("SignatureDoesNotMatch"), "{attempt}: {msg}")
            }
            other => panic!("{attempt}: {:?}", other.map(|o| o.size)),
        }
    }
}

/// The S3 backend's own listing pages (signed like its GETs once it knows
/// the bucket's endpoint; see `storage/s3/signed_get.rs`) on a server that
/// checks signatures: keys, a prefix, continuation tokens and a resumed
/// listing with the characters S3 escapes in a query or in XML, one key a
/// page; one level of the tree; and a storage with the wrong secret, whose
/// first page goes through the SDK and the next ones not.
async fn signed_listings_pass_a_signature_check(storage: &dyn Storage, wrong: &dyn Storage) {
    let mut odd = vec![
        "list odd/a+b=c&d?e#f %25 ~!$'()*,;:@[]{}^`|\\ü€.json",
        "list odd/<tag> & \"quoted\" 'single'.json",
        "list odd/sub dir/x.json",
        "list odd/ü/€.json",
    ];
    for key in &odd {
        let body = Bytes::from_static(b"x");
        storage.put(key, body, None).await.unwrap();
    }
    odd.sort_unstable();
    let one_a_page = async |recursive: bool, after: Option<&str>| -> Result<Vec<Page>, Error> {
        let pages = storage.list(ListOptions {
            prefix: "list odd/".into(),
            recursive,
            start_after: after.map(Into::into),
            page_size: 1,
        });
        pages.try_collect().await
    };
    let pages = one_a_page(true, None).await.unwrap();
    assert_eq!(pages.len(), 4);
    assert_eq!(names(&pages), odd);
    let rest = one_a_page(true, Some(odd[1])).await.unwrap();
    assert_eq!(names(&rest), odd[2..]);
    let level = one_a_page(false, None).await.unwrap();
    assert_eq!(names(&level), odd[..2]);
    let children = storage.list_children("list odd/", None, 3).await.unwrap();
    let children = children.expect("S3 lists one level");
    assert_eq!(children.prefixes, ["list odd/sub dir/", "list odd/ü/"]);
    assert_eq!(children.objects.len(), 2);
    for attempt in ["through the SDK", "signed by the backend"] {
        let options = ListOptions {
            prefix: "list odd/".into(),
            recursive: true,
            start_after: None,
            page_size: 1,
        };
        match wrong.list(options).try_collect::<Vec<Page>>().await {
            Err(Error::Unauthenticated(msg)) => {
                assert!(msg.contains("SignatureDoesNotMatch"), "{attempt}: {msg}")
            }
            other => panic!("{attempt}: {:?}", other.map(|p| p.len())),
        }
    }
}

/// A listing's first page goes through the SDK, which resolves the
/// bucket's endpoint; every page after it, in that listing and the next
/// ones, is signed and read by the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_after_the_first_are_signed_by_the_backend() {
    use std::sync::atomic::Ordering::Relaxed;

    use labelsync_tests::synthetic_s3::{Latency, SyntheticS3};
    let server = SyntheticS3::start(Latency::default()).await;
    let keys: Vec<String> = (0..5).map(|i| format!("k/{i}")).collect();
    server.fill(
        "bench",
        keys.iter().map(|k| (k.clone(), Bytes::from_static(b"x"))),
    );
    let config =
        json!({ "bucket": "bench", "endpoint_url": server.endpoint, "region": "us-east-1" });
    let secrets = json!({ "access_key_id": "k", "secret_access_key": "s" });
    let storage = open(BackendKind::S3, config, secrets).await;
    for listing in 1..=2 {
        let pages = in_pages_of(&*storage, "k/", 2).await;
        assert_eq!(names(&pages), keys);
        assert_eq!(server.counts.list.load(Relaxed), 3 * listing);
        assert_eq!(server.counts.sdk_list.load(Relaxed), 1, "listing {listing}");
    }
}

/// Storages opened with one process's settings share their HTTP clients,
/// and so their connections: a second S3 storage on the same endpoint (or
/// the same storage opened again) sends its SDK GET (which resolves the
/// endpoint) and its signed GETs on the connections the first one opened;
/// a storage opened with other settings opens its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storages_opened_with_the_same_settings_share_their_connections() {
    use std::sync::atomic::Ordering::Relaxed;

    use labelsync_tests::synthetic_s3::{Latency, SyntheticS3};
    let server = SyntheticS3::start(Latency::default()).await;
    server.fill(
        "bench",
        (0..8).map(|i| (format!("k/{i}"), Bytes::from_static(b"x"))),
    );
    let config =
        json!({ "bucket": "bench", "endpoint_url": server.endpoint, "region": "us-east-1" });
    let secrets = labelsync::storage::Secrets::new(
        json!({ "access_key_id": "k", "secret_access_key": "s" })
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    let env = labelsync_tests::backends::test_env();
    let connections = || server.counts.connections.load(Relaxed);
    // Each storage's first GET goes through the SDK, the next ones are signed.
    let read_all = async |env: &labelsync::storage::StorageEnv, keys: std::ops::Range<usize>| {
        let storage = labelsync::storage::open_with(BackendKind::S3, &config, &secrets, env)
            .await
            .expect("open");
        for i in keys {
            assert_eq!(read(&*storage, &format!("k/{i}"), None).await.0, b"x");
            // A connection goes back to its pool a moment after its answer
            // is read; a GET sent sooner, on a loaded machine, opens another.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    read_all(&env, 0..4).await;
    let first = connections();
    assert_eq!(first, 2, "the SDK's connection and the signed GETs' one");
    read_all(&env, 4..8).await;
    assert_eq!(connections(), first, "the second storage connected");
    let other = labelsync_tests::backends::test_env();
    read_all(&other, 0..4).await;
    assert_eq!(
        connections() - first,
        2,
        "other settings, other connections"
    );
    assert_eq!(server.counts.sdk_get.load(Relaxed), 3);
}

/// The synthetic S3 server the latency benchmarks use answers like S3 as
/// far as the S3 backend can tell (the same conformance checks as the
/// emulators), and its injected round trip is paid once per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synthetic_benchmark_server_passes_the_s3_conformance_checks() {
    use labelsync_tests::synthetic_s3::{Latency, SyntheticS3};
    let server = SyntheticS3::start(Latency::default()).await;
    server.fill("bench", []);
    let config =
        json!({ "bucket": "bench", "endpoint_url": server.endpoint, "region": "us-east-1" });
    let secrets = json!({ "access_key_id": "k", "secret_access_key": "s" });
    conformance(
        open(BackendKind::S3, config, secrets.clone()).await,
        Presign::Url,
    )
    .await;
    // The conformance checks put before they get: no GET went through the SDK.
    let c = &server.counts;
    let gets = c.get.load(std::sync::atomic::Ordering::Relaxed);
    assert!(gets >= 5, "{gets} GETs");
    assert_eq!(c.sdk_get.load(std::sync::atomic::Ordering::Relaxed), 0);

    let rtt = Duration::from_millis(50);
    let slow = SyntheticS3::start(Latency {
        rtt,
        bytes_per_second: None,
    })
    .await;
    slow.fill(
        "bench",
        (0..2500).map(|i| (format!("k/{i:05}"), Bytes::from_static(b"x"))),
    );
    let config = json!({ "bucket": "bench", "endpoint_url": slow.endpoint, "region": "us-east-1" });
    let storage = open(BackendKind::S3, config, secrets).await;
    let started = std::time::Instant::now();
    let pages = keys(&*storage, "k/", true, None).await;
    let took = started.elapsed();
    assert_eq!(names(&pages).len(), 2500);
    // The listing's first page resolved the bucket's endpoint: the GETs
    // after it are signed by the backend from the first.
    for key in ["k/00001", "k/00002", "k/00003"] {
        assert_eq!(read(&*storage, key, None).await.0, b"x");
    }
    let sdk_gets = slow
        .counts
        .sdk_get
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(sdk_gets, 0, "GETs through the SDK after a listing");
    let lists = slow.counts.list.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(lists, 3, "pages of 1,000");
    assert!(
        took >= rtt * 3 && took < rtt * 3 + Duration::from_secs(2),
        "three pages at 50 ms each took {took:?}"
    );

    // The latency proxy adds the same round trip in front of a fast server.
    use labelsync_tests::fault_proxy::{FaultProxy, Mode};
    server.fill(
        "far",
        (0..1500).map(|i| (format!("k/{i:05}"), Bytes::from_static(b"x"))),
    );
    let proxy = FaultProxy::start(
        &server.endpoint,
        Mode::Latency(Latency {
            rtt,
            bytes_per_second: None,
        }),
    )
    .await;
    let config = json!({ "bucket": "far", "endpoint_url": proxy.url, "region": "us-east-1" });
    let far = open(
        BackendKind::S3,
        config,
        json!({ "access_key_id": "k", "secret_access_key": "s" }),
    )
    .await;
    let started = std::time::Instant::now();
    assert_eq!(names(&keys(&*far, "k/", true, None).await).len(), 1500);
    assert!(started.elapsed() >= rtt * 2, "two pages through the proxy");
    assert_eq!(proxy.counts(), (2, 0));

    // Handshakes: a new connection is read only after them, a kept one at
    // once.
    let connect = Duration::from_millis(300);
    let handshaking = SyntheticS3::start_handshaking(Latency::default(), connect).await;
    handshaking.fill("b", [("k".to_owned(), Bytes::from_static(b"x"))]);
    let client = reqwest::Client::new();
    let url = format!("{}/b/k", handshaking.endpoint);
    for (round, least, most) in [(1, connect, connect * 3), (2, Duration::ZERO, connect)] {
        let started = std::time::Instant::now();
        let body = client
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(&body[..], b"x");
        assert!(took >= least && took < most, "GET {round} took {took:?}");
        // hyper puts a connection back in its pool a moment after the
        // answer is read.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted = handshaking
        .counts
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_assume_role_with_external_id_on_moto() {
    let url = endpoint("TEST_S3_ENDPOINT");
    let bucket = bucket_name();
    create_s3_bucket(&url, "test", "test", &bucket).await;
    let config = json!({
        "bucket": bucket, "endpoint_url": url,
        "role_arn": "arn:aws:iam::123456789012:role/labelsync-reader", "external_id": "ext-42",
    });
    let storage = open(
        BackendKind::S3,
        config,
        json!({ "access_key_id": "base", "secret_access_key": "base" }),
    )
    .await;
    // Every call below signs with the role's temporary credentials from STS.
    storage
        .put(
            "images/a.jpg",
            Bytes::from_static(b"jpeg"),
            Some("image/jpeg"),
        )
        .await
        .unwrap();
    assert_eq!(
        names(&keys(&*storage, "images/", true, None).await),
        ["images/a.jpg"]
    );
    // A signed GET with the role's credentials (and their session token).
    assert_eq!(read(&*storage, "images/a.jpg", None).await.0, b"jpeg");
    storage.check(Role::Target, "images/").await.unwrap();
}

/// S3 keys may hold characters XML 1.0 cannot carry (control characters,
/// NUL): a plain listing answer naming one cannot be read (moto writes
/// them raw, as S3 does), so the page is asked again URL-encoded. Every
/// key is then listed exactly, through the SDK's first page and the
/// backend's signed ones; in a sync each NUL key, which no database text
/// holds, is one per-object error (a prefix holding one is not made a
/// partition) and the rest are imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_xml_cannot_carry_are_listed_url_encoded_on_moto() {
    let url = endpoint("TEST_S3_ENDPOINT");
    let bucket = bucket_name();
    create_s3_bucket(&url, "test", "test", &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": url });
    let secrets = json!({ "access_key_id": "test", "secret_access_key": "test" });
    let storage = open(BackendKind::S3, config.clone(), secrets.clone()).await;
    let mut odd = vec![
        "ctl/a\u{1}b.jpg",
        "ctl/c+d e%25.jpg",
        "ctl/f\u{1f}/g.jpg",
        "ctl/nul\u{0}.jpg",
        "ctl/nul\u{0}dir/x.jpg",
        "ctl/plain.jpg",
    ];
    for key in &odd {
        put_s3_object(&url, "test", "test", &bucket, key).await;
    }
    odd.sort_unstable();
    let pages = in_pages_of(&*storage, "ctl/", 2).await;
    assert_eq!(pages.len(), 3);
    assert_eq!(names(&pages), odd);
    let children = storage.list_children("ctl/", None, 1).await.unwrap();
    let prefixes = children.unwrap().prefixes;
    assert_eq!(prefixes, ["ctl/f\u{1f}/", "ctl/nul\u{0}dir/"]);

    let app = spawn_app(AppOptions::with_storages()).await;
    let project = app.project("odd keys").await;
    let body = json!({
        "project_id": project, "role": "source", "backend": "s3", "prefix": "ctl/",
        "config": config, "secrets": secrets,
    });
    let (status, created) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{created}");
    let run = app.sync(&created["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(run["counters"]["listed"], 6, "{run}");
    assert_eq!(run["counters"]["created"], 4, "{run}");
    assert_eq!(run["counters"]["failed"], 2, "{run}");
    let run_id = run["id"].as_str().expect("a run id");
    let errors = app.run_errors(run_id).await;
    let mut keys: Vec<&str> = errors.iter().map(|e| e["key"].as_str().unwrap()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["ctl/nul\\0.jpg", "ctl/nul\\0dir/x.jpg"],
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .all(|e| e["error"].as_str().unwrap().contains("NUL")),
        "{errors:?}"
    );
    let uris = image_uris(&app, project).await;
    let expected: Vec<String> = odd
        .iter()
        .filter(|k| !k.contains('\0'))
        .map(|k| format!("s3://{bucket}/{k}"))
        .collect();
    assert_eq!(uris, expected);
    // A retry run finds the NUL keys behind the errors shown with `\0`,
    // and reports them again.
    let (code, started) = app
        .post(&format!("/api/v1/runs/{run_id}/retry"), json!({}))
        .await;
    assert_eq!(code, 202, "{started}");
    let retry = started["id"].as_str().expect("a retry run id");
    let retried = app.wait_run(retry, Duration::from_secs(60)).await;
    assert_eq!(retried["counters"]["listed"], 2, "{retried}");
    assert_eq!(retried["counters"]["failed"], 2, "{retried}");
    let again = app.run_errors(retry).await;
    let mut again: Vec<&str> = again.iter().map(|e| e["key"].as_str().unwrap()).collect();
    again.sort_unstable();
    assert_eq!(again, keys);
    app.stop().await;
}

/// In Files mode, a key a task's URI could not name (`/resolve` refuses a
/// `.` or `..` segment, percent-encoded or not) is a per-object error
/// asking to rename the object, not a task whose image never loads (it
/// was a task, and the run said nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_mode_reports_keys_a_task_uri_cannot_name() {
    let url = endpoint("TEST_S3_ENDPOINT");
    let bucket = bucket_name();
    create_s3_bucket(&url, "test", "test", &bucket).await;
    for key in ["dots/a.jpg", "dots/%2e%2e/b.jpg", "dots/%2E/c.jpg"] {
        put_s3_object(&url, "test", "test", &bucket, key).await;
    }
    let app = spawn_app(AppOptions::with_storages()).await;
    let project = app.project("dot keys").await;
    let body = json!({
        "project_id": project, "role": "source", "backend": "s3", "prefix": "dots/",
        "config": { "bucket": bucket, "endpoint_url": url },
        "secrets": { "access_key_id": "test", "secret_access_key": "test" },
    });
    let (status, created) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{created}");
    let run = app.sync(&created["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(
        (
            &run["counters"]["listed"],
            &run["counters"]["created"],
            &run["counters"]["failed"]
        ),
        (&json!(3), &json!(1), &json!(2)),
        "{run}"
    );
    let errors = app.run_errors(run["id"].as_str().expect("a run id")).await;
    assert!(
        errors.iter().all(|e| {
            let said = e["error"].as_str().unwrap_or_default();
            said.contains("'..' segment") && said.contains("rename the object")
        }),
        "{errors:?}"
    );
    assert_eq!(
        image_uris(&app, project).await,
        [format!("s3://{bucket}/dots/a.jpg")]
    );
    // A task an earlier version made of such a key (its link stands in
    // here) is not reported missing: the key is still listed (it was, and
    // the run said the object was gone).
    let db = sea_orm::Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    sea_orm::ConnectionTrait::execute_unprepared(
        &db,
        "UPDATE import_links SET object_key = 'dots/%2e%2e/b.jpg' WHERE object_key = 'dots/a.jpg'",
    )
    .await
    .expect("an earlier version's link");
    let again = app.sync(&created["id"]).await;
    assert_eq!(
        (&again["counters"]["missing"], &again["counters"]["failed"]),
        (&json!(0), &json!(2)),
        "{again}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_conformance_on_fake_gcs_server() {
    let url = endpoint("TEST_GCS_ENDPOINT");
    let bucket = bucket_name();
    create_gcs_bucket(&url, &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": url });
    // No credentials_json on a custom endpoint: anonymous, and no signer.
    conformance(
        open(BackendKind::Gcs, config.clone(), json!({})).await,
        Presign::Proxied,
    )
    .await;

    let missing = json!({ "bucket": bucket_name(), "endpoint_url": url });
    assert_eq!(
        check_code(
            open(BackendKind::Gcs, missing, json!({})).await,
            Role::Source
        )
        .await,
        "bucket_not_found"
    );
    let nowhere = json!({ "bucket": bucket, "endpoint_url": "http://127.0.0.1:9" });
    assert_eq!(
        check_code(
            open(BackendKind::Gcs, nowhere, json!({})).await,
            Role::Source
        )
        .await,
        "endpoint_unreachable"
    );
    // fake-gcs-server checks no credentials, so "bad credentials" is a key
    // that cannot be used at all.
    let secrets = labelsync::storage::Secrets::new(
        json!({ "credentials_json": "{\"type\": \"service_account\"}" })
            .as_object()
            .cloned()
            .unwrap(),
    );
    let err = labelsync::storage::open_with(
        BackendKind::Gcs,
        &config,
        &secrets,
        &labelsync_tests::backends::test_env(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                code: "bad_credentials",
                ..
            }
        ),
        "{err}"
    );
}

/// A V4 signed URL from a service-account key, checked against the key's
/// public half (fake-gcs-server checks no signature, so it cannot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_signed_urls_verify_with_the_public_key() {
    let url = endpoint("TEST_GCS_ENDPOINT");
    let bucket = bucket_name();
    create_gcs_bucket(&url, &bucket).await;
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = an_rsa_key_pair(dir.path());
    let config = json!({ "bucket": bucket, "endpoint_url": url });
    open(BackendKind::Gcs, config.clone(), json!({}))
        .await
        .put("dir/a b.jpg", Bytes::from_static(b"pixels"), None)
        .await
        .unwrap();
    let signed_by_key = open(
        BackendKind::Gcs,
        config,
        json!({ "credentials_json": service_account_key(&pem).to_string() }),
    )
    .await;
    let signed = signed_by_key
        .presign("dir/a b.jpg", Duration::from_secs(900))
        .await
        .unwrap()
        .unwrap();

    let (to_sign, signature) = the_string_google_signs_and_the_signature(&signed);
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        std::fs::read(&der).unwrap(),
    );
    public
        .verify(to_sign.as_bytes(), &signature)
        .expect("signature verifies with the public key");
    let tampered = to_sign.replacen("GOOG4", "GOOG5", 1);
    assert!(public.verify(tampered.as_bytes(), &signature).is_err());
    // And the URL serves the object (fake-gcs-server ignores the signature).
    let resp = reqwest::get(&signed).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"pixels");
}

/// A 2048-bit RSA key made by `openssl` in `dir`: the private key (PEM) and
/// its public half (PKCS#1 DER).
fn an_rsa_key_pair(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pem = dir.join("key.pem");
    let der = dir.join("pub.der");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        pem.to_str().unwrap(),
    ]);
    run(&[
        "rsa",
        "-in",
        pem.to_str().unwrap(),
        "-RSAPublicKey_out",
        "-outform",
        "DER",
        "-out",
        der.to_str().unwrap(),
    ]);
    (pem, der)
}

/// A service-account key for the private key in `pem`.
fn service_account_key(pem: &std::path::Path) -> Value {
    json!({
        "type": "service_account", "project_id": "p", "private_key_id": "k1",
        "private_key": std::fs::read_to_string(pem).unwrap(),
        "client_email": "labelsync@p.iam.gserviceaccount.com", "client_id": "1",
        // Never reached: signing is local.
        "token_uri": "http://127.0.0.1:9/token",
    })
}

/// The string to sign rebuilt from a signed URL alone, as Google does, and
/// the URL's signature as bytes.
fn the_string_google_signs_and_the_signature(signed: &str) -> (String, Vec<u8>) {
    let parsed = reqwest::Url::parse(signed).unwrap();
    let query = parsed.query().unwrap();
    let (unsigned, signature) = query.rsplit_once("&X-Goog-Signature=").unwrap();
    let param = |name: &str| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == name)
            .unwrap()
            .1
            .into_owned()
    };
    assert_eq!(param("X-Goog-Algorithm"), "GOOG4-RSA-SHA256");
    assert_eq!(param("X-Goog-Expires"), "900");
    let host = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap());
    let canonical = format!(
        "GET\n{}\n{unsigned}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD",
        parsed.path()
    );
    let scope = param("X-Goog-Credential")
        .split_once('/')
        .unwrap()
        .1
        .to_owned();
    let to_sign = format!(
        "GOOG4-RSA-SHA256\n{}\n{scope}\n{}",
        param("X-Goog-Date"),
        labelsync::security::sha256_hex(&[canonical.as_bytes()])
    );
    let signature: Vec<u8> = (0..signature.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&signature[i..i + 2], 16).unwrap())
        .collect();
    (to_sign, signature)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_conformance_on_azurite() {
    let account_url = endpoint("TEST_AZURITE_ENDPOINT");
    let container = bucket_name();
    create_azure_container(&account_url, &container).await;
    let config = json!({ "account_name": AZURITE_ACCOUNT, "container": container, "endpoint_url": account_url });
    let secrets = json!({ "account_key": AZURITE_KEY });
    conformance(
        open(BackendKind::Azure, config.clone(), secrets.clone()).await,
        Presign::Url,
    )
    .await;

    let wrong = json!({ "account_key": "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nIQ==" });
    assert_eq!(
        check_code(
            open(BackendKind::Azure, config.clone(), wrong).await,
            Role::Source
        )
        .await,
        "bad_credentials"
    );
    let missing = json!({ "account_name": AZURITE_ACCOUNT, "container": bucket_name(), "endpoint_url": account_url });
    assert_eq!(
        check_code(
            open(BackendKind::Azure, missing, secrets.clone()).await,
            Role::Source
        )
        .await,
        "bucket_not_found"
    );
}

/// Blobs written by other tools, with names holding what `object_store`'s
/// `Path` escapes (non-ASCII, `%`, `#`, `{`, `^`, spaces), are listed under
/// their names, and read and deleted by them (they were listed, but every
/// read asked for an escaped name: 404); they are proxied, not signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blobs_named_by_other_tools_are_reached_by_their_names() {
    let account_url = endpoint("TEST_AZURITE_ENDPOINT");
    let container = bucket_name();
    create_azure_container(&account_url, &container).await;
    let odd = ["raw/100% {x}^.json", "raw/a#b.json", "raw/猫 ü/€.json"];
    for name in odd {
        put_azure_blob(&account_url, &container, name, name.as_bytes()).await;
    }
    let config = json!({ "account_name": AZURITE_ACCOUNT, "container": container, "endpoint_url": account_url });
    let storage = open(
        BackendKind::Azure,
        config,
        json!({ "account_key": AZURITE_KEY }),
    )
    .await;
    assert_eq!(names(&keys(&*storage, "raw/", true, None).await), odd);
    assert_eq!(
        names(&keys(&*storage, "raw/猫 ü/", false, None).await),
        ["raw/猫 ü/€.json"]
    );
    for name in odd {
        assert_eq!(
            read(&*storage, name, None).await.0,
            name.as_bytes(),
            "{name}"
        );
        // object_store signs the escaped URL path where Azure checks the
        // name: such names are proxied rather than signed wrong.
        let url = storage.presign(name, Duration::from_secs(60)).await;
        assert_eq!(url.expect("presign"), None, "{name}");
    }
    // A plain name is signed, and the URL serves it.
    put_azure_blob(&account_url, &container, "raw/plain-1.json", b"plain").await;
    let url = storage
        .presign("raw/plain-1.json", Duration::from_secs(60))
        .await
        .expect("presign")
        .expect("a URL");
    let signed = reqwest::get(&url).await.expect("GET");
    assert_eq!(signed.status(), 200, "{url}");
    assert_eq!(signed.bytes().await.expect("body"), &b"plain"[..]);
    storage.delete("raw/plain-1.json").await.expect("delete");
    storage.delete(odd[0]).await.expect("delete");
    assert_eq!(names(&keys(&*storage, "raw/", true, None).await), odd[1..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conformance() {
    let redis = labelsync_tests::require_redis().await;
    let url = reqwest::Url::parse(&redis).unwrap();
    let (host, port) = (
        url.host_str().unwrap().to_owned(),
        url.port().unwrap_or(6379),
    );
    let path = format!("{}:", bucket_name());
    let config = json!({ "host": host, "port": port, "db": 0, "path": path });
    conformance(
        open(BackendKind::Redis, config.clone(), json!({})).await,
        Presign::Proxied,
    )
    .await;

    // The test Redis has no password: sending one is refused.
    let storage = labelsync::storage::open_with(
        BackendKind::Redis,
        &config,
        &labelsync::storage::Secrets::new(
            json!({ "password": "wrong" }).as_object().cloned().unwrap(),
        ),
        &labelsync_tests::backends::test_env(),
    )
    .await;
    match storage {
        Err(Error::Unauthenticated(_)) => {}
        Ok(storage) => assert_eq!(check_code(storage, Role::Source).await, "bad_credentials"),
        Err(other) => panic!("wrong Redis password: {other:?}"),
    }
}

/// A Redis value can only be read whole, so no more of it than the object
/// limit is read: no more of a larger value than the limit is sent, and it
/// is refused with the limit named; a range of it, and a value at the
/// limit, read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_no_more_of_a_value_than_the_object_limit() {
    let url = reqwest::Url::parse(&labelsync_tests::require_redis().await).unwrap();
    let config = json!({
        "host": url.host_str().unwrap(), "port": url.port().unwrap_or(6379),
        "path": format!("{}:", bucket_name()),
    });
    let env = labelsync::storage::StorageEnv {
        max_object_bytes: 1 << 20,
        ..labelsync_tests::backends::test_env()
    };
    let secrets = labelsync::storage::Secrets::default();
    let storage = labelsync::storage::open_with(BackendKind::Redis, &config, &secrets, &env)
        .await
        .unwrap();
    let over = (1 << 20) + 1;
    storage
        .put("big", Bytes::from(vec![b'x'; over]), None)
        .await
        .unwrap();
    storage
        .put("fits", Bytes::from(vec![b'y'; 1 << 20]), None)
        .await
        .unwrap();
    for range in [None, Some(GetRange::Suffix(2 << 20))] {
        match storage.get("big", range).await {
            Err(Error::Invalid { code, message, .. }) => {
                assert_eq!(code, "storage_answer_too_big", "{message}");
                assert!(message.contains("1048577 bytes"), "{message}");
                assert!(message.contains("LABELSYNC_MAX_OBJECT_BYTES"), "{message}");
            }
            Err(other) => panic!("{range:?}: {other:?}"),
            Ok(object) => panic!("{range:?}: read, size {:?}", object.size),
        }
    }
    let bounded = Some(GetRange::Bounded { start: 10, end: 19 });
    assert_eq!(
        read(&*storage, "big", bounded).await,
        (vec![b'x'; 10], Some(over as u64))
    );
    let all_but_one = read(&*storage, "big", Some(GetRange::From(1))).await;
    assert_eq!(all_but_one.0.len(), 1 << 20);
    assert_eq!(read(&*storage, "fits", None).await.0, vec![b'y'; 1 << 20]);
    for key in ["big", "fits"] {
        storage.delete(key).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databricks_conformance_on_the_files_api_fake() {
    let fake = DatabricksFake::start().await;
    let config =
        json!({ "host": fake.url, "catalog": "main", "schema": "raw", "volume": "images" });
    conformance(
        open(
            BackendKind::Databricks,
            config.clone(),
            json!({ "token": fake.token }),
        )
        .await,
        Presign::Proxied,
    )
    .await;
    assert!(!fake.is_empty());
    let wrong = open(
        BackendKind::Databricks,
        config,
        json!({ "token": "dapi-wrong" }),
    )
    .await;
    assert_eq!(check_code(wrong, Role::Source).await, "bad_credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_conformance() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("data")).unwrap();
    let storage = local_data_storage(root.path()).await;
    conformance(storage.clone(), Presign::Proxied).await;
    // Keys never leave the storage's directory.
    assert!(
        storage
            .put("../escape.txt", Bytes::from_static(b"x"), None)
            .await
            .is_err()
    );
    assert!(!root.path().join("escape.txt").exists());
}

/// A Databricks subdirectory the token may not list is one listing error
/// (a per-object error of the run), and the rest is listed (#14 item 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databricks_unreadable_directory_is_one_listing_error() {
    let fake = DatabricksFake::start().await;
    let config =
        json!({ "host": fake.url, "catalog": "main", "schema": "raw", "volume": "images" });
    let storage = open(
        BackendKind::Databricks,
        config,
        json!({ "token": fake.token }),
    )
    .await;
    for key in ["a.txt", "forbidden/x.txt", "z/y.txt"] {
        storage
            .put(key, Bytes::from_static(b"x"), None)
            .await
            .unwrap();
    }
    let pages: Vec<Page> = storage
        .list(ListOptions {
            prefix: String::new(),
            recursive: true,
            start_after: None,
            page_size: 1000,
        })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(names(&pages), ["a.txt", "z/y.txt"]);
    let errors: Vec<&str> = pages
        .iter()
        .flat_map(|p| &p.errors)
        .map(|e| e.key.as_str())
        .collect();
    assert_eq!(errors, ["forbidden/"]);
}

/// A local put never creates anything through a symlinked directory, out of
/// the document root or inside it (listing does not enter those either):
/// it is refused before any directory is made (#14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_puts_never_go_through_symlinked_directories() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("data")).unwrap();
    std::fs::create_dir_all(root.path().join("other")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("data/out")).unwrap();
    std::os::unix::fs::symlink(root.path().join("other"), root.path().join("data/inner")).unwrap();
    let storage = local_data_storage(root.path()).await;
    for key in [
        "out/sub/a.json",
        "out/a.json",
        "inner/sub/a.json",
        "inner/a.json",
    ] {
        let result = storage.put(key, Bytes::from_static(b"{}"), None).await;
        assert!(
            matches!(result, Err(Error::Invalid { .. })),
            "{key}: {result:?}"
        );
    }
    let made: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
    assert!(
        made.is_empty(),
        "created outside the document root: {made:?}"
    );
    let made: Vec<_> = std::fs::read_dir(root.path().join("other"))
        .unwrap()
        .collect();
    assert!(made.is_empty(), "created through a symlink: {made:?}");
    // Real directories are still made on the way.
    storage
        .put("new/dir/a.json", Bytes::from_static(b"{}"), None)
        .await
        .unwrap();
    assert!(root.path().join("data/new/dir/a.json").is_file());
}

/// An Azure `account_name` becomes the host `<account>.blob.core.windows.net`:
/// anything but 3-24 lowercase letters and digits is refused on create and
/// on patch (a 400 naming the field), so it cannot point the client at a
/// literal address the SSRF guard never sees (#14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_account_names_cannot_reshape_the_host() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let project = app.project("azure names").await;
    let body = |account: &str| {
        json!({
            "project_id": project, "role": "source", "backend": "azure",
            "config": { "account_name": account, "container": "media" },
        })
    };
    let long = "a".repeat(25);
    for account in [
        "127.0.0.1:18999/x?",
        "169.254.169.254/latest/meta-data?",
        "evil.example.com#",
        "Upper",
        "ab",
        long.as_str(),
    ] {
        let (status, err) = app.post("/api/v1/storages", body(account)).await;
        assert_eq!(
            (
                status,
                err["error"]["code"].as_str(),
                err["error"]["field"].as_str()
            ),
            (400, Some("invalid_config"), Some("config.account_name")),
            "{account}: {err}"
        );
    }
    let (status, created) = app.post("/api/v1/storages", body("labelsync01")).await;
    assert_eq!(status, 201, "{created}");
    let (status, err) = app
        .patch(
            &format!("/api/v1/storages/{}", created["id"]),
            json!({ "config": { "account_name": "127.0.0.1:18999/x?", "container": "media" } }),
        )
        .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (400, Some("config.account_name")),
        "{err}"
    );
    app.stop().await;
}

/// An import sync through the API for every remote backend, one test each:
/// the storage is created with secrets (sealed at rest), validated, synced,
/// and its tasks carry the backend's URIs.
/// The `image` of every task of `project`, sorted.
async fn image_uris(app: &labelsync_tests::TestApp, project: i64) -> Vec<String> {
    let mut uris: Vec<String> = app
        .all_tasks(project)
        .await
        .iter()
        .map(|t| t["data"]["image"].as_str().unwrap().to_owned())
        .collect();
    uris.sort();
    uris
}

async fn import_sync_end_to_end(backend: &str, config: Value, secrets: Value, scheme: &str) {
    let app = spawn_app(AppOptions::with_storages()).await;
    put_two_images_and_a_note(backend, &config, &secrets).await;
    let project = app.project(&format!("{backend} project")).await;
    let created = create_a_validated_source(&app, project, backend, config, &secrets).await;
    secrets_are_sealed_at_rest(&app, backend, &created, &secrets).await;
    saved_secrets_validate_and_the_sync_imports_the_images(
        &app, project, backend, &created, scheme,
    )
    .await;
    app.stop().await;
}

/// `img/1.jpg`, `img/2.jpg` (matched by the source) and `img/notes.txt`
/// (not matched), written straight to the backend.
async fn put_two_images_and_a_note(backend: &str, config: &Value, secrets: &Value) {
    let kind = BackendKind::parse(backend).unwrap();
    let storage = open(kind, config.clone(), secrets.clone()).await;
    for key in ["img/1.jpg", "img/2.jpg", "img/notes.txt"] {
        storage
            .put(key, Bytes::from_static(b"pixels"), None)
            .await
            .unwrap();
    }
}

/// A source on `img/` for `*.jpg`, validated and then created with its
/// secrets; returns the created storage.
async fn create_a_validated_source(
    app: &labelsync_tests::TestApp,
    project: i64,
    backend: &str,
    config: Value,
    secrets: &Value,
) -> Value {
    let body = json!({
        "project_id": project, "role": "source", "backend": backend, "prefix": "img/",
        "regex_filter": ".*\\.jpg$", "config": config, "secrets": secrets,
    });
    let (status, validated) = app.post("/api/v1/storages/validate", body.clone()).await;
    assert_eq!(status, 200, "{backend}: {validated}");
    let (status, created) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{backend}: {created}");
    let names: Vec<&str> = secrets
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(created["secrets_set"], json!(names), "{backend}");
    created
}

/// Sealed at rest: no secret value is in the row.
async fn secrets_are_sealed_at_rest(
    app: &labelsync_tests::TestApp,
    backend: &str,
    created: &Value,
    secrets: &Value,
) {
    let db = sea_orm::Database::connect(&app.database_url).await.unwrap();
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT secrets FROM storages WHERE id = {}", created["id"]),
        ))
        .await
        .unwrap()
        .unwrap();
    let sealed: Option<String> = row.try_get("", "secrets").unwrap();
    for value in secrets.as_object().unwrap().values() {
        let value = value.as_str().unwrap();
        assert!(
            sealed
                .as_deref()
                .is_some_and(|s| s.starts_with("v1.") && !s.contains(value)),
            "{backend}"
        );
    }
    db.close().await.ok();
}

async fn saved_secrets_validate_and_the_sync_imports_the_images(
    app: &labelsync_tests::TestApp,
    project: i64,
    backend: &str,
    created: &Value,
    scheme: &str,
) {
    let (status, revalidated) = app
        .post(
            &format!("/api/v1/storages/{}/validate", created["id"]),
            json!({}),
        )
        .await;
    assert_eq!(
        status, 200,
        "{backend}: saved secrets open again: {revalidated}"
    );
    let run = app.sync(&created["id"]).await;
    assert_eq!(run["status"], "completed", "{backend}: {run}");
    assert_eq!(run["counters"]["created"], 2, "{backend}: {run}");
    let uris = image_uris(app, project).await;
    assert_eq!(uris.len(), 2, "{backend}: {uris:?}");
    assert!(
        uris.iter()
            .all(|u| u.starts_with(scheme) && u.contains("img/")),
        "{backend}: {uris:?}"
    );
    // A second sync finds nothing new.
    let again = app.sync(&created["id"]).await;
    assert_eq!(again["counters"]["created"], 0, "{backend}: {again}");
}

/// A key ending in `/` in S3 or GCS is a folder marker (the consoles'
/// "Create folder" writes one, of zero bytes), not an object: a sync makes
/// no task of it in Files mode (one whose URI names no object) and reads
/// no task file in Tasks mode, as Label Studio skips it. It still counts
/// as listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_markers_are_not_imported() {
    let app = spawn_app(AppOptions::with_storages()).await;
    let moto = endpoint("TEST_S3_ENDPOINT");
    let gcs = endpoint("TEST_GCS_ENDPOINT");
    let (s3_bucket, gcs_bucket) = (bucket_name(), bucket_name());
    create_s3_bucket(&moto, "test", "test", &s3_bucket).await;
    create_gcs_bucket(&gcs, &gcs_bucket).await;
    let backends = [
        (
            "s3",
            json!({ "bucket": s3_bucket, "endpoint_url": moto }),
            json!({ "access_key_id": "test", "secret_access_key": "test" }),
        ),
        (
            "gcs",
            json!({ "bucket": gcs_bucket, "endpoint_url": gcs }),
            json!({}),
        ),
    ];
    for (backend, config, secrets) in backends {
        let storage = open(
            BackendKind::parse(backend).unwrap(),
            config.clone(),
            secrets.clone(),
        )
        .await;
        for (key, body) in [
            ("img/", ""),
            ("img/sub/", ""),
            ("img/a.json", r#"{"text": "a"}"#),
        ] {
            storage.put(key, Bytes::from(body), None).await.unwrap();
        }
        for method in ["files", "tasks"] {
            let project = app.project(&format!("{backend} {method}")).await;
            let body = json!({
                "project_id": project, "role": "source", "backend": backend, "prefix": "img/",
                "import_method": method, "config": config, "secrets": secrets,
            });
            let (status, created) = app.post("/api/v1/storages", body).await;
            assert_eq!(status, 201, "{backend}: {created}");
            let run = app.sync(&created["id"]).await;
            let counters = &run["counters"];
            assert_eq!(
                (
                    &counters["listed"],
                    &counters["created"],
                    &counters["failed"]
                ),
                (&json!(3), &json!(1), &json!(0)),
                "{backend} {method}: {run}"
            );
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_sync_end_to_end_through_s3() {
    let (s3_url, s3_key, s3_secret) = s3s();
    let s3_bucket = bucket_name();
    create_s3_bucket(&s3_url, &s3_key, &s3_secret, &s3_bucket).await;
    import_sync_end_to_end(
        "s3",
        json!({ "bucket": s3_bucket, "endpoint_url": s3_url }),
        json!({ "access_key_id": s3_key, "secret_access_key": s3_secret }),
        "s3://",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_sync_end_to_end_through_gcs() {
    let gcs_url = endpoint("TEST_GCS_ENDPOINT");
    let gcs_bucket = bucket_name();
    create_gcs_bucket(&gcs_url, &gcs_bucket).await;
    import_sync_end_to_end(
        "gcs",
        json!({ "bucket": gcs_bucket, "endpoint_url": gcs_url }),
        json!({}),
        "gs://",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_sync_end_to_end_through_azure() {
    let azure_url = endpoint("TEST_AZURITE_ENDPOINT");
    let container = bucket_name();
    create_azure_container(&azure_url, &container).await;
    import_sync_end_to_end(
        "azure",
        json!({ "account_name": AZURITE_ACCOUNT, "container": container, "endpoint_url": azure_url }),
        json!({ "account_key": AZURITE_KEY }),
        "azure-blob://",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_sync_end_to_end_through_redis() {
    let redis = reqwest::Url::parse(&labelsync_tests::require_redis().await).unwrap();
    let redis_path = format!("{}:", bucket_name());
    import_sync_end_to_end(
        "redis",
        json!({ "host": redis.host_str().unwrap(), "port": redis.port().unwrap_or(6379), "path": redis_path }),
        json!({}),
        "redis://",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_sync_end_to_end_through_databricks() {
    let fake = DatabricksFake::start().await;
    import_sync_end_to_end(
        "databricks",
        json!({ "host": fake.url, "catalog": "main", "schema": "raw", "volume": "images" }),
        json!({ "token": fake.token }),
        "dbx://Volumes/main/raw/images/",
    )
    .await;
}

/// A server that answers a listing with the continuation token it was
/// sent (an empty page that says more follow) stops the listing with an
/// error at once, on S3, GCS and Azure, instead of being asked forever
/// (nothing would be committed, so not even a cancel would be seen); one
/// that crowds more entries into a page than asked for is refused too (S3,
/// Azure; GCS past 5,000, while the page is parsed), and so is a page longer than 32 MiB (Azure, and S3's first
/// page, which the AWS SDK reads: the others have their own tests). An Azure listing of one level gives
/// its first page before it asks for the next (it gathered every page of
/// the level first, without end here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_listing_pages_stop_the_listing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = |content_type: &str, body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let azure = |blobs: usize| {
        let blobs: String = (0..blobs)
            .map(|i| {
                format!(
                    "<Blob><Name>k{i:04}</Name><Properties>\
                     <Last-Modified>Mon, 01 Jan 2024 00:00:00 GMT</Last-Modified>\
                     <Content-Length>1</Content-Length><Content-Type>text/plain</Content-Type>\
                     </Properties></Blob>"
                )
            })
            .collect();
        answer(
            "application/xml",
            &format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults>\
                 <Blobs>{blobs}</Blobs><NextMarker>again</NextMarker></EnumerationResults>"
            ),
        )
    };
    // Says 64 MiB follow, sends a few bytes and waits.
    let endless = "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\n\
                   content-length: 67108864\r\n\r\n<?xml version=\"1.0\"?>"
        .to_owned();
    let s3 = answer(
        "application/xml",
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>b</Name>\
         <Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>\
         <IsTruncated>true</IsTruncated><NextContinuationToken>again</NextContinuationToken>\
         </ListBucketResult>",
    );
    let gcs = answer("application/json", r#"{"nextPageToken":"again"}"#);
    // More names than any page holds, each tiny: parsed whole before (2.5
    // million of them fit in the 32 MiB a page may take).
    let names: Vec<String> = (0..5001).map(|i| format!(r#"{{"name":"k{i}"}}"#)).collect();
    let gcs_crowded = answer(
        "application/json",
        &format!(r#"{{"items":[{}]}}"#, names.join(",")),
    );
    // And a page of more entries than S3 ever sends (1,000).
    let many: String = (0..1001)
        .map(|i| format!("<Contents><Key>k{i}</Key><Size>1</Size></Contents>"))
        .collect();
    let crowded = answer(
        "application/xml",
        &format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>b</Name>\
             <Prefix></Prefix><KeyCount>1001</KeyCount><MaxKeys>1000</MaxKeys>\
             <IsTruncated>false</IsTruncated>{many}</ListBucketResult>"
        ),
    );
    let repeated = "answered the continuation token it was sent";
    // (backend, answer, recursive listing, what the error says)
    for (kind, answer, recursive, why) in [
        (BackendKind::S3, s3, true, repeated),
        (BackendKind::Gcs, gcs, true, repeated),
        (
            BackendKind::Gcs,
            gcs_crowded,
            true,
            "a listing page crowded past 5000 entries",
        ),
        (
            BackendKind::S3,
            crowded,
            true,
            "answered 1001 entries in a page",
        ),
        (BackendKind::Azure, azure(0), true, repeated),
        (BackendKind::Azure, azure(1000), false, repeated),
        (
            BackendKind::Azure,
            azure(1001),
            true,
            "answered 1001 entries in a page",
        ),
        (
            BackendKind::Azure,
            endless.clone(),
            true,
            "the storage's answer is over 32 MiB",
        ),
        // A storage opened anew lists its first page through the AWS SDK,
        // which read any answer whole (the signed pages after it were
        // bounded already): now bounded there too.
        (
            BackendKind::S3,
            endless,
            true,
            "the storage's answer is over 32 MiB",
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (answer, counted) = (answer.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut buf = [0; 8192];
                    while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let (config, secrets) = match kind {
            BackendKind::S3 => (
                json!({ "bucket": "b", "endpoint_url": url }),
                json!({ "access_key_id": "k", "secret_access_key": "s" }),
            ),
            BackendKind::Azure => (
                json!({ "account_name": AZURITE_ACCOUNT, "container": "c", "endpoint_url": format!("{url}/{AZURITE_ACCOUNT}") }),
                json!({ "account_key": AZURITE_KEY }),
            ),
            _ => (json!({ "bucket": "b", "endpoint_url": url }), json!({})),
        };
        let storage = open(kind, config, secrets).await;
        let listing = storage.list(ListOptions {
            prefix: String::new(),
            recursive,
            start_after: None,
            page_size: 1000,
        });
        let pages =
            tokio::time::timeout(Duration::from_secs(20), listing.take(3).collect::<Vec<_>>())
                .await
                .unwrap_or_else(|_| panic!("{kind}: still listing after 20 s"));
        let error = pages.iter().find_map(|p| p.as_ref().err());
        let message = error.map(ToString::to_string).unwrap_or_default();
        assert!(message.contains(why), "{kind}: {message}");
        if !recursive {
            let first = pages.first().and_then(|p| p.as_ref().ok());
            assert_eq!(first.map(|p| p.objects.len()), Some(1000), "{kind}");
        }
        if kind == BackendKind::S3 && why.contains("32 MiB") {
            // Refused at once: the SDK retried any answer that failed to
            // arrive, reading up to 32 MiB each time (5 requests).
            let asked = asked.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(asked, 1, "{kind}: asked {asked} times");
        }
    }
}

/// A Files API directory whose pages never end stops the listing at the
/// entry limit, with an error saying so, instead of growing without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_listing_that_never_ends_stops_at_the_entry_limit() {
    let (_fake, storage) = files_api_volume().await;
    let first = first_page_of(&storage, "endless/").await;
    refused_with(first, "storage_answer_too_big", "more than 1000000 entries");
}

/// A Databricks walk resumed after a key goes on in the order it walks:
/// a directory's keys come before a sibling whose name extends the
/// directory's (`r/a/y.txt` before `r/a-b.txt`), and byte order, where
/// `r/a-b.txt` comes first, skipped that sibling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_databricks_walk_keeps_its_order() {
    let (_fake, storage) = files_api_volume().await;
    for key in ["r/a/x.txt", "r/a/y.txt", "r/a-b.txt"] {
        storage
            .put(key, Bytes::from_static(b"x"), None)
            .await
            .expect("put");
    }
    let keys = |after: Option<&str>| {
        let listing = storage.list(ListOptions {
            prefix: "r/".into(),
            recursive: true,
            start_after: after.map(Into::into),
            page_size: 100,
        });
        async move {
            let pages: Vec<Page> = listing.try_collect().await.expect("listing");
            pages
                .into_iter()
                .flat_map(|p| p.objects)
                .map(|o| o.key)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(keys(None).await, ["r/a/x.txt", "r/a/y.txt", "r/a-b.txt"]);
    assert_eq!(keys(Some("r/a/x.txt")).await, ["r/a/y.txt", "r/a-b.txt"]);
    assert_eq!(keys(Some("r/a/y.txt")).await, ["r/a-b.txt"]);
}

/// A volume `v` on a fresh Files API fake (the fake, for its lifetime).
async fn files_api_volume() -> (DatabricksFake, Arc<dyn Storage>) {
    let fake = DatabricksFake::start().await;
    let config = json!({ "host": fake.url, "catalog": "main", "schema": "raw", "volume": "v" });
    let secrets = json!({ "token": fake.token });
    let storage = open(BackendKind::Databricks, config, secrets).await;
    (fake, storage)
}

/// The first page of a recursive listing under `prefix` (120 s at most).
async fn first_page_of(
    storage: &Arc<dyn Storage>,
    prefix: &str,
) -> Option<labelsync::Result<Page>> {
    let mut listing = storage.list(ListOptions {
        prefix: prefix.into(),
        recursive: true,
        start_after: None,
        page_size: 100,
    });
    tokio::time::timeout(Duration::from_secs(120), listing.next())
        .await
        .expect("the listing was still reading pages after 120 s")
}

/// `first` is a refusal with `code`, saying `says`.
fn refused_with(first: Option<labelsync::Result<Page>>, code: &str, says: &str) {
    match first {
        Some(Err(labelsync::Error::Invalid {
            code: got, message, ..
        })) => {
            assert_eq!(got, code);
            assert!(message.contains(says), "{message}");
        }
        other => panic!("{:?}", other.map(|p| p.map(|p| p.objects.len()))),
    }
}

/// A Files API server that answers empty pages forever, each with a new
/// page token, or nests directories without end, was asked forever (no
/// entry was gathered, so the entry limit never tripped): the first stops
/// the listing with an error saying so, the second is that directory's
/// error at a path of 4 KiB, the listing complete but marked incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_listings_that_never_end_empty_or_deep_are_given_up() {
    let (_fake, storage) = files_api_volume().await;
    let hollow = first_page_of(&storage, "hollow/").await;
    refused_with(hollow, "storage_rejected", "10000 empty pages in a row");
    let deep = storage.list(ListOptions {
        prefix: "deep/".into(),
        recursive: true,
        start_after: None,
        page_size: 100,
    });
    let deep = tokio::time::timeout(Duration::from_secs(120), deep.collect::<Vec<_>>())
        .await
        .expect("still walking down after 120 s");
    let errors: Vec<_> = deep
        .iter()
        .flat_map(|page| page.as_ref().expect("a page").errors.clone())
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].message.contains("longer than 4096 bytes"),
        "{errors:?}"
    );
    assert!(errors[0].incomplete);
}

/// A cancel reaches a run that commits nothing for a long time (here a
/// Files API directory whose pages never end, gathered whole before its
/// first page is committed): its attempt stops within a heartbeat or two
/// (1 s in tests) instead of listing on until the entry limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_a_listing_that_commits_nothing() {
    let fake = DatabricksFake::start().await;
    let app = spawn_app(AppOptions::with_storages()).await;
    let project = app.project("endless").await;
    let body = json!({
        "project_id": project, "role": "source", "backend": "databricks", "prefix": "endless/",
        "config": { "host": fake.url, "catalog": "main", "schema": "raw", "volume": "v" },
        "secrets": { "token": fake.token },
    });
    let (status, storage) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{storage}");
    let run = app.start_sync(&storage["id"]).await;
    let asked = || {
        fake.requests()
            .iter()
            .filter(|r| r.contains("/endless/"))
            .count()
    };
    labelsync_tests::eventually("the listing to be under way", || async { asked() > 5 }).await;
    app.cancel(&run).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let then = asked();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(asked(), then, "still listing 4 s after the cancel");
    app.stop().await;
}

/// A Tasks-mode volume on `fake` holding `key` (listed as 1 byte when its
/// name starts with `understated-`): its config and secrets.
async fn databricks_volume_with(fake: &DatabricksFake, key: &str, body: Bytes) -> (Value, Value) {
    let config = json!({ "host": fake.url, "catalog": "main", "schema": "raw", "volume": "tasks" });
    let secrets = json!({ "token": fake.token });
    let storage = open(BackendKind::Databricks, config.clone(), secrets.clone()).await;
    storage.put(key, body, None).await.unwrap();
    (config, secrets)
}

/// A Tasks-mode source storage of that volume in a new project of `app`.
async fn databricks_tasks_storage(
    app: &labelsync_tests::TestApp,
    project: &str,
    (config, secrets): (Value, Value),
) -> Value {
    let project = app.project(project).await;
    let body = json!({
        "project_id": project, "role": "source", "backend": "databricks",
        "import_method": "tasks", "config": config, "secrets": secrets,
    });
    let (status, created) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{created}");
    created
}

/// A Parquet file is spooled to disk before it is read (it needs random
/// access): a storage that lists it small and then answers more is cut at
/// `LABELSYNC_MAX_OBJECT_BYTES`, one object's error, not a full disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_file_longer_than_listed_is_cut_at_the_size_limit() {
    let fake = DatabricksFake::start().await;
    let body = Bytes::from(vec![b'P'; 64 << 10]);
    let volume = databricks_volume_with(&fake, "understated-big.parquet", body).await;
    let mut opts = AppOptions::with_storages();
    opts.env.push(("LABELSYNC_MAX_OBJECT_BYTES", "4096".into()));
    let app = spawn_app(opts).await;
    let created = databricks_tasks_storage(&app, "understated", volume).await;
    let run = app.sync(&created["id"]).await;
    assert_eq!(run["counters"]["failed"], 1, "{run}");
    let errors = app.run_errors(run["id"].as_str().expect("id")).await;
    let message = errors[0]["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("4096-byte limit (LABELSYNC_MAX_OBJECT_BYTES)"),
        "{errors:?}"
    );
    app.stop().await;
}

/// The bytes of the distinct files under `dir` that processes hold open
/// (a copy of a Parquet object is unlinked as it is made: only its open
/// descriptors show it): the worker's and its Parquet children's.
fn spooled(worker: u32, dir: &std::path::Path) -> u64 {
    let mut pids = vec![worker];
    if let Ok(threads) = std::fs::read_dir(format!("/proc/{worker}/task")) {
        for thread in threads.flatten() {
            let children = std::fs::read_to_string(thread.path().join("children"));
            pids.extend(
                children
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|pid| pid.parse::<u32>().ok()),
            );
        }
    }
    let mut files = std::collections::HashMap::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            if target.starts_with(dir)
                && let Ok(meta) = std::fs::metadata(fd.path())
            {
                use std::os::unix::fs::MetadataExt;
                files.insert(meta.ino(), meta.len());
            }
        }
    }
    files.values().sum()
}

/// A Parquet object is read from a copy on the worker's disk, and a worker
/// reads up to 64 objects at once: a bucket of large Parquet files filled
/// its disk (a pod's `/tmp` is 8 GiB, and the pod is evicted past it).
/// Copies now take their listed size from `LABELSYNC_SPOOL_BYTES` before
/// they are downloaded, and one larger than the budget is its error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_copies_stay_within_the_spool_budget() {
    const FILES: usize = 6;
    let (config, secrets, storage) = s3s_bucket().await;
    // 2 MB a file; the large one 6 MB.
    let body = noisy_parquet(40);
    for i in 0..FILES {
        let key = format!("tasks/file-{i}.parquet");
        storage.put(&key, body.clone(), None).await.unwrap();
    }
    let large = noisy_parquet(120);
    storage
        .put("tasks/large.parquet", large, None)
        .await
        .unwrap();
    // Room for two copies at once.
    let budget = body.len() as u64 * 5 / 2;

    let mut options = AppOptions::with_storages();
    options.workers = false;
    let app = spawn_app(options).await;
    let tmp = tempfile::tempdir().expect("temporary directory");
    let env = [
        ("LABELSYNC_SPOOL_BYTES", budget.to_string()),
        ("TMPDIR", tmp.path().display().to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let worker = spawn_ready_worker(&app, "spool", &env).await;
    let created = s3_tasks_storage(&app, "spool", "tasks/", (&config, &secrets)).await;
    let run_id = app.start_sync(&created["id"]).await;
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, watching, dir) = (peak.clone(), watching.clone(), tmp.path().to_owned());
        let pid = worker.0.id();
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                peak.fetch_max(spooled(pid, &dir), std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let run = app.wait_run(&run_id, Duration::from_secs(120)).await;
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    sampler.join().expect("sampler");
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "spooled at most {peak} bytes; budget {budget}, a file {}",
        body.len()
    );
    assert_eq!(run["counters"]["created"], (FILES * 40) as i64, "{run}");
    assert_eq!(run["counters"]["failed"], 1, "{run}");
    let errors = app.run_errors(&run_id).await;
    let message = errors[0]["error"].as_str().unwrap_or_default();
    assert!(
        errors[0]["key"] == "tasks/large.parquet" && message.contains("LABELSYNC_SPOOL_BYTES"),
        "{errors:?}"
    );
    assert!(peak >= body.len() as u64, "no copy was seen: {peak} bytes");
    assert!(
        peak <= budget,
        "{peak} bytes spooled at once, over {budget}"
    );
    app.stop().await;
}

/// A Tasks-mode source storage of the objects under `prefix` of an S3
/// bucket (`config`, `secrets`) in a new project of `app`.
async fn s3_tasks_storage(
    app: &labelsync_tests::TestApp,
    project: &str,
    prefix: &str,
    (config, secrets): (&Value, &Value),
) -> Value {
    let project = app.project(project).await;
    let body = json!({
        "project_id": project, "role": "source", "backend": "s3", "import_method": "tasks",
        "prefix": prefix, "config": config, "secrets": secrets,
    });
    let (status, created) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{created}");
    created
}

/// A Parquet copy waits for its disk room before it takes one of the
/// worker's reads. One that waited holding its read kept it from every
/// other object for as long as the copies before it took: here a JSON
/// file of another storage waited out the whole slow download of a
/// Parquet file it had nothing to do with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_copy_waiting_for_disk_holds_no_read() {
    let (direct, secrets, storage) = s3s_bucket().await;
    let body = noisy_parquet(40);
    for key in [
        "parquet/a.parquet",
        "parquet/b.parquet",
        "parquet/c.parquet",
    ] {
        storage.put(key, body.clone(), None).await.unwrap();
    }
    let task = Bytes::from_static(br#"{"data": {"text": "beside"}}"#);
    storage.put("json/task.json", task, None).await.unwrap();
    // The Parquet files are read through a proxy that holds every object
    // read until the test lets them go; the JSON file is read directly.
    let proxy = FaultProxy::start(&s3s().0, Mode::HeldReads).await;
    let mut slow = direct.clone();
    slow["endpoint_url"] = json!(proxy.url);

    let mut options = AppOptions::with_storages();
    options.workers = false;
    let app = spawn_app(options).await;
    // Three job slots of one read each (the Parquet storage's sync job,
    // its batch of three objects, and the other storage's), and disk for
    // one copy at a time.
    let spool = (body.len() * 3 / 2).to_string();
    let env = [
        ("LABELSYNC_WORKER_CONCURRENCY", "3"),
        ("LABELSYNC_FETCH_CONCURRENCY", "1"),
        ("LABELSYNC_SPOOL_BYTES", spool.as_str()),
    ];
    let _worker = spawn_ready_worker(&app, "room-first", &env).await;
    let parquet = s3_tasks_storage(&app, "copies", "parquet/", (&slow, &secrets)).await;
    let json_files = s3_tasks_storage(&app, "beside", "json/", (&direct, &secrets)).await;
    let parquet_run = app.start_sync(&parquet["id"]).await;
    eventually("the first copy's download", || {
        std::future::ready(proxy.reads().0 == 1)
    })
    .await;
    // Before, the JSON file waited for a read until the first copy ended.
    let json_run = app.start_sync(&json_files["id"]).await;
    let run = app.wait_run(&json_run, Duration::from_secs(30)).await;
    assert_eq!(run["counters"]["created"], 1, "{run}");
    assert_eq!(proxy.reads(), (1, 0), "the first copy's read, still held");
    proxy.release_reads();
    let run = app.wait_run(&parquet_run, Duration::from_secs(60)).await;
    assert_eq!(run["counters"]["created"], 120, "{run}");
    app.stop().await;
}

/// A copy that outgrows the size its object was listed at, where the spool
/// budget has no room free to grow into (here the budget is a megabyte and
/// the copy listed at one byte asks for one more), is made again with room
/// for twice what it had copied: the file imports, read twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_outgrows_its_room_is_made_again() {
    let fake = DatabricksFake::start().await;
    let files = tempfile::tempdir().expect("temporary directory");
    let path = files.path().join("file.parquet");
    write_parquet_with(&path, 10, 5, |i| format!("row {i}"));
    let body = Bytes::from(std::fs::read(&path).expect("read"));
    let volume = databricks_volume_with(&fake, "understated-rows.parquet", body).await;
    let mut options = AppOptions::with_storages();
    options.workers = false;
    let app = spawn_app(options).await;
    // A worker process of its own: the spool budget is one per process.
    let spool = (1 << 20).to_string();
    let _worker = spawn_ready_worker(&app, "outgrown", &[("LABELSYNC_SPOOL_BYTES", &spool)]).await;
    let created = databricks_tasks_storage(&app, "outgrown", volume).await;
    let reads = || {
        fake.requests()
            .iter()
            .filter(|r| r.contains("/fs/files/") && r.contains("understated-rows"))
            .count()
    };
    let before = reads();
    let run = app.sync(&created["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 10, "{run}");
    assert_eq!(reads() - before, 2, "{:?}", fake.requests());
    app.stop().await;
}

/// User-given endpoints may not reach private or metadata addresses unless
/// the server allows it, and secrets need the server's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_guarded_and_secrets_need_a_key() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let project = app.project("guarded").await;
    for endpoint in [
        "http://127.0.0.1:9000",
        "http://169.254.169.254/",
        "http://10.0.0.7",
        "http://[::1]:9000",
        "http://localhost:9000",
    ] {
        let (status, err) = app
            .post(
                "/api/v1/storages",
                json!({
                    "project_id": project, "role": "source", "backend": "s3",
                    "config": { "bucket": "b", "endpoint_url": endpoint },
                }),
            )
            .await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (400, Some("endpoint_not_allowed")),
            "{endpoint}: {err}"
        );
    }
    let (status, err) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "source", "backend": "redis",
                "config": { "host": "127.0.0.1" },
            }),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("endpoint_not_allowed")),
        "{err}"
    );
    // No LABELSYNC_SECRET_KEY on this server: secrets cannot be stored.
    let (status, err) = app
        .post("/api/v1/storages", json!({
            "project_id": project, "role": "source", "backend": "s3",
            "config": { "bucket": "b" }, "secrets": { "access_key_id": "AKIA", "secret_access_key": "s" },
        }))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("secrets_unavailable")),
        "{err}"
    );
    app.stop().await;
}

/// A local storage on `<root>/data`, with `root` as the document root.
async fn local_data_storage(
    root: &std::path::Path,
) -> std::sync::Arc<dyn labelsync::storage::Storage> {
    let env = labelsync::storage::StorageEnv {
        document_root: Some(root.to_owned()),
        ..labelsync_tests::backends::test_env()
    };
    labelsync::storage::open_with(
        BackendKind::Local,
        &json!({ "path": "data" }),
        &labelsync::storage::Secrets::default(),
        &env,
    )
    .await
    .unwrap()
}
