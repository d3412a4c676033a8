//! The exported annotation: one JSON object per annotation, in the shape of
//! Label Studio's annotation export, so pipelines reading Label Studio's
//! target storages read ours unchanged.
use serde_json::{Value, json};

use crate::db::entities::{annotation, task};

/// The bytes written for an annotation. Deterministic (object keys sorted,
/// no time of export), so an unchanged annotation hashes the same.
pub fn annotation_json(a: &annotation::Model, task: Option<&task::Model>) -> Vec<u8> {
    let task = task.map_or(json!({ "id": a.task_id }), |t| {
        json!({
            "id": t.id,
            "data": t.data,
            "meta": t.meta.clone().unwrap_or_else(|| json!({})),
            "created_at": t.created_at,
            "updated_at": t.updated_at,
        })
    });
    let value = json!({
        "id": a.id,
        "result": a.result,
        "task": task,
        "project": a.project_id,
        "completed_by": a.completed_by.clone().unwrap_or(Value::Null),
        "created_at": a.created_at,
        "updated_at": a.updated_at,
        "lead_time": a.lead_time,
        "was_cancelled": a.was_cancelled,
        "ground_truth": a.ground_truth,
    });
    serde_json::to_vec(&value).unwrap_or_default()
}

/// SHA-256 of the exported bytes, hex.
pub fn content_hash(body: &[u8]) -> String {
    crate::security::sha256_hex(&[body])
}
