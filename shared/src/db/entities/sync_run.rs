use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "sync_runs")]
pub struct Model {
    /// A ULID: sortable by creation time, so "newest first" is `ORDER BY id DESC`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub storage_id: i64,
    pub kind: String,
    pub status: String,
    pub listed: i64,
    pub matched: i64,
    pub created: i64,
    pub existed: i64,
    pub failed: i64,
    pub exported: i64,
    pub unchanged: i64,
    /// Export runs: exported objects deleted; import runs: tasks deleted
    /// because their objects are gone (`on_missing: delete_unlabeled`).
    pub deleted: i64,
    pub bytes: i64,
    /// Objects linked before but not listed by this run.
    pub missing: i64,
    /// Objects listed with another etag than when they were imported.
    pub changed: i64,
    /// Import runs: tasks kept although every object row they came from is
    /// gone (annotated, or a link still present), with `on_missing:
    /// delete_unlabeled`.
    pub kept: i64,
    /// Import runs: some part of the listing could not be read (an
    /// unreadable directory), so what the run did not list may still be
    /// there; it deletes no task (`on_missing: delete_unlabeled` flags only).
    pub listing_incomplete: bool,
    /// Where a resumed run continues listing (the last key it committed).
    pub cursor: Option<String>,
    pub attempts: i64,
    pub error: Option<String>,
    pub queued_at: DateTimeUtc,
    pub started_at: Option<DateTimeUtc>,
    pub heartbeat_at: Option<DateTimeUtc>,
    pub finished_at: Option<DateTimeUtc>,
    /// The attempt holding the run (a token per attempt), and its heartbeat.
    pub lease_owner: Option<String>,
    pub lease_at: Option<DateTimeUtc>,
    /// `full` (every annotation / object), `events` (an export run that
    /// only drains the storage's outbox) or `retry` (an import run that reads
    /// again only the objects `retry_of` failed on).
    pub scope: String,
    /// The project of the run's storage (a storage never changes project),
    /// kept on the run for the per-project admission cap.
    pub project_id: i64,
    /// When the run was let onto the queue; `None` while a `queued` run is
    /// *held*: waiting in the database for its project's turn (see
    /// `db::admission`).
    pub admitted_at: Option<DateTimeUtc>,
    /// A `retry` run: the run whose failed objects it reads again.
    pub retry_of: Option<String>,
    /// The OpenTelemetry trace the run was created in (32 hex digits), when
    /// tracing is on: the job its creator pushes continues that trace (a
    /// held run's job is pushed later, in its admitter's trace).
    pub trace_id: Option<String>,
}

/// Only for reads that take a run with its storage (and its project) in
/// one statement (`db::runs::with_owners`); the key itself is the
/// schema's (migrations).
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::storage::Entity",
        from = "Column::StorageId",
        to = "super::storage::Column::Id"
    )]
    Storage,
}

impl Related<super::storage::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Storage.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
