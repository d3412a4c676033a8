use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "storages")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub project_id: i64,
    pub role: String,
    pub backend: String,
    pub title: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub config: Json,
    /// Encrypted secrets JSON; never serialized into a response.
    pub secrets: Option<String>,
    /// Names (not values) of the secrets that are set.
    #[sea_orm(column_type = "JsonBinary")]
    pub secrets_set: Json,
    pub prefix: String,
    pub regex_filter: Option<String>,
    pub recursive: bool,
    pub import_method: String,
    pub presign: bool,
    pub presign_ttl_seconds: i64,
    pub can_delete_objects: bool,
    /// Sources: re-read objects whose etag changed (Tasks mode updates their tasks).
    pub reimport_changed: bool,
    /// Sources: what a complete listing does with the tasks of objects gone
    /// (`keep`, `flag`, `delete_unlabeled`; see `storage::spec::OnMissing`).
    pub on_missing: String,
    pub sync_interval_seconds: Option<i64>,
    pub next_sync_at: Option<DateTimeUtc>,
    /// Set while the periodic syncs are paused (`POST /storages/{id}/pause`):
    /// the scheduler's tick skips the storage; a manual sync still runs.
    pub schedule_paused_at: Option<DateTimeUtc>,
    /// When `POST /storages/{id}/validate` last checked the storage, and
    /// what was wrong then (`None`: it answered as expected).
    pub validated_at: Option<DateTimeUtc>,
    pub validation_error: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

/// Only for reads that take a storage with its project in one statement
/// (`db::runs::owners`); the key itself is the schema's (migrations).
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::project::Entity",
        from = "Column::ProjectId",
        to = "super::project::Column::Id"
    )]
    Project,
}

impl Related<super::project::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Project.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
