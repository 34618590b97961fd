//! Claim-checked items: a message whose payload is in an object store
//! carries `claim_check_url`, `claim_check_sha256` and `claim_check_bytes`
//! in place of it. The consumer fetches the object, checks its size and
//! digest, and hands the item over with its payload, as if it had come
//! inline; anything else (a store it may not read, a missing object, a
//! payload over the limit, another digest) is an error: the item is not
//! handed over, and its message comes again.

use outbox_claim_check::{Objects, Stores};
use outbox_core::claim_check::{ClaimCheckError, Location};
use serde_json::Value;

use crate::item::Item;

/// Resolves claim-checked items, from the stores it is allowed to read and
/// within a size limit.
#[derive(Clone, Debug)]
pub struct ClaimCheckResolver {
    stores: Stores,
    allowed: Vec<Location>,
    limit: u64,
}

impl ClaimCheckResolver {
    /// Resolves payloads of at most `limit` bytes, from no store yet (see
    /// [`ClaimCheckResolver::allow`]).
    pub fn new(limit: u64) -> Self {
        Self {
            stores: Stores::default(),
            allowed: Vec::new(),
            limit,
        }
    }

    /// Also reads the store at `url` (`gs://bucket/prefix`, `file:///path`,
    /// `memory://`): the streams' `claim_check.url` or the writers'
    /// `CLAIM_CHECK_URL`. A reference to any other store is refused, so a
    /// message cannot make the consumer read where it should not.
    ///
    /// # Errors
    /// A URL that names no supported store.
    pub fn allow(mut self, url: &str) -> Result<Self, ClaimCheckError> {
        self.allowed.push(Location::parse(url)?);
        Ok(self)
    }

    /// Reads `objects` for its location (tests: a `memory://` store shared
    /// with the writer in the same process).
    #[must_use]
    pub fn with_objects(mut self, objects: Objects) -> Self {
        self.allowed.push(objects.location().clone());
        self.stores.insert(objects);
        self
    }

    /// Puts the payload of a claim-checked `item` in place; an item with its
    /// payload inline is left as it is.
    ///
    /// # Errors
    /// Why the payload cannot be handed over.
    pub async fn resolve(&self, item: &mut Item) -> Result<(), String> {
        let reference = match &item.claim_check {
            None => return Ok(()),
            Some(Err(malformed)) => return Err(format!("claim-check reference: {malformed}")),
            Some(Ok(reference)) => reference,
        };
        let refused = |why: String| format!("claim-check {}: {why}", reference.url);
        let (location, _) = Location::of_object(&reference.url)
            .ok_or_else(|| refused("names no object".to_owned()))?;
        if !self.allowed.contains(&location) {
            return Err(refused(format!(
                "the store {} is not one this consumer reads (ClaimCheckResolver::allow)",
                location.url()
            )));
        }
        let objects = self
            .stores
            .open(&location)
            .map_err(|e| refused(e.to_string()))?;
        let payload = objects
            .get(reference, self.limit)
            .await
            .map_err(|e| refused(e.to_string()))?;
        let payload: Value = serde_json::from_slice(&payload)
            .map_err(|e| refused(format!("the object is not JSON: {e}")))?;
        if !payload.is_object() {
            return Err(refused("the object is not a JSON object".to_owned()));
        }
        item.payload = payload;
        Ok(())
    }
}
