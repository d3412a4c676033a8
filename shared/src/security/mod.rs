//! Guards on user-supplied locations and secrets:
//! - [`paths`]: local storages stay inside the document root, whatever `..` or
//!   symlinks they contain;
//! - [`net`]: the SSRF guard on endpoints and hosts;
//! - [`secrets`]: storage secrets encrypted at rest.
pub mod net;
pub mod paths;
pub mod secrets;
pub mod tokens;

/// The SHA-256 of `parts` (fed in order), in lowercase hex: how a caller's
/// token and a request are remembered without keeping them.
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    hex(ctx.finish().as_ref())
}

/// `bytes` in lowercase hex, into one string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
