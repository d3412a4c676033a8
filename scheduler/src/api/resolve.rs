//! `GET /api/v1/resolve?project_id=&uri=`: the bytes behind a task's URI.
//!
//! The URI only ever names an object of one of the project's own source
//! storages (matched by scheme and bucket / container / volume / local path);
//! anything else is a 404, so the endpoint cannot be turned into a fetcher of
//! arbitrary URLs. Storages with `presign` answer `303 See Other` to a signed
//! URL; the others (and backends that cannot sign: Databricks, local) are
//! proxied, one byte range at a time, with `ETag` / `If-None-Match`. Redis
//! has no URI scheme here: its `redis://` task URIs are `400 invalid_uri`.
use std::{sync::Arc, time::Duration};

use axum::{
    Extension,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use labelsync::{
    Error,
    db::entities::storage,
    storage::{BackendKind, ByteStream, GetRange, KeyShape, Object, Storage, check_key},
};
use opentelemetry::KeyValue;
use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::{
    ApiError, ApiQuery, ApiResult, AppState, Caller, projects, storage_cache::Source, streams::Slot,
};

/// `?project_id=&uri=` (unknown parameters are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveQuery {
    project_id: i64,
    uri: String,
}

/// What a task URI names.
#[derive(Debug, PartialEq)]
struct Target {
    kind: BackendKind,
    /// Bucket, container, `catalog/schema/volume`, or for local files the
    /// path relative to the document root.
    location: String,
    key: String,
}

const LOCAL_PREFIX: &str = "/data/local-files/?d=";

fn parse_uri(uri: &str) -> ApiResult<Target> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_uri",
            "uri",
            "uri must be s3://, gs://, azure-blob://, dbx://Volumes/<catalog>/<schema>/<volume>/... or /data/local-files/?d=...",
        )
    };
    if let Some(rel) = uri.strip_prefix(LOCAL_PREFIX) {
        let rel = percent_decode_str(rel)
            .decode_utf8()
            .map_err(|_| invalid())?
            .into_owned();
        let plain = std::path::Path::new(&rel)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if rel.is_empty() || !plain {
            return Err(ApiError::bad_request(
                "invalid_uri",
                "uri",
                "a local file path must be relative to the document root, without '..'",
            ));
        }
        check_key(&rel, KeyShape::Path)?;
        return Ok(Target {
            kind: BackendKind::Local,
            location: String::new(),
            key: rel,
        });
    }
    let (scheme, rest) = uri.split_once("://").ok_or_else(invalid)?;
    let kind = labelsync::storage::backend_of_scheme(scheme).ok_or_else(invalid)?;
    let (location, key) = labelsync::storage::backend(kind)
        .split_uri(rest)
        .ok_or_else(invalid)?;
    let key = key.to_owned();
    if location.is_empty() || key.is_empty() {
        return Err(invalid());
    }
    // Refused here, before any storage is looked up or contacted: a `..`
    // would otherwise leave the bucket or volume in the backend's URL.
    check_key(&key, kind.key_shape())?;
    Ok(Target {
        kind,
        location,
        key,
    })
}

/// The project's source storage for a URI, and the key within it. With
/// `confined` (a caller held to projects, whose tenants may share a bucket
/// under different prefixes) only a storage whose prefix holds the key
/// will do. The storages come from the cache (see `storage_cache`).
async fn find_storage(
    state: &AppState,
    project_id: i64,
    target: &Target,
    confined: bool,
) -> ApiResult<(Arc<[Source]>, usize, String)> {
    let sources = state
        .storage_cache
        .sources(&state.db, &state.storage_env, project_id, target.kind)
        .await?
        .ok_or_else(|| projects::missing(project_id))?;
    let mut found: Option<(usize, String)> = None;
    for (i, s) in sources.iter().enumerate() {
        let Some(location) = &s.location else {
            continue;
        };
        let Some(key) = key_within(target, location) else {
            continue;
        };
        // Prefer the storage whose prefix holds the key (several storages
        // may share a bucket); any storage of the bucket will do otherwise,
        // as tasks may point anywhere in their bucket.
        let holds = key.starts_with(&s.model.prefix);
        if holds || (found.is_none() && !confined) {
            found = Some((i, key));
            if holds {
                break;
            }
        }
    }
    let (i, key) = found
        .ok_or_else(|| ApiError::not_found("no source storage of this project holds that URI"))?;
    Ok((sources, i, key))
}

