//! Claim-check objects: a payload too large for a Pub/Sub message is
//! stored in an object store under its SHA-256
//! ([`outbox_core::claim_check`]), through the `object_store` crate:
//! Google Cloud Storage (`gs://bucket/prefix`, with the credentials Pub/Sub
//! uses), a directory (`file:///path`) or memory (`memory://`).
//!
//! - [`Objects::put`] stores a payload once: a retry or a duplicate finds
//!   its object there and writes nothing.
//! - [`Objects::get`] fetches the payload a reference names, within a size
//!   limit, and hands it over only if its size and digest match.
//! - [`Objects::delete`] removes an object (retention); one already gone
//!   is not an error.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use outbox_core::claim_check::{ClaimCheckError, Deletion, Location, ObjectRefStore, Reference};
use outbox_core::store::StoreError;

/// Why an object operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The reference, the payload or the setting is wrong: retrying will
    /// not help.
    #[error(transparent)]
    Invalid(#[from] ClaimCheckError),
    /// The object a reference names does not exist.
    #[error("the object {0} does not exist")]
    Missing(String),
    /// The reference names an object in another store.
    #[error("the object {url} is not in this store ({store})")]
    ElsewhereStored { url: String, store: String },
    /// The store did not answer as it should (down, refused, timed out):
    /// worth retrying.
    #[error("the object store failed: {0}")]
    Unavailable(String),
}

/// One claim-check store.
#[derive(Clone, Debug)]
pub struct Objects {
    location: Location,
    store: Arc<dyn ObjectStore>,
}

impl Objects {
    /// Opens the store a setting names. A `file://` directory is created if
    /// missing; `gs://` reads Google's credentials from the environment
    /// (`GOOGLE_APPLICATION_CREDENTIALS`, or the metadata server).
    ///
    /// # Errors
    /// [`ObjectError::Unavailable`] when the store cannot be opened.
    pub fn open(location: &Location) -> Result<Self, ObjectError> {
        let unavailable = |e: &dyn std::fmt::Display| ObjectError::Unavailable(e.to_string());
        let store: Arc<dyn ObjectStore> = match location {
            Location::Gcs { bucket, .. } => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    // The default (30 s for a whole request) would refuse
                    // a 100 MiB object below about 3.5 MB/s; callers bound
                    // their own waits (`CLAIM_CHECK_TIMEOUT_SECONDS`).
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_timeout(std::time::Duration::from_secs(600)),
                    )
                    .build()
                    .map_err(|e| unavailable(&e))?,
            ),
            Location::File { path } => {
                std::fs::create_dir_all(path).map_err(|e| unavailable(&e))?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(path)
                        .map_err(|e| unavailable(&e))?,
                )
            }
            Location::Memory => Arc::new(object_store::memory::InMemory::new()),
        };
        Ok(Self {
            location: location.clone(),
            store,
        })
    }

    /// Over any `object_store` implementation (tests inject failures).
    pub fn with_store(location: Location, store: Arc<dyn ObjectStore>) -> Self {
        Self { location, store }
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    fn path(&self, sha256: &str) -> Path {
        Path::from(self.location.key(sha256))
    }

    /// Stores `payload` under its digest, unless an object of that name is
    /// there already (a retry, a duplicate, the same document twice), and
    /// returns the reference a message carries.
    ///
    /// # Errors
    /// [`ObjectError::Unavailable`] when the store fails.
    pub async fn put(&self, payload: Bytes) -> Result<Reference, ObjectError> {
        let reference = Reference::of(&self.location, &payload);
        let path = self.path(&reference.sha256);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from_bytes(payload), options)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(reference),
            Err(e) => Err(ObjectError::Unavailable(e.to_string())),
        }
    }

    /// The payload `reference` names, if it is at most `limit` bytes and
    /// matches the reference's size and digest.
    ///
    /// # Errors
    /// [`ObjectError::Invalid`] (too large, another size or digest),
    /// [`ObjectError::Missing`], [`ObjectError::ElsewhereStored`] or
    /// [`ObjectError::Unavailable`].
    pub async fn get(&self, reference: &Reference, limit: u64) -> Result<Bytes, ObjectError> {
        reference.check_size(limit)?;
        if self.location.object_url(&reference.sha256) != reference.url {
            return Err(ObjectError::ElsewhereStored {
                url: reference.url.clone(),
                store: self.location.url(),
            });
        }
        let path = self.path(&reference.sha256);
        let object = match self.store.get(&path).await {
            Ok(object) => object,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ObjectError::Missing(reference.url.clone()));
            }
            Err(e) => return Err(ObjectError::Unavailable(e.to_string())),
        };
        // Refused before it is read when the store says it is too large.
        if object.meta.size > limit {
            return Err(ClaimCheckError::TooLarge {
                bytes: object.meta.size,
                limit,
            }
            .into());
        }
        let payload = object
            .bytes()
            .await
            .map_err(|e| ObjectError::Unavailable(e.to_string()))?;
        reference.verify(&payload)?;
        Ok(payload)
    }

    /// Removes the object of `sha256`; one already gone is not an error.
    ///
    /// # Errors
    /// [`ObjectError::Unavailable`] when the store fails.
    pub async fn delete(&self, sha256: &str) -> Result<(), ObjectError> {
        match self.store.delete(&self.path(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(ObjectError::Unavailable(e.to_string())),
        }
    }

    /// Whether the object of `sha256` exists (a batch is visible only when
    /// every object it refers to does).
    ///
    /// # Errors
    /// [`ObjectError::Unavailable`] when the store fails.
    pub async fn exists(&self, sha256: &str) -> Result<bool, ObjectError> {
        match self.store.head(&self.path(sha256)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(ObjectError::Unavailable(e.to_string())),
        }
    }
}

