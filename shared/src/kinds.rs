//! The names shared by every layer: what kind of run a run is, and which
//! backend a storage uses. They label metrics, fill database columns and pick
//! storage modules, so they sit below all three; what a backend *does* lives
//! in `storage`.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What a run does: `import` (a source sync) or `export` (a target sync or
/// annotation events). `Delete` is a name the API's filter accepts; no run
/// of that kind is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    Import,
    Export,
    Delete,
}

impl RunKind {
    pub const ALL: [RunKind; 3] = [RunKind::Import, RunKind::Export, RunKind::Delete];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Import => "import",
            RunKind::Export => "export",
            RunKind::Delete => "delete",
        }
    }
}

/// The six backends, by the name the API uses (`backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    S3,
    Gcs,
    Azure,
    Redis,
    Local,
    Databricks,
}

impl BackendKind {
    pub const ALL: [BackendKind; 6] = [
        BackendKind::S3,
        BackendKind::Gcs,
        BackendKind::Azure,
        BackendKind::Redis,
        BackendKind::Local,
        BackendKind::Databricks,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::S3 => "s3",
            BackendKind::Gcs => "gcs",
            BackendKind::Azure => "azure",
            BackendKind::Redis => "redis",
            BackendKind::Local => "local",
            BackendKind::Databricks => "databricks",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == s).ok_or_else(|| {
            Error::invalid(
                "unknown_backend",
                Some("backend"),
                format!("unknown backend {s:?}; expected one of s3, gcs, azure, redis, local, databricks"),
            )
        })
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