/// The target's key within a storage at `location`, when the storage holds
/// the target's location: the same bucket, or for local files a path under
/// the storage's directory.
fn key_within(target: &Target, location: &str) -> Option<String> {
    if target.kind == BackendKind::Local {
        if location.is_empty() {
            return Some(target.key.clone());
        }
        return target
            .key
            .strip_prefix(&format!("{location}/"))
            .map(str::to_owned);
    }
    (location == target.location).then(|| target.key.clone())
}

fn content_type_of(key: &str) -> &'static str {
    let ext = key.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("bmp") => "image/bmp",
        Some("tif" | "tiff") => "image/tiff",
        Some("svg") => "image/svg+xml",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        Some("wav") => "audio/wav",
        Some("ogg") => "audio/ogg",
        Some("flac") => "audio/flac",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("csv") => "text/csv",
        Some("pdf") => "application/pdf",
        _ => "application/octet-stream",
    }
}

fn header_value(value: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(value).ok()
}

/// What a resolve request did, for its metrics.
#[derive(Clone, Copy)]
struct Served {
    backend: &'static str,
    mode: &'static str,
}

pub async fn resolve(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<ResolveQuery>,
    headers: HeaderMap,
) -> Response {
    let mut served = Served {
        backend: "none",
        mode: "none",
    };
    let response = serve(&state, &caller, q, &headers, &mut served)
        .await
        .into_response();
    labelsync::metrics::metrics().resolve_requests.add(
        1,
        &[
            KeyValue::new("backend", served.backend),
            KeyValue::new("mode", served.mode),
            KeyValue::new("status", i64::from(response.status().as_u16())),
        ],
    );
    response
}

/// What a caller held to projects is told of a storage's refusal: its
/// status and code, not the storage's words, which can name the identity
/// the storage's credentials act as (an IAM role's ARN and its account, a
/// service account's email, an account's URL: an admin's or the server's
/// own, not the tenant's to see). The words go to the server's log.
fn told(err: ApiError, confined: bool) -> ApiError {
    if !confined {
        return err;
    }
    let said = match err.code {
        "not_found" => "the storage has no such object",
        "range_not_satisfiable" => "the storage refused the range asked for",
        "permission_denied" => "the storage refused to serve this object (permission denied)",
        "bad_credentials" => "the storage refused the credentials it was given",
        "storage_rejected" => "the storage rejected the request for this object",
        "storage_answer_too_big" => "the storage's answer was larger than this server takes",
        "unavailable" => "the storage (or the database) could not be reached; retry later",
        _ => return err,
    };
    tracing::warn!(code = err.code, error = %err.message, "a storage's refusal, told to a caller held to projects by its code");
    ApiError {
        message: format!("{said}; an admin can read why in the server's log"),
        ..err
    }
}

async fn serve(
    state: &AppState,
    caller: &Caller,
    q: ResolveQuery,
    headers: &HeaderMap,
    served: &mut Served,
) -> ApiResult<Response> {
    caller.check(q.project_id, || projects::missing(q.project_id))?;
    let target = parse_uri(&q.uri)?;
    ensure_local_serving(state, &target)?;
    let confined = caller.projects().is_some();
    let (sources, found, key) = find_storage(state, q.project_id, &target, confined).await?;
    served.backend = target.kind.as_str();
    from_storage(
        state,
        caller,
        &sources[found],
        &key,
        target.kind,
        headers,
        served,
    )
    .await
    .map_err(|err| told(err, confined))
}

