//! The in-memory model's claim-check references (`ObjectRefStore`): a count
//! per object and a flag while it is being deleted, as `claim_check_objects`
//! keeps them in MongoDB.

use std::time::Duration;

use async_trait::async_trait;

use super::MemoryStore;
use crate::claim_check::ObjectRefStore;
use crate::store::StoreError;

/// How often a pin looks again at an object being deleted.
const PIN_POLL: Duration = Duration::from_millis(20);

#[async_trait]
impl ObjectRefStore for MemoryStore {
    async fn pin(
        &self,
        url: &str,
        count: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        loop {
            self.check_available()?;
            {
                let mut state = self.lock();
                let entry = state.objects.entry(url.to_owned()).or_default();
                if entry.1.is_none() {
                    entry.0 += count;
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() + PIN_POLL > deadline {
                return Err(StoreError::Unavailable(format!(
                    "the claim-check object {url} is being deleted"
                )));
            }
            tokio::time::sleep(PIN_POLL).await;
        }
    }

    async fn unpin(&self, url: &str, count: u64) -> Result<(), StoreError> {
        self.check_available()?;
        if let Some(entry) = self.lock().objects.get_mut(url) {
            entry.0 = entry.0.saturating_sub(count);
        }
        Ok(())
    }

    async fn release(&self, url: &str, count: u64) -> Result<bool, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        let entry = state.objects.entry(url.to_owned()).or_default();
        entry.0 = entry.0.saturating_sub(count);
        if entry.0 == 0 && entry.1.is_none() {
            entry.1 = Some(crate::world::now().timestamp_millis());
            return Ok(true);
        }
        Ok(false)
    }

    async fn being_deleted(&self, marked_before_ms: i64) -> Result<Vec<String>, StoreError> {
        self.check_available()?;
        Ok(self
            .lock()
            .objects
            .iter()
            .filter(|(_, (_, marked))| marked.is_some_and(|at| at < marked_before_ms))
            .map(|(url, _)| url.clone())
            .collect())
    }

    async fn forget(&self, url: &str) -> Result<(), StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        if state
            .objects
            .get(url)
            .is_some_and(|(_, marked)| marked.is_some())
        {
            state.objects.remove(url);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_object_is_deleted_only_when_no_reference_is_left_and_a_pin_waits_for_it() {
        let store = MemoryStore::new();
        let url = "file:///objects/sha256/ab";
        let later = || tokio::time::Instant::now() + Duration::from_secs(1);
        store.pin(url, 2, later()).await.unwrap();
        assert!(!store.release(url, 1).await.unwrap(), "one reference left");
        assert!(store.release(url, 1).await.unwrap(), "the last one went");
        let after = crate::world::now().timestamp_millis() + 1;
        assert_eq!(
            store.being_deleted(after).await.unwrap(),
            vec![url.to_owned()]
        );
        assert!(
            store
                .being_deleted(after - 60_000)
                .await
                .unwrap()
                .is_empty()
        );
        // A writer that comes now waits until the object is gone.
        let pinning = tokio::spawn({
            let store = store.clone();
            async move { store.pin(url, 1, later()).await }
        });
        tokio::task::yield_now().await;
        assert!(!pinning.is_finished());
        store.forget(url).await.unwrap();
        pinning.await.unwrap().unwrap();
        assert!(store.being_deleted(i64::MAX).await.unwrap().is_empty());
        assert!(!store.release(url, 0).await.unwrap(), "pinned again");
        // Without the deletion ending, a pin gives up at its deadline.
        assert!(store.release(url, 1).await.unwrap());
        assert!(store.pin(url, 1, later()).await.is_err());
    }
}