/// The claim-check stores a process has opened, by URL: each opened once
/// (a `memory://` store is one per process, shared by all who name it).
#[derive(Clone, Default)]
pub struct Stores {
    opened: Arc<Mutex<HashMap<String, Objects>>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opened = self.opened.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_list().entries(opened.keys()).finish()
    }
}

impl Stores {
    /// The store at `location`, opened the first time it is asked for.
    ///
    /// # Errors
    /// [`ObjectError::Unavailable`] when it cannot be opened.
    pub fn open(&self, location: &Location) -> Result<Objects, ObjectError> {
        let url = location.url();
        let mut opened = self.opened.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(objects) = opened.get(&url) {
            return Ok(objects.clone());
        }
        let objects = Objects::open(location)?;
        opened.insert(url, objects.clone());
        Ok(objects)
    }

    /// Uses `objects` for its location (tests inject a store that fails).
    pub fn insert(&self, objects: Objects) {
        self.opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(objects.location().url(), objects);
    }

    /// Deletes the object a full URL names.
    ///
    /// # Errors
    /// [`ObjectError::Invalid`] for a URL that names no object, or the
    /// store's failure.
    pub async fn delete(&self, url: &str) -> Result<(), ObjectError> {
        let (location, sha256) = Location::of_object(url).ok_or_else(|| {
            ObjectError::Invalid(ClaimCheckError::BadReference(format!(
                "{url} names no claim-check object"
            )))
        })?;
        self.open(&location)?.delete(&sha256).await
    }
}

/// Retention's side of claim-check (and a writer's whose batch was not
/// stored): releases the references `removed` counts and deletes each object
/// none is left to; with `finish_stale` (retention) also finishes the
/// deletions begun over [`STALE_DELETION_MS`] ago that never ended (their
/// process died). Every
/// release is tried; returns how many objects were deleted, or the first
/// failure once all were tried (what failed keeps its object: kept, never
/// lost).
///
/// # Errors
/// The first store that failed.
pub async fn release_and_delete(
    refs: &dyn ObjectRefStore,
    stores: &Stores,
    removed: &BTreeMap<String, u64>,
    finish_stale: bool,
    now_ms: i64,
) -> Result<u64, ReleaseError> {
    let mut deleted = 0;
    let mut first_error = None;
    let mut deletions = Vec::new();
    for (url, count) in removed {
        match refs.release(url, *count).await {
            Ok(Some(deletion)) => deletions.push(deletion),
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(ReleaseError::from(e));
            }
        }
    }
    if finish_stale {
        match refs.being_deleted(now_ms - STALE_DELETION_MS).await {
            Ok(stale) => deletions.extend(stale),
            Err(e) => {
                first_error.get_or_insert(ReleaseError::from(e));
            }
        }
    }
    for deletion in deletions {
        match delete(refs, stores, &deletion).await {
            Ok(()) => deleted += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(deleted), Err)
}