/// The object `key` of a `kind` storage from `source`: a redirect to a
/// signed URL, or its body.
async fn from_storage(
    state: &AppState,
    caller: &Caller,
    source: &Source,
    key: &str,
    kind: BackendKind,
    headers: &HeaderMap,
    served: &mut Served,
) -> ApiResult<Response> {
    let model = &source.model;
    let backend = source.open(&state.storage_env).await?;
    if model.presign
        && let Some(resp) = redirect(state, model, &*backend, key).await?
    {
        served.mode = "redirect";
        return Ok(resp);
    }
    served.mode = "proxy";
    // Held until the body is sent (see `Streams::proxied`).
    let slot = state.proxied.open(caller)?;
    proxy(state, &*backend, key, kind, headers, slot).await
}

/// Refuses local-file URIs unless the server turned local serving on.
fn ensure_local_serving(state: &AppState, target: &Target) -> ApiResult<()> {
    if target.kind == BackendKind::Local && !state.settings.local_files_serving {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "local_files_serving_disabled",
            "serving local files is off; the server must set LOCAL_FILES_SERVING_ENABLED=true",
        ));
    }
    Ok(())
}

/// The `303 See Other` to a signed URL, or `None` when the backend cannot
/// sign (the caller proxies instead).
async fn redirect(
    state: &AppState,
    model: &storage::Model,
    backend: &dyn Storage,
    key: &str,
) -> ApiResult<Option<Response>> {
    let ttl = Duration::from_secs(u64::try_from(model.presign_ttl_seconds).unwrap_or(1))
        .min(state.settings.max_presign_ttl);
    let Some(url) = backend.presign(key, ttl).await? else {
        return Ok(None);
    };
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(location) = header_value(&url) {
        h.insert(header::LOCATION, location);
    }
    Ok(Some(resp))
}

/// The object's bytes (the requested range of them, capped), streamed from
/// the backend; `304` when the client's `If-None-Match` holds its ETag, `416`
/// when the range lies outside it.
async fn proxy(
    state: &AppState,
    backend: &dyn Storage,
    key: &str,
    kind: BackendKind,
    headers: &HeaderMap,
    slot: Slot,
) -> ApiResult<Response> {
    let range = requested_range(headers, state.settings.resolver_max_range);
    let Some((object, range)) = get_ranged(backend, key, range, headers).await? else {
        return unsatisfiable(backend, key, None).await;
    };
    let etag = quoted_etag(object.etag.as_deref());
    let not_modified = etag
        .as_deref()
        .is_some_and(|etag| if_none_match_holds(headers, etag));
    let content_type = content_type_for(object.content_type.as_deref(), key);

    let mut builder = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "private, max-age=300")
        // The object is whatever its bucket holds, served on the API's (and
        // the console's) origin: it must not be sniffed into a page.
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if may_run_script(&content_type) {
        // An HTML or SVG object opened directly must not run as a page of
        // this origin: sandboxed, it has a unique origin and no script.
        builder = builder.header(header::CONTENT_SECURITY_POLICY, "sandbox");
    }
    if let Some(etag) = &etag {
        builder = builder.header(header::ETAG, etag);
    }
    if not_modified {
        return Ok(builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(|e| Error::Internal(e.to_string()))?);
    }
    builder = builder.header(header::CONTENT_TYPE, content_type);
    let Some(builder) = with_status_and_length(builder, range, object.size) else {
        return unsatisfiable(backend, key, object.size).await;
    };
    Ok(builder
        .body(Body::from_stream(metered(object.body, kind, slot)))
        .map_err(|e| Error::Internal(e.to_string()))?)
}

