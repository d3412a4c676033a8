//! # Layout
//! The scheduler: the HTTP API for upstream apps and ops (`api`, one module per
//! resource), the server lifecycle (`app`: migrations, queue, in-process
//! workers in embedded mode) and the command line (`cli`: `serve`, `migrate`,
//! and the one-shot `sync --spec FILE`; `token_cli` for `token ...`) and the
//! periodic-sync ticker (`periodic`).
pub mod api;
pub mod app;
pub mod cli;
pub mod console;
pub mod periodic;
pub mod token_cli;
