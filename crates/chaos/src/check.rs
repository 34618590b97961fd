//! The invariants checked after every scenario, as counts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};

use crate::stack::{Accepted, Consumer, item_ids};

/// What held and what did not. Every count but `duplicates` must be 0.
#[derive(Debug, Default, Clone)]
pub struct Invariants {
    pub batches: usize,
    pub items: usize,
    /// Items of a 201 batch never delivered.
    pub lost: usize,
    /// Delivered items no 201 batch holds.
    pub unexpected: usize,
    /// First deliveries out of (batch_sequence, item_sequence) order, or
    /// of a batch before the one before it was whole (the consumer crate's
    /// verifier).
    pub out_of_order: usize,
    /// Deliveries beyond the first (allowed: delivery is at least once).
    pub duplicates: usize,
    /// Stored items not `sent`, or with a publish_id no delivery had.
    pub bad_marks: usize,
    /// Stored batches not committed.
    pub uncommitted: usize,
    /// Missing numbers in the stored batch_sequence.
    pub sequence_gaps: usize,
    /// Stored batches whose items are not all there.
    pub half_stored: usize,
    /// Marks or commits written under an epoch older than one already
    /// written before them: a replica wrote after it was superseded.
    pub stale_epoch_writes: usize,
}

impl Invariants {
    /// Adds another stream's counts.
    pub fn add(&mut self, other: &Self) {
        self.batches += other.batches;
        self.items += other.items;
        self.lost += other.lost;
        self.unexpected += other.unexpected;
        self.out_of_order += other.out_of_order;
        self.duplicates += other.duplicates;
        self.bad_marks += other.bad_marks;
        self.uncommitted += other.uncommitted;
        self.sequence_gaps += other.sequence_gaps;
        self.half_stored += other.half_stored;
        self.stale_epoch_writes += other.stale_epoch_writes;
    }

    pub fn held(&self) -> bool {
        self.lost
            + self.unexpected
            + self.out_of_order
            + self.bad_marks
            + self.uncommitted
            + self.sequence_gaps
            + self.half_stored
            + self.stale_epoch_writes
            == 0
    }
}

fn number(value: Option<&Bson>) -> Option<i64> {
    match value? {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(n) => Some(*n as i64),
        _ => None,
    }
}

async fn all(
    db: &mongodb::Database,
    collection: &str,
    filter: Document,
    sort: Document,
) -> anyhow::Result<Vec<Document>> {
    Ok(db
        .collection::<Document>(collection)
        .find(filter)
        .projection(doc! { "request_data": 0, "vendor_counts": 0 })
        .sort(sort)
        .await?
        .try_collect()
        .await?)
}

/// Waits (bounded) for every stored batch to be committed, then checks.
///
/// # Errors
/// When MongoDB cannot be read.
pub async fn check(
    db: &mongodb::Database,
    accepted: &[Accepted],
    consumer: &Consumer,
) -> anyhow::Result<Invariants> {
    check_stream(db, "default", accepted, consumer).await
}

