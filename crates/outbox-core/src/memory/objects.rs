//! The in-memory model's claim-check references (`ObjectRefStore`): a count
//! per object and when its deletion began, as `claim_check_objects`
//! keeps them in MongoDB.

use std::time::Duration;

use async_trait::async_trait;

use super::MemoryStore;
use crate::claim_check::{Deletion, ObjectRefStore};
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

    async fn release(&self, url: &str, count: u64) -> Result<Option<Deletion>, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        // Never pinned, or being deleted: nothing to do, as in MongoDB.
        let Some(entry) = state
            .objects
            .get_mut(url)
            .filter(|(_, marked)| marked.is_none())
        else {
            return Ok(None);
        };
        entry.0 = entry.0.saturating_sub(count);
        if entry.0 > 0 {
            return Ok(None);
        }
        let marked_ms = crate::world::now().timestamp_millis();
        entry.1 = Some(marked_ms);
        Ok(Some(Deletion {
            url: url.to_owned(),
            marked_ms,
        }))
    }

    async fn being_deleted(&self, marked_before_ms: i64) -> Result<Vec<Deletion>, StoreError> {
        self.check_available()?;
        Ok(self
            .lock()
            .objects
            .iter()
            .filter_map(|(url, (_, marked))| {
                marked
                    .filter(|at| *at < marked_before_ms)
                    .map(|marked_ms| Deletion {
                        url: url.clone(),
                        marked_ms,
                    })
            })
            .collect())
    }

    async fn forget(&self, deletion: &Deletion) -> Result<(), StoreError> {
        self.end_deletion(deletion, false)
    }

    async fn abandon(&self, deletion: &Deletion) -> Result<(), StoreError> {
        self.end_deletion(deletion, true)
    }
}

impl MemoryStore {
    fn end_deletion(&self, deletion: &Deletion, keep: bool) -> Result<(), StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        let entry = state
            .objects
            .get_mut(&deletion.url)
            .filter(|(_, marked)| *marked == Some(deletion.marked_ms));
        match entry {
            Some(entry) if keep => entry.1 = None,
            Some(_) => {
                state.objects.remove(&deletion.url);
            }
            None => {}
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
        assert_eq!(store.release(url, 1).await.unwrap(), None, "never pinned");
        store.pin(url, 2, later()).await.unwrap();
        assert_eq!(
            store.release(url, 1).await.unwrap(),
            None,
            "one reference left"
        );
        let deletion = store
            .release(url, 1)
            .await
            .unwrap()
            .expect("the last one went");
        let after = deletion.marked_ms + 1;
        assert_eq!(
            store.being_deleted(after).await.unwrap(),
            vec![deletion.clone()]
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
        // Another deletion's end does not end this one.
        let other = Deletion {
            marked_ms: deletion.marked_ms - 1,
            ..deletion.clone()
        };
        store.forget(&other).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!pinning.is_finished());
        store.forget(&deletion).await.unwrap();
        pinning.await.unwrap().unwrap();
        assert!(store.being_deleted(i64::MAX).await.unwrap().is_empty());
        // Without the deletion ending, a pin gives up at its deadline; a
        // deletion abandoned (the store failed) lets pins in again.
        let deletion = store.release(url, 1).await.unwrap().unwrap();
        assert!(store.pin(url, 1, later()).await.is_err());
        store.abandon(&deletion).await.unwrap();
        store.pin(url, 1, later()).await.unwrap();
        assert!(store.being_deleted(i64::MAX).await.unwrap().is_empty());
    }
}
