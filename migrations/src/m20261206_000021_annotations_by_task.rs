//! An index on `annotations (task_id, id)`: a task's annotations are read a
//! page at a time in id order (`GET /tasks/{id}`, `GET
//! /tasks/{id}/annotations`), and with only `(task_id)` each page sorted
//! all of the task's annotations first.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .table("annotations")
                .name("annotations_task_id")
                .col("task_id")
                .col("id")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .table("annotations")
                .name("annotations_task_id")
                .to_owned(),
        )
        .await
    }
}