/// Deletes the object of `deletion` within [`DELETE_TIMEOUT`], then ends
/// the deletion.
async fn delete(
    refs: &dyn ObjectRefStore,
    stores: &Stores,
    deletion: &Deletion,
) -> Result<(), ReleaseError> {
    let deleted = tokio::time::timeout(DELETE_TIMEOUT, stores.delete(&deletion.url))
        .await
        .map_err(|_| ObjectError::Unavailable(format!("deleting {} timed out", deletion.url)))
        .and_then(|deleted| deleted);
    match deleted {
        Ok(()) => refs.forget(deletion).await?,
        Err(e) => {
            // Kept rather than held: writers of this payload need not wait
            // for a store that may stay down.
            refs.abandon(deletion).await?;
            return Err(e.into());
        }
    }
    Ok(())
}

/// How long deleting one object may take: far less than
/// [`STALE_DELETION_MS`], so a pass never deletes an object after another
/// pass finished its deletion and a writer put it again.
pub const DELETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a deletion may stay begun before another pass finishes it: ten
/// times [`DELETE_TIMEOUT`], so two passes never delete one object.
pub const STALE_DELETION_MS: i64 = 10 * 60 * 1000;

/// Why [`release_and_delete`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Object(#[from] ObjectError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir() -> String {
        let dir = std::env::temp_dir().join(format!("outbox-claim-check-{}", uuid::Uuid::new_v4()));
        dir.to_string_lossy().into_owned()
    }

    async fn every_kind() -> Vec<Objects> {
        vec![
            Objects::open(&Location::Memory).unwrap(),
            Objects::open(&Location::parse(&format!("file://{}", scratch_dir())).unwrap()).unwrap(),
        ]
    }

    #[tokio::test]
    async fn a_payload_is_stored_once_and_comes_back_verified() {
        for objects in every_kind().await {
            let payload = Bytes::from(vec![7u8; 300_000]);
            let first = objects.put(payload.clone()).await.unwrap();
            let again = objects.put(payload.clone()).await.unwrap();
            assert_eq!(first, again, "a retry names the same object");
            assert_eq!(first.bytes, 300_000);
            assert!(objects.exists(&first.sha256).await.unwrap());
            assert_eq!(objects.get(&first, 1 << 20).await.unwrap(), payload);
        }
    }

    #[tokio::test]
    async fn a_changed_object_is_refused_not_handed_over() {
        let dir = scratch_dir();
        let location = Location::parse(&format!("file://{dir}")).unwrap();
        let objects = Objects::open(&location).unwrap();
        let reference = objects
            .put(Bytes::from_static(b"the invoice"))
            .await
            .unwrap();
        let file = std::path::Path::new(&dir).join(location.key(&reference.sha256));
        std::fs::write(&file, b"the invoicE").unwrap();
        assert!(matches!(
            objects.get(&reference, 1 << 20).await,
            Err(ObjectError::Invalid(ClaimCheckError::DigestMismatch { .. }))
        ));
        std::fs::write(&file, b"the invoice, longer").unwrap();
        assert!(matches!(
            objects.get(&reference, 1 << 20).await,
            Err(ObjectError::Invalid(ClaimCheckError::SizeMismatch { .. }))
        ));
    }

    #[tokio::test]
    async fn missing_too_large_and_foreign_objects_are_errors() {
        for objects in every_kind().await {
            let reference = Reference::of(objects.location(), b"never stored");
            assert!(matches!(
                objects.get(&reference, 100).await,
                Err(ObjectError::Missing(_))
            ));
            let stored = objects
                .put(Bytes::from_static(b"0123456789"))
                .await
                .unwrap();
            assert!(matches!(
                objects.get(&stored, 9).await,
                Err(ObjectError::Invalid(ClaimCheckError::TooLarge {
                    bytes: 10,
                    limit: 9
                }))
            ));
            let foreign = Reference {
                url: format!("gs://elsewhere/sha256/{}", stored.sha256),
                ..stored.clone()
            };
            assert!(matches!(
                objects.get(&foreign, 100).await,
                Err(ObjectError::ElsewhereStored { .. })
            ));
        }
    }

    #[tokio::test]
    async fn delete_removes_and_tolerates_an_object_already_gone() {
        for objects in every_kind().await {
            let reference = objects
                .put(Bytes::from_static(b"short-lived"))
                .await
                .unwrap();
            objects.delete(&reference.sha256).await.unwrap();
            assert!(!objects.exists(&reference.sha256).await.unwrap());
            objects.delete(&reference.sha256).await.unwrap();
            assert!(matches!(
                objects.get(&reference, 100).await,
                Err(ObjectError::Missing(_))
            ));
        }
    }
}
