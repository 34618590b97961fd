//! The streams as the writer sees them: each definition read from the store
//! at most once a second (a stream defined or changed takes effect within a
//! second, without a restart), its schema compiled once per change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::publish::OrderingKeyMode;
use outbox_core::store::{StoreError, StreamStore};
use outbox_core::stream::{ItemSchema, PoisonPolicy, StreamDefinition, StreamName};
use tokio::time::Instant;

/// How long a definition read from the store is used.
const FRESH_FOR: Duration = Duration::from_secs(1);
/// The most names the cache keeps: every defined stream fits (the relay's
/// `MAX_STREAMS` is 1,000 by default); names asked for that are not defined
/// are cached only while there is room, so a client asking for random names
/// cannot grow the writer's memory.
const CACHE_CAPACITY: usize = 4096;

/// A stream, ready for ingest.
pub struct Stream {
    pub definition: StreamDefinition,
    pub schema: Option<Arc<ItemSchema>>,
    /// Why the stored schema does not compile (it was stored some other way
    /// than through the admin API, which compiles it first): the stream
    /// takes nothing until it is fixed (503), rather than everything.
    pub schema_error: Option<String>,
}

/// When a definition was read, and what was read (`None`: no such stream).
type Cached = (Instant, Option<Arc<Stream>>);

/// The definitions, cached.
pub struct Catalog {
    store: Arc<dyn StreamStore>,
    cache: Mutex<HashMap<StreamName, Cached>>,
}

impl Catalog {
    pub fn new(store: Arc<dyn StreamStore>) -> Self {
        Self {
            store,
            cache: Mutex::default(),
        }
    }

    /// The names of the streams defined (for a 404's suggestion); empty
    /// when the store cannot say.
    pub async fn names(&self) -> Vec<String> {
        self.store
            .streams()
            .await
            .map(|all| all.into_iter().map(|d| d.name.to_string()).collect())
            .unwrap_or_default()
    }

    /// The stream, `None` when it is not defined. The default stream always
    /// exists: as stored when it was defined, else without schema or writers.
    ///
    /// # Errors
    /// The store's, when it cannot be read and nothing is cached.
    pub async fn get(&self, name: &StreamName) -> Result<Option<Arc<Stream>>, StoreError> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned();
        if let Some((at, stream)) = &cached
            && at.elapsed() < FRESH_FOR
        {
            return Ok(stream.clone());
        }
        let stored = match self.store.stream(name).await {
            Ok(stored) => stored,
            // A stale definition beats a refusal while the store is away.
            Err(error) => return cached.map(|(_, s)| s).ok_or(error),
        };
        let definition = match stored {
            Some(definition) => Some(definition),
            None if name.is_default() => Some(StreamDefinition {
                name: name.clone(),
                topic: "default".to_owned(),
                ordering: OrderingKeyMode::Global,
                on_poison: PoisonPolicy::Halt,
                schema: None,
                writers: None,
                created_at: None,
                updated_at: None,
                claim_check: None,
            }),
            None => None,
        };
        // Compile the schema again only when the definition changed.
        let stream = match (definition, cached.and_then(|(_, s)| s)) {
            (None, _) => None,
            (Some(definition), Some(previous)) if previous.definition == definition => {
                Some(previous)
            }
            (Some(definition), _) => {
                let (schema, schema_error) = match definition.compile_schema() {
                    Ok(schema) => (schema, None),
                    Err(error) => {
                        tracing::error!(message = "a stored schema does not compile; the stream takes nothing until it is fixed", stream = %name, %error);
                        (None, Some(error.to_string()))
                    }
                };
                Some(Arc::new(Stream {
                    definition,
                    schema,
                    schema_error,
                }))
            }
        };
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHE_CAPACITY && !cache.contains_key(name) {
            // Names of no stream go first, then anything not read lately.
            cache.retain(|_, (at, stream)| stream.is_some() && at.elapsed() < FRESH_FOR * 60);
        }
        if stream.is_some() || cache.len() < CACHE_CAPACITY {
            cache.insert(name.clone(), (Instant::now(), stream.clone()));
        }
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use outbox_core::memory::MemoryStore;

    use super::*;

    #[tokio::test]
    async fn names_of_no_stream_never_grow_the_cache_past_its_capacity() {
        let catalog = Catalog::new(Arc::new(MemoryStore::new()));
        for n in 0..CACHE_CAPACITY + 500 {
            let name: StreamName = format!("nope-{n}").parse().unwrap();
            assert!(catalog.get(&name).await.unwrap().is_none());
        }
        let size = catalog.cache.lock().unwrap().len();
        assert!(size <= CACHE_CAPACITY, "{size}");
        // The default stream is still answered.
        assert!(
            catalog
                .get(&StreamName::default_stream())
                .await
                .unwrap()
                .is_some()
        );
    }
}
