//! The head loop on the hub: train a head from the clinicians' labels, score it on labelled
//! records it did not see, and publish it signed for devices.
//!
//! Training is `dermedge head train`'s: [`dermedge_head::train`] with its default options, one
//! class per record (softmax), the classes being the current labels of one label set (one head's
//! labels, or labels of whole records). The held-out records are chosen per class by a hash of
//! the record id, so a retrain on the same labels holds out the same records, and every class
//! kept has records on both sides. A class with too few labelled records is left out and named.

use std::collections::BTreeMap;

use dermedge_head::{check_name, eval, LinearHead, Targets, TrainOptions};
use dermedge_record::HubKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Draft, LabelledEmbedding, NewHead, Store, StoredHead};
use crate::HubError;

/// A class needs this many labelled records: at least one to train on and one to hold out.
pub const MIN_RECORDS_PER_CLASS: usize = 2;
/// The share of each class's records held out for the evaluation (at least one).
pub const HELDOUT_SHARE: f64 = 0.25;
/// The most labelled records the page trains on (at 6144 dimensions, about 0.5 GB as f32);
/// larger sets are for `dermedge head train` on an export.
pub const MAX_TRAINING_RECORDS: usize = 20_000;
/// Fewer held-out records than this, and the page says the scores are too few to judge by.
pub const MIN_HELDOUT_TO_JUDGE: i64 = 20;
/// What to train.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainRequest {
    pub name: String,
    pub model_id: String,
    /// The labels' head; `None` for labels of whole records.
    pub label_set: Option<String>,
}

/// A trained head's scores on its held-out records, as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub classes: Vec<String>,
    /// Records per class used for training, in `classes` order.
    pub train_counts: Vec<usize>,
    /// Records per class held out, in `classes` order.
    pub heldout_counts: Vec<usize>,
    /// Classes left out for too few records: `(label, records)`.
    pub left_out: Vec<(String, usize)>,
    /// On the held-out records.
    pub heldout: eval::Evaluation,
}

