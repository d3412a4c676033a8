//! Table definitions, one module per table (see `migrations/` for the DDL).
//! No behaviour here: queries live in `db::runs`, `db::links` and the pipelines.
pub mod annotation;
pub mod api_token;
pub mod audit_event;
pub mod export_link;
pub mod export_outbox;
pub mod idempotency_key;
pub mod import_link;
pub mod object_error;
pub mod partial_object;
pub mod prediction;
pub mod project;
pub mod storage;
pub mod sync_batch;
pub mod sync_partition;
pub mod sync_run;
pub mod task;
pub mod webhook;
pub mod webhook_attempt;
pub mod webhook_delivery;
pub mod webhook_event;
pub mod worker;
