use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "annotations")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub task_id: i64,
    pub project_id: i64,
    #[sea_orm(column_type = "JsonBinary")]
    pub result: Json,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub completed_by: Option<Json>,
    pub lead_time: Option<f64>,
    pub was_cancelled: bool,
    pub ground_truth: bool,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
