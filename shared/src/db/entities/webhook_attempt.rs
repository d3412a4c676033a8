use sea_orm::entity::prelude::*;

/// One HTTP attempt of a delivery.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "webhook_attempts")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub delivery_id: i64,
    pub started_at: DateTimeUtc,
    pub status_code: Option<i32>,
    /// The first KB of the answer.
    pub response_body: Option<String>,
    /// Why no answer came (timeout, refused, refused by the SSRF guard).
    pub error: Option<String>,
    pub duration_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