/// Where a record falls in its class's order for the split: the first bytes of its id's SHA-256.
fn rank(record_id: &str) -> u64 {
    let digest = Sha256::digest(record_id.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The split: per class, the records with the lowest hash ranks are held out.
struct Split {
    classes: Vec<String>,
    train: (Vec<Vec<f32>>, Vec<usize>),
    heldout: (Vec<Vec<f32>>, Vec<usize>),
    train_counts: Vec<usize>,
    heldout_counts: Vec<usize>,
    left_out: Vec<(String, usize)>,
}

fn split(records: Vec<LabelledEmbedding>) -> Split {
    let mut by_class: BTreeMap<String, Vec<LabelledEmbedding>> = BTreeMap::new();
    for r in records {
        by_class.entry(r.label.clone()).or_default().push(r);
    }
    let mut s = Split {
        classes: Vec::new(),
        train: (Vec::new(), Vec::new()),
        heldout: (Vec::new(), Vec::new()),
        train_counts: Vec::new(),
        heldout_counts: Vec::new(),
        left_out: Vec::new(),
    };
    for (label, mut members) in by_class {
        if members.len() < MIN_RECORDS_PER_CLASS {
            s.left_out.push((label, members.len()));
            continue;
        }
        let c = s.classes.len();
        s.classes.push(label);
        members.sort_by_cached_key(|m| (rank(&m.record_id), m.record_id.clone()));
        let held =
            ((members.len() as f64 * HELDOUT_SHARE).round() as usize).clamp(1, members.len() - 1);
        s.heldout_counts.push(held);
        s.train_counts.push(members.len() - held);
        for (i, m) in members.into_iter().enumerate() {
            let side = if i < held {
                &mut s.heldout
            } else {
                &mut s.train
            };
            side.0.push(m.values);
            side.1.push(c);
        }
    }
    s
}

/// A label set's records, as training takes them: at most [`MAX_TRAINING_RECORDS`], all of one
/// dimension. Database work.
pub fn load_training_set(
    store: &Store,
    request: &TrainRequest,
) -> Result<Vec<LabelledEmbedding>, HubError> {
    check_name(&request.name).map_err(HubError::BadRequest)?;
    let records = store.labelled_embeddings(
        &request.model_id,
        request.label_set.as_deref(),
        MAX_TRAINING_RECORDS + 1,
    )?;
    if records.len() > MAX_TRAINING_RECORDS {
        return Err(HubError::BadRequest(format!(
            "the {} on records of {} are more than {MAX_TRAINING_RECORDS}: train with `dermedge \
             head train` on an export instead",
            set_name(request),
            request.model_id
        )));
    }
    let dims: std::collections::BTreeSet<usize> = records.iter().map(|r| r.values.len()).collect();
    if dims.len() > 1 {
        return Err(HubError::BadRequest(format!(
            "the {} on {} records have embeddings of several dimensions ({dims:?})",
            set_name(request),
            request.model_id
        )));
    }
    Ok(records)
}

fn set_name(request: &TrainRequest) -> String {
    match &request.label_set {
        Some(h) => format!("labels of head {h:?}"),
        None => "labels of whole records".to_string(),
    }
}

/// A head trained on `records` and its scores on the ones held out. CPU work only: minutes for
/// the largest sets, so the page runs it off the database's threads, one at a time.
pub fn train_and_score(
    request: &TrainRequest,
    records: Vec<LabelledEmbedding>,
) -> Result<(LinearHead, Evaluation), HubError> {
    let s = split(records);
    if s.classes.len() < 2 {
        return Err(HubError::BadRequest(format!(
            "{} on records of {}: {} classes with at least {MIN_RECORDS_PER_CLASS} labelled \
             records each, a head needs 2 (left out: {})",
            set_name(request),
            request.model_id,
            s.classes.len(),
            describe_left_out(&s.left_out)
        )));
    }
    let head = dermedge_head::train(
        &request.name,
        &request.model_id,
        &s.train.0,
        &Targets::Single(s.train.1.clone()),
        s.classes.clone(),
        &TrainOptions::default(),
        &mut |_, _| {},
    )
    .map_err(|e| HubError::BadRequest(e.to_string()))?;
    let heldout = eval::evaluate(&head, &s.heldout.0, &Targets::Single(s.heldout.1.clone()))
        .map_err(|e| HubError::BadRequest(e.to_string()))?;
    Ok((
        head,
        Evaluation {
            classes: s.classes,
            train_counts: s.train_counts,
            heldout_counts: s.heldout_counts,
            left_out: s.left_out,
            heldout,
        },
    ))
}

/// Keep a trained head as a draft, signed by `hub_key` as one it trained; its id.
pub fn keep_draft(
    store: &Store,
    hub_key: &HubKey,
    request: &TrainRequest,
    head: &LinearHead,
    evaluation: &Evaluation,
    by: &str,
    now_ms: i64,
) -> Result<i64, HubError> {
    let evaluation_json = serde_json::to_string(evaluation).expect("serialisable");
    let head_json = serde_json::to_string(head).expect("serialisable");
    let draft_signature = dermedge_sync::wire::sign_draft(hub_key, &head_json);
    let train_records: usize = evaluation.train_counts.iter().sum();
    let heldout_records: usize = evaluation.heldout_counts.iter().sum();
    let id = store.add_head(&NewHead {
        name: &request.name,
        model_id: &request.model_id,
        embedding_dim: head.embedding_dim as i64,
        label_set: request.label_set.as_deref(),
        trained_at_ms: now_ms,
        trained_by: by,
        train_records: train_records as i64,
        heldout_records: heldout_records as i64,
        evaluation_json: &evaluation_json,
        head_json: &head_json,
        draft_signature: &draft_signature,
    })?;
    log::info!(
        "hub: {by} trained head {id} {:?} for {} from {}: {} classes, {} records, held-out \
         accuracy {:.3}",
        request.name,
        request.model_id,
        set_name(request),
        evaluation.classes.len(),
        train_records + heldout_records,
        evaluation.heldout.accuracy
    );
    Ok(id)
}

/// Load, train, score and keep as a draft in one go; the draft's id and evaluation.
pub fn train_from_labels(
    store: &Store,
    hub_key: &HubKey,
    request: &TrainRequest,
    by: &str,
    now_ms: i64,
) -> Result<(i64, Evaluation), HubError> {
    let records = load_training_set(store, request)?;
    let (head, evaluation) = train_and_score(request, records)?;
    let id = keep_draft(store, hub_key, request, &head, &evaluation, by, now_ms)?;
    Ok((id, evaluation))
}

fn describe_left_out(left_out: &[(String, usize)]) -> String {
    if left_out.is_empty() {
        return "none".into();
    }
    left_out
        .iter()
        .map(|(label, n)| format!("{label:?} with {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The head a draft holds, numbered `version` and signed with `hub_key`: the blob devices
/// receive. Refused unless the draft carries this hub's signature over the head as trained.
pub fn sign_publication(hub_key: &HubKey, draft: &Draft, version: u64) -> Result<Vec<u8>, String> {
    let id = draft.head.id;
    if !dermedge_sync::wire::verify_draft(
        &hub_key.public(),
        &draft.head_json,
        &draft.draft_signature,
    ) {
        return Err(format!(
            "head {id} is not the head this hub trained (its stored weights were changed): \
             it cannot be published"
        ));
    }
    let mut head: LinearHead = serde_json::from_str(&draft.head_json)
        .map_err(|e| format!("head {id}: stored head is not readable: {e}"))?;
    head.validate()
        .map_err(|e| format!("head {id}: stored head is not valid: {e}"))?;
    head.version = Some(version);
    Ok(dermedge_sync::wire::seal_head(hub_key, &head))
}

/// Publish draft `id`, signed with `hub_key`; its version.
pub fn publish(
    store: &Store,
    hub_key: &HubKey,
    id: i64,
    by: &str,
    now_ms: i64,
) -> Result<u64, HubError> {
    store.publish_head(id, by, now_ms, |draft, version| {
        sign_publication(hub_key, draft, version)
    })
}

/// A stored head's evaluation, for the page.
pub fn evaluation(stored: &StoredHead) -> Option<Evaluation> {
    serde_json::from_str(&stored.evaluation_json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(id: &str, label: &str, v: f32) -> LabelledEmbedding {
        LabelledEmbedding {
            record_id: id.into(),
            label: label.into(),
            values: vec![v, 1.0],
        }
    }

    #[test]
    fn each_class_has_records_on_both_sides_and_small_classes_are_named() {
        let mut records = Vec::new();
        for i in 0..8 {
            records.push(labelled(&format!("a{i}"), "melanoma", 1.0));
        }
        for i in 0..2 {
            records.push(labelled(&format!("b{i}"), "naevus", -1.0));
        }
        records.push(labelled("c0", "odd one", 0.0));
        let s = split(records.clone());
        assert_eq!(s.classes, ["melanoma", "naevus"]);
        assert_eq!(s.heldout_counts, [2, 1]);
        assert_eq!(s.train_counts, [6, 1]);
        assert_eq!(s.left_out, [("odd one".to_string(), 1)]);
        // The same labels hold out the same records, whatever order they come in.
        records.reverse();
        let again = split(records);
        assert_eq!(again.heldout.1, s.heldout.1);
        assert_eq!(again.heldout.0, s.heldout.0);
    }
}
