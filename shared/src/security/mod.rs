//! Guards on user-supplied locations and secrets:
//! - [`paths`]: local storages stay inside the document root, whatever `..` or
//!   symlinks they contain;
//! - [`net`]: the SSRF guard on endpoints and hosts;
//! - [`secrets`]: storage secrets encrypted at rest.
pub mod net;
pub mod paths;
pub mod secrets;
