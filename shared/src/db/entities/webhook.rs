use sea_orm::entity::prelude::*;

/// An endpoint that receives signed events (see `db::webhooks`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "webhooks")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Events of this project only; `None`: of every project.
    pub project_id: Option<i64>,
    pub url: String,
    /// `,run.completed,run.failed,` (`,*,`: every event type).
    pub events: String,
    /// The signing secret, sealed under `LABELSYNC_SECRET_KEY`.
    pub secret: String,
    /// The secret a rotation replaced, sealed as `secret` is: deliveries
    /// are signed with both until `previous_secret_until`.
    pub previous_secret: Option<String>,
    pub previous_secret_until: Option<DateTimeUtc>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    /// Since when every attempt failed; `None` after a success.
    pub failing_since: Option<DateTimeUtc>,
    pub lease_owner: Option<String>,
    pub lease_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
