//! Claim-check on the writer's side: which store a stream's large payloads
//! go to, and putting them there before the batch is stored.
//!
//! The order is what makes a batch visible only when every object it refers
//! to exists: pin each object (count the references the batch will make, so
//! retention cannot delete it meanwhile), put it, and only then run the
//! batch's transaction. A writer that dies between the object and the batch
//! leaves an object no batch refers to and a pin that keeps it: harmless
//! (its name is its digest, so the same payload sent again reuses it), only
//! storage.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use bytes::Bytes;
use outbox_claim_check::Stores;
use outbox_core::claim_check::{self, ClaimCheck, ObjectRefStore};
use outbox_core::ingest::ClaimCheckRules;
use outbox_core::model::NewBatch;
use outbox_core::stream::StreamDefinition;
use outbox_service::problem::Problem;
use tracing::warn;

/// The writer's claim-check settings and stores.
pub struct ClaimChecks {
    /// `CLAIM_CHECK_URL` and `CLAIM_CHECK_ABOVE_BYTES`: the setting of every
    /// stream without its own.
    pub default: Option<ClaimCheck>,
    /// `MAX_ITEM_BYTES`: the largest payload a store takes.
    pub max_item_bytes: u64,
    /// How long a batch's objects may take to store.
    pub timeout: Duration,
    pub stores: Stores,
    pub refs: Arc<dyn ObjectRefStore>,
}

/// The references a batch's items make, by object URL: pinned before the
/// objects are put, taken back if the batch is not stored.
#[derive(Debug, Default)]
pub struct Pinned(BTreeMap<String, u64>);

impl Pinned {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn unavailable(detail: impl std::fmt::Display) -> Problem {
    warn!(message = "claim-check store unavailable", %detail);
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "claim_check_unavailable",
        format!("the claim-check store did not take the batch's large items ({detail}); nothing was stored, retry"),
    )
    .with_retry_after(5)
}

impl ClaimChecks {
    /// The rules a stream's items are stored by: its own setting, else the
    /// default; `None` without either.
    ///
    /// # Errors
    /// A stored setting that does not parse (503: an operator must fix it).
    pub fn rules_for(
        &self,
        definition: &StreamDefinition,
    ) -> Result<Option<ClaimCheckRules>, Problem> {
        let Some(setting) = definition.claim_check.as_ref().or(self.default.as_ref()) else {
            return Ok(None);
        };
        let location = setting.validate().map_err(|e| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "claim_check_unavailable",
                format!(
                    "stream {}'s claim-check setting is not usable: {e}",
                    definition.name
                ),
            )
        })?;
        Ok(Some(ClaimCheckRules {
            setting: setting.clone(),
            location,
            max_item_bytes: self.max_item_bytes,
        }))
    }

    /// The largest body a stream with a store takes: one item of
    /// `MAX_ITEM_BYTES` and its batch's framing.
    pub fn max_body_bytes(&self, plain: usize) -> usize {
        plain.max(usize::try_from(self.max_item_bytes).unwrap_or(usize::MAX) + (1 << 20))
    }

    /// Puts every stored item's payload in its store, after pinning it, and
    /// empties the item: from here on the batch carries references only.
    /// Objects go one at a time, each serialized when it is put, so the
    /// writer holds one payload's text at once.
    ///
    /// # Errors
    /// 503 `claim_check_unavailable` when a pin or a put fails or the
    /// store does not answer in time; what was pinned is taken back.
    pub async fn store_payloads(&self, batch: &mut NewBatch) -> Result<Pinned, Problem> {
        let mut wanted = BTreeMap::<String, u64>::new();
        for item in &batch.items {
            if let Some(stored) = &item.stored {
                *wanted.entry(stored.reference.url.clone()).or_default() += 1;
            }
        }
        if wanted.is_empty() {
            return Ok(Pinned::default());
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pinned = Pinned::default();
        let result = async {
            for (url, count) in &wanted {
                self.refs
                    .pin(url, *count, deadline)
                    .await
                    .map_err(unavailable)?;
                pinned.0.insert(url.clone(), *count);
            }
            for item in &mut batch.items {
                let Some(stored) = &item.stored else {
                    continue;
                };
                let location = claim_check::Location::of_object(&stored.reference.url)
                    .map(|(location, _)| location)
                    .ok_or_else(Problem::internal)?;
                let objects = self.stores.open(&location).map_err(unavailable)?;
                let text = Bytes::from(claim_check::payload_text(&item.request_data));
                item.request_data = serde_json::Map::new();
                let put = tokio::time::timeout_at(deadline, objects.put(text))
                    .await
                    .map_err(|_| unavailable(format!("no answer within {:?}", self.timeout)))?;
                let reference = put.map_err(unavailable)?;
                if reference != stored.reference {
                    // The text put is not the one digested: never refer to it.
                    return Err(Problem::internal());
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(pinned),
            Err(problem) => {
                self.unpin(pinned).await;
                Err(problem)
            }
        }
    }

    /// Gives back the references of a batch that was not stored: an object
    /// no one else refers to is deleted, as retention would (best effort: a
    /// reference left behind only keeps its object).
    pub async fn unpin(&self, pinned: Pinned) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Err(error) = outbox_claim_check::release_and_delete(
            self.refs.as_ref(),
            &self.stores,
            &pinned.0,
            false,
            now_ms,
        )
        .await
        {
            warn!(message = "a claim-check reference could not be given back; its object is kept", %error);
        }
    }
}