/// [`check`] of one stream, whose messages `consumer` receives.
///
/// # Errors
/// When MongoDB cannot be read.
pub async fn check_stream(
    db: &mongodb::Database,
    stream: &str,
    accepted: &[Accepted],
    consumer: &Consumer,
) -> anyhow::Result<Invariants> {
    // The default stream's batches have no `stream` field.
    let of_stream = if stream == "default" {
        doc! { "stream": null }
    } else {
        doc! { "stream": stream }
    };
    let batches_collection = db.collection::<Document>("batches");
    let _ = crate::cluster::eventually(Duration::from_secs(60), "every batch committed", || {
        let mut filter = of_stream.clone();
        filter.insert("status", doc! { "$ne": "committed" });
        let pending = batches_collection.count_documents(filter);
        async move { pending.await.is_ok_and(|n| n == 0) }
    })
    .await;
    // A stored publish_id may be a republished copy still on its way.
    let batch_ids: Vec<String> = all(
        db,
        "batches",
        of_stream.clone(),
        doc! { "batch_sequence": 1 },
    )
    .await?
    .iter()
    .filter_map(|b| b.get_str("batch_id").ok().map(str::to_owned))
    .collect();
    let of_batches = doc! { "batch_id": { "$in": &batch_ids } };
    let items_collection = db.collection::<Document>("batch_items");
    let _ = crate::cluster::eventually(
        Duration::from_secs(30),
        "every stored publish_id delivered",
        || {
            let cursor = items_collection
                .find(of_batches.clone())
                .projection(doc! { "publish_id": 1 });
            async move {
                let Ok(cursor) = cursor.await else {
                    return false;
                };
                let Ok(items): Result<Vec<Document>, _> = cursor.try_collect().await else {
                    return false;
                };
                let ids: HashSet<String> = consumer
                    .snapshot()
                    .into_iter()
                    .map(|d| d.message_id)
                    .collect();
                items
                    .iter()
                    .all(|i| i.get_str("publish_id").is_ok_and(|p| ids.contains(p)))
            }
        },
    )
    .await;
    let deliveries = consumer.snapshot();
    let deliveries = deliveries.as_slice();
    let expected = item_ids(accepted);
    let mut invariants = Invariants {
        batches: accepted.len(),
        items: expected.len(),
        ..Invariants::default()
    };

    // Order and duplicates as a consumer sees them: the consumer crate's
    // verifier (docs/CONSUMING.md), the code `outboxctl tail --verify` and
    // applications run.
    let mut verifier = outbox_consumer::Verifier::new(outbox_consumer::Contract::Global);
    let mut seen = HashSet::new();
    let mut message_ids: HashMap<&str, HashSet<&str>> = HashMap::new();
    for delivery in deliveries {
        message_ids
            .entry(&delivery.item_id)
            .or_default()
            .insert(&delivery.message_id);
        match &delivery.item {
            Some(item) => {
                verifier.observe(item);
            }
            None => invariants.unexpected += 1,
        }
        if seen.insert(delivery.item_id.as_str()) && !expected.contains_key(&delivery.item_id) {
            invariants.unexpected += 1;
        }
    }
    let report = verifier.report();
    invariants.duplicates = usize::try_from(report.duplicates).unwrap_or(usize::MAX);
    invariants.out_of_order =
        usize::try_from(report.out_of_order + report.interleaved).unwrap_or(usize::MAX);
    invariants.lost = expected
        .keys()
        .filter(|id| !seen.contains(id.as_str()))
        .count();

    let batches = all(db, "batches", of_stream, doc! { "batch_sequence": 1 }).await?;
    let items = all(
        db,
        "batch_items",
        of_batches,
        doc! { "batch_sequence": 1, "item_sequence": 1 },
    )
    .await?;
    let mut per_batch: HashMap<String, i64> = HashMap::new();
    for item in &items {
        *per_batch
            .entry(item.get_str("batch_id").unwrap_or_default().to_owned())
            .or_default() += 1;
        let id = item.get_str("item_id").unwrap_or_default();
        let sent = item.get_str("status") == Ok("sent");
        let publish_id = item.get_str("publish_id").unwrap_or_default();
        if !sent
            || !message_ids
                .get(id)
                .is_some_and(|ids| ids.contains(publish_id))
        {
            invariants.bad_marks += 1;
        }
    }
    let mut previous_sequence = 0;
    let mut last_commit_epoch = 0;
    for batch in &batches {
        let sequence = number(batch.get("batch_sequence")).unwrap_or(0);
        invariants.sequence_gaps += usize::try_from(sequence - previous_sequence - 1).unwrap_or(0);
        previous_sequence = sequence;
        if batch.get_str("status") != Ok("committed") {
            invariants.uncommitted += 1;
        }
        let batch_id = batch.get_str("batch_id").unwrap_or_default();
        if per_batch.get(batch_id).copied().unwrap_or(0)
            != number(batch.get("total_items")).unwrap_or(-1)
        {
            invariants.half_stored += 1;
        }
        if let Some(epoch) = number(batch.get("committed_epoch")) {
            if epoch < last_commit_epoch {
                invariants.stale_epoch_writes += 1;
            }
            last_commit_epoch = last_commit_epoch.max(epoch);
        }
    }
    // Marks are written in (batch, item) order, one writer at a time: an
    // older epoch after a newer one means a superseded leader wrote.
    let mut last_mark_epoch = 0;
    for item in &items {
        if let Some(epoch) = number(item.get("sent_epoch")) {
            if epoch < last_mark_epoch {
                invariants.stale_epoch_writes += 1;
            }
            last_mark_epoch = last_mark_epoch.max(epoch);
        }
    }
    Ok(invariants)
}