/// The object's `range` (`None`: not satisfiable), or the whole object
/// when the request's `If-Range` does not hold: a client resuming a
/// download gets the new version whole, not its bytes spliced onto the old
/// one's, nor a 416 when the new one is shorter (RFC 9110, 13.1.5). Only
/// an entity tag equal to the object's holds: a date cannot, as no
/// `Last-Modified` is served.
async fn get_ranged(
    backend: &dyn Storage,
    key: &str,
    range: Option<GetRange>,
    headers: &HeaderMap,
) -> ApiResult<Option<(Object, Option<GetRange>)>> {
    let if_range = headers.get(header::IF_RANGE);
    let got = match range {
        Some(range) if range.past_any_object() => None,
        _ => match backend.get(key, range).await {
            Ok(object) => Some(object),
            Err(Error::Invalid {
                code: "range_not_satisfiable",
                ..
            }) => None,
            Err(e) => return Err(e.into()),
        },
    };
    // A range answered without the object's size (`Content-Range: bytes
    // 0-9/*`) cannot go out as one: the object is served whole instead,
    // as a server may always answer a range (a 200 of the range's bytes
    // alone passed for the whole object). The backends do not say whether
    // such an answer was the range or the whole (a 200 of unknown length):
    // that costs the latter a second GET, its first answer dropped after
    // its head.
    if range.is_some() && got.as_ref().is_some_and(|object| object.size.is_none()) {
        drop(got);
        return Ok(Some((backend.get(key, None).await?, None)));
    }
    let Some(if_range) = if_range.filter(|_| range.is_some()) else {
        return Ok(got.map(|object| (object, range)));
    };
    match got {
        Some(object) if if_range_holds(if_range, &object) => Ok(Some((object, range))),
        Some(object) => {
            drop(object); // another version than the client's
            Ok(Some((backend.get(key, None).await?, None)))
        }
        None => {
            // The range lies outside this version: the client's, a 416;
            // another, whole.
            let whole = backend.get(key, None).await?;
            Ok((!if_range_holds(if_range, &whole)).then_some((whole, None)))
        }
    }
}

/// Whether an `If-Range` value is the object's own (strong) entity tag.
fn if_range_holds(if_range: &HeaderValue, object: &Object) -> bool {
    let etag = quoted_etag(object.etag.as_deref());
    etag.is_some_and(|etag| if_range.to_str().is_ok_and(|v| v.trim() == etag))
}

/// Whether a browser opening an object of `content_type` directly could
/// run its script: anything but raster images, audio, video and PDF
/// (which a sandbox would keep Chromium's viewer from showing).
fn may_run_script(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let passive = (essence.starts_with("image/") && !essence.contains("svg"))
        || essence.starts_with("audio/")
        || essence.starts_with("video/")
        || essence == "application/pdf";
    !passive
}

/// The request's `Range`, when it parses, capped to `max` bytes.
fn requested_range(headers: &HeaderMap, max: u64) -> Option<GetRange> {
    headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(GetRange::parse)
        .map(|r| r.cap(max))
}

/// The backend's ETag as a quoted HTTP entity tag.
fn quoted_etag(etag: Option<&str>) -> Option<String> {
    etag.map(|e| format!("\"{}\"", e.trim_matches('"')))
}

/// Whether the request's `If-None-Match` names `etag` (or `*`), by the
/// weak comparison RFC 9110 (13.1.2) asks for: `W/"x"` matches `"x"` (a
/// proxy that compressed the object may have weakened the tag it got).
fn if_none_match_holds(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|inm| inm.split(',').any(|t| t.trim() == "*" || opaque(t) == etag))
}

/// An entity tag without its weakness: `W/"x"` and `"x"` are both `"x"`.
fn opaque(tag: &str) -> &str {
    let tag = tag.trim();
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The backend's content type, unless it says nothing useful; else the one
/// the key's extension suggests.
fn content_type_for(stored: Option<&str>, key: &str) -> String {
    stored
        .filter(|ct| *ct != "application/octet-stream" && is_one_type(ct))
        .map_or_else(|| content_type_of(key).to_owned(), str::to_owned)
}

/// Whether `ct` is one plain `type/subtype`, with parameters of printable
/// ASCII and no comma. A browser reads a list of types and takes the last
/// (`video/mp4, text/html` is a page), while [`may_run_script`] judges
/// the first: a stored type is passed on only when both read the same one.
fn is_one_type(ct: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let (essence, params) = ct.split_once(';').unwrap_or((ct, ""));
    essence
        .split_once('/')
        .is_some_and(|(kind, sub)| token(kind) && token(sub))
        && params
            .bytes()
            .all(|b| b != b',' && (b == b'\t' || (0x20..0x7f).contains(&b)))
}

/// Status `206` with `Content-Range` for a range, else `200`, and
/// `Content-Length` when the size is known; `None` when the range lies
/// outside an object of known size.
fn with_status_and_length(
    builder: axum::http::response::Builder,
    range: Option<GetRange>,
    size: Option<u64>,
) -> Option<axum::http::response::Builder> {
    Some(match (range, size) {
        (Some(range), Some(size)) => {
            let (start, end) = range.resolve(size)?;
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
                .header(header::CONTENT_LENGTH, end - start + 1)
        }
        (None, Some(size)) => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, size),
        (_, None) => builder.status(StatusCode::OK),
    })
}

