//! What S3's error codes and HTTP statuses mean for a caller: one table
//! for the SDK's errors and the signed GETs' (`signed_get`).
use crate::Error;

/// The error an S3 error `code` and HTTP `status` (0: no answer) stand
/// for, with `msg`; `None` when neither says (a transient failure unless
/// the caller knows better).
pub(super) fn by_code(code: &str, status: u16, msg: &str) -> Option<Error> {
    let msg = msg.to_owned();
    Some(match (code, status) {
        (
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "InvalidToken"
            | "TokenRefreshRequired"
            | "AuthorizationHeaderMalformed",
            _,
        ) => Error::Unauthenticated(msg),
        ("NoSuchBucket" | "NoSuchKey" | "NotFound", _) | (_, 404) => Error::NotFound(msg),
        // The bucket is in another region than the storage's `region`:
        // asking again will not help.
        ("PermanentRedirect", _) | (_, 301) => {
            Error::invalid("storage_rejected", Some("config.region"), msg)
        }
        ("AccessDenied" | "AllAccessDisabled", _) | (_, 403) => Error::PermissionDenied(msg),
        ("InvalidRange", _) | (_, 416) => {
            Error::invalid("range_not_satisfiable", Some("range"), msg)
        }
        (_, 400..=499) if status != 408 && status != 429 => {
            Error::invalid("storage_rejected", None, msg)
        }
        _ => return None,
    })
}