/// The body, counting its bytes into `resolve_bytes` as they go out. A
/// stream that fails mid-way ends the connection with an error: the client
/// never mistakes a cut-off body for a whole one.
fn metered(
    body: ByteStream,
    kind: BackendKind,
    slot: Slot,
) -> impl futures::Stream<Item = std::io::Result<axum::body::Bytes>> + Send + 'static {
    let backend_label = KeyValue::new("backend", kind.as_str());
    body.inspect(move |chunk| {
        let _held = &slot; // given back when the body ends or is dropped
        if let Ok(bytes) = chunk {
            labelsync::metrics::metrics()
                .resolve_bytes
                .add(bytes.len() as u64, std::slice::from_ref(&backend_label));
        }
    })
}

/// The 416 answer, with `Content-Range: bytes */<size>` (RFC 9110
/// §14.4) so a player can retry within the object. Backends do not say the
/// size when they refuse a range; it is asked for with a plain read whose
/// body is dropped unread (a rare answer, worth one more request).
async fn unsatisfiable(backend: &dyn Storage, key: &str, size: Option<u64>) -> ApiResult<Response> {
    let size = match size {
        Some(size) => Some(size),
        None => backend.get(key, None).await?.size,
    };
    let mut resp = ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
        "the requested range is outside the object",
    )
    .into_response();
    if let Some(range) = size.and_then(|size| header_value(&format!("bytes */{size}"))) {
        resp.headers_mut().insert(header::CONTENT_RANGE, range);
    }
    Ok(resp)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_passive_media_go_unsandboxed() {
        for passive in [
            "image/jpeg",
            "IMAGE/PNG",
            "video/mp4",
            "audio/ogg",
            "application/pdf",
        ] {
            assert!(!may_run_script(passive), "{passive}");
        }
        for active in [
            "text/html; charset=utf-8",
            "image/svg+xml",
            "application/xhtml+xml",
            "text/xml",
            "application/octet-stream",
            "",
        ] {
            assert!(may_run_script(active), "{active}");
        }
    }

    #[test]
    fn parses_uris() {
        let t = parse_uri("s3://bucket/dir/a b.jpg").unwrap();
        assert_eq!(
            (t.kind, t.location.as_str(), t.key.as_str()),
            (BackendKind::S3, "bucket", "dir/a b.jpg")
        );
        let t = parse_uri("dbx://Volumes/main/raw/images/x/y.png").unwrap();
        assert_eq!(
            (t.location.as_str(), t.key.as_str()),
            ("main/raw/images", "x/y.png")
        );
        let t = parse_uri("/data/local-files/?d=data/sp%20ace.jpg").unwrap();
        assert_eq!(
            (t.kind, t.key.as_str()),
            (BackendKind::Local, "data/sp ace.jpg")
        );
        for bad in [
            "http://169.254.169.254/latest",
            "s3://bucket",
            "s3:///key",
            "/data/local-files/?d=../etc/passwd",
            "/data/local-files/?d=%2e%2e/etc/passwd",
            "/data/local-files/?d=/etc/passwd",
            "dbx://Volumes/a/b",
            "file:///etc/passwd",
            "dbx://Volumes/c/s/v/../../../../api/2.0/preview/scim/v2/Me",
            "dbx://Volumes/c/s/v/%2e%2e/other/secret.csv",
            "dbx://Volumes/c/s/v/a//b.csv",
            "s3://bucket/a/../../b",
            "gs://bucket/./a",
            "azure-blob://container/a/%2E%2E/b",
            "/data/local-files/?d=media/a%00.jpg",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
