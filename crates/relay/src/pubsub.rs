//! Google Cloud Pub/Sub through Google's official client: the
//! [`Publisher`] the relay drains through, and topic and subscription
//! set-up for development.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{
    BasePublisher, Publisher as GooglePublisher, Subscriber, SubscriptionAdmin, TopicAdmin,
};
use google_cloud_pubsub::error::PublishError as GooglePublishError;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::retry_policy::RetryableErrors;
use outbox_core::publish::{OutboxMessage, PublishError, PublishFuture, Publisher};

/// Where Pub/Sub is and which topic to publish to.
#[derive(Clone, Debug)]
pub struct PubSubConfig {
    pub project_id: String,
    pub topic: String,
    /// `HOST:PORT` of Google's emulator; plain HTTP and no credentials.
    pub emulator_host: Option<String>,
    /// A regional (locational) endpoint such as
    /// `https://us-east1-pubsub.googleapis.com`, with the usual credentials:
    /// Pub/Sub orders a key's messages only among those published in one
    /// region. `None`: the global endpoint.
    pub endpoint: Option<String>,
    /// How long the client retries one publish before reporting it failed.
    /// The relay then re-reads MongoDB and publishes again, so this only
    /// bounds how long a failure takes to surface.
    pub publish_retry_limit: Duration,
    /// How long the client waits to fill a request before sending it.
    pub batch_delay: Duration,
}

impl PubSubConfig {
    pub fn topic_path(&self) -> String {
        self.topic_path_of(&self.topic)
    }

    pub fn topic_path_of(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.project_id)
    }

    pub fn subscription_path(&self, subscription: &str) -> String {
        format!("projects/{}/subscriptions/{subscription}", self.project_id)
    }

    /// The same service, another topic.
    #[must_use]
    pub fn for_topic(&self, topic: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            ..self.clone()
        }
    }
}

/// Applies the emulator endpoint and anonymous credentials, or a regional
/// endpoint with the default credentials, to any of the client builders,
/// which share these setters but no trait.
macro_rules! configured {
    ($builder:expr, $config:expr) => {{
        outbox_consumer::install_crypto_provider();
        let mut builder = $builder;
        if let Some(host) = &$config.emulator_host {
            builder = builder
                .with_endpoint(format!("http://{host}"))
                .with_credentials(
                    google_cloud_auth::credentials::anonymous::Builder::new().build(),
                );
        } else if let Some(endpoint) = &$config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        builder
    }};
}

/// Requests are filled up to Pub/Sub's own limits (1,000 messages, 10 MB
/// a request), less room for the request's framing: with an ordering key
/// the client sends one request at a time per key, so a page travels in
/// as few round trips as the service allows.
const REQUEST_MESSAGES: u32 = 1000;
const REQUEST_BYTES: u32 = 9_000_000;

/// After this many distinct ordering keys, a publisher is replaced by a
/// new one at the next moment nothing is in flight: Google's client keeps
/// a task and its buffers for every key it has seen, for its whole life
/// (googleapis/google-cloud-rust#4012), so one key per batch (`batch`
/// mode) or per value (`field:`) would grow without bound.
pub const MAX_KEYS_PER_PUBLISHER: usize = 1024;

/// One connection to Pub/Sub, shared by the publishers of every topic: one
/// publisher per topic, whatever the number of streams on it.
#[derive(Clone)]
pub struct PubSubClient {
    base: BasePublisher,
    config: PubSubConfig,
    max_keys: usize,
    topics: Arc<std::sync::Mutex<HashMap<String, Arc<dyn Publisher>>>>,
}

impl PubSubClient {
    /// # Errors
    /// When the client cannot be built (bad endpoint, no credentials).
    pub async fn connect(config: &PubSubConfig) -> anyhow::Result<Self> {
        let builder = BasePublisher::builder()
            .with_retry_policy(RetryableErrors.with_time_limit(config.publish_retry_limit));
        let base = configured!(builder, config).build().await?;
        Ok(Self {
            base,
            config: config.clone(),
            max_keys: MAX_KEYS_PER_PUBLISHER,
            topics: Arc::default(),
        })
    }

    /// Replaces a publisher after this many ordering keys (see
    /// [`MAX_KEYS_PER_PUBLISHER`]).
    #[must_use]
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// A publisher on `topic` (a name in the configured project).
    pub fn publisher(&self, topic: &str) -> PubSubPublisher {
        let path = self.config.topic_path_of(topic);
        let inner = self.build(&path);
        PubSubPublisher {
            base: self.clone(),
            max_keys: self.max_keys,
            topic_path: path,
            state: Arc::new(std::sync::Mutex::new(PublisherState {
                inner,
                keys: HashSet::new(),
                generation: 0,
            })),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn build(&self, topic_path: &str) -> GooglePublisher {
        self.base
            .publisher(topic_path.to_owned())
            .set_message_count_threshold(REQUEST_MESSAGES)
            .set_byte_threshold(REQUEST_BYTES)
            .set_delay_threshold(self.config.batch_delay)
            .build()
    }

    pub fn config(&self) -> &PubSubConfig {
        &self.config
    }
}

struct PublisherState {
    inner: GooglePublisher,
    /// The ordering keys the current publisher has seen.
    keys: HashSet<String>,
    /// How many times the publisher was replaced.
    generation: u64,
}

/// A [`Publisher`] over Google's client on one topic, replaced by a fresh
/// one when it has seen [`MAX_KEYS_PER_PUBLISHER`] keys and nothing is in
/// flight. Replacing it then cannot reorder anything: every earlier message
/// of every key has its answer before a later one is handed to the new
/// publisher, and a key paused by a failure has nothing queued behind it.
#[derive(Clone)]
pub struct PubSubPublisher {
    base: PubSubClient,
    max_keys: usize,
    topic_path: String,
    state: Arc<std::sync::Mutex<PublisherState>>,
    in_flight: Arc<AtomicUsize>,
}

impl PubSubPublisher {
    /// A publisher on the configured topic, with a connection of its own.
    ///
    /// # Errors
    /// When the client cannot be built (bad endpoint, no credentials).
    pub async fn connect(config: &PubSubConfig) -> anyhow::Result<Self> {
        Ok(PubSubClient::connect(config)
            .await?
            .publisher(&config.topic))
    }

    /// How many times the underlying client publisher was replaced.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PublisherState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Permanent: Pub/Sub will reject the same message again. Everything else
/// (unavailable, deadline, a paused ordering key, shutdown) is retried.
fn classify(error: GooglePublishError) -> PublishError {
    let permanent = match &error {
        GooglePublishError::Rpc(e) => e
            .status()
            .is_some_and(|s| matches!(s.code, Code::InvalidArgument | Code::OutOfRange)),
        _ => false,
    };
    if permanent {
        PublishError::Permanent(error.to_string())
    } else {
        PublishError::Transient(error.to_string())
    }
}

impl crate::drain::Publishers for PubSubClient {
    fn for_topic(&self, topic: &str) -> Arc<dyn Publisher> {
        let mut topics = self
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            topics
                .entry(topic.to_owned())
                .or_insert_with(|| Arc::new(self.publisher(topic))),
        )
    }
}

/// Counts a publish in flight until its answer is in.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Publisher for PubSubPublisher {
    fn publish(&self, message: OutboxMessage) -> PublishFuture {
        let mut google = Message::new()
            .set_data(message.data)
            .set_attributes(message.attributes.into_iter().collect::<HashMap<_, _>>());
        let publish = {
            let mut state = self.lock();
            if let Some(key) = &message.ordering_key {
                if !state.keys.contains(key)
                    && state.keys.len() >= self.max_keys
                    && self.in_flight.load(Ordering::SeqCst) == 0
                {
                    // Dropping the old one ends its per-key tasks.
                    state.inner = self.base.build(&self.topic_path);
                    state.keys.clear();
                    state.generation += 1;
                    tracing::debug!(message = "publisher replaced", topic = %self.topic_path, generation = state.generation);
                }
                state.keys.insert(key.clone());
                google = google.set_ordering_key(key.clone());
            }
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            state.inner.publish(google)
        };
        let counted = InFlight(Arc::clone(&self.in_flight));
        async move {
            let result = publish.await.map_err(classify);
            drop(counted);
            result
        }
        .boxed()
    }

    fn resume(&self, ordering_key: &str) {
        self.lock().inner.resume_publish(ordering_key);
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        let inner = self.lock().inner.clone();
        async move { inner.flush().await }.boxed()
    }
}

/// Creates the topic unless it exists.
///
/// # Errors
/// When Pub/Sub cannot be reached or refuses.
pub async fn ensure_topic(config: &PubSubConfig) -> anyhow::Result<()> {
    let admin = configured!(TopicAdmin::builder(), config).build().await?;
    match admin
        .create_topic()
        .set_name(config.topic_path())
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.status().is_some_and(|s| s.code == Code::AlreadyExists) => Ok(()),
        Err(e) => Err(anyhow::anyhow!(
            "creating topic {}: {e}",
            config.topic_path()
        )),
    }
}

/// Whether a topic exists, as Pub/Sub's admin API says.
#[derive(Debug, PartialEq, Eq)]
pub enum TopicState {
    Exists,
    Missing,
    /// Pub/Sub did not say (unreachable, or the relay may not read topics:
    /// `roles/pubsub.publisher` has no `pubsub.topics.get`).
    Unknown(String),
}

/// Asks Pub/Sub whether `config`'s topic exists.
pub async fn topic_state(config: &PubSubConfig) -> TopicState {
    let admin = match configured!(TopicAdmin::builder(), config).build().await {
        Ok(admin) => admin,
        Err(e) => return TopicState::Unknown(e.to_string()),
    };
    match admin
        .get_topic()
        .set_topic(config.topic_path())
        .send()
        .await
    {
        Ok(_) => TopicState::Exists,
        Err(e) if e.status().is_some_and(|s| s.code == Code::NotFound) => TopicState::Missing,
        Err(e) => TopicState::Unknown(e.to_string()),
    }
}

/// Creates a subscription on the topic unless it exists; `ordered` enables
/// message ordering, which a consumer needs to see ordering keys honoured.
/// `Ok(true)` when it was created now.
///
/// # Errors
/// When Pub/Sub cannot be reached or refuses.
pub async fn ensure_subscription(
    config: &PubSubConfig,
    subscription: &str,
    ordered: bool,
) -> anyhow::Result<bool> {
    let admin = configured!(SubscriptionAdmin::builder(), config)
        .build()
        .await?;
    let result = admin
        .create_subscription()
        .set_name(config.subscription_path(subscription))
        .set_topic(config.topic_path())
        .set_enable_message_ordering(ordered)
        .set_ack_deadline_seconds(60)
        .send()
        .await;
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.status().is_some_and(|s| s.code == Code::AlreadyExists) => Ok(false),
        Err(e) => Err(anyhow::anyhow!("creating subscription {subscription}: {e}")),
    }
}

/// A subscriber client for consumers (the `tail` command and tests).
///
/// # Errors
/// When the client cannot be built.
pub async fn subscriber(config: &PubSubConfig) -> anyhow::Result<Subscriber> {
    Ok(configured!(Subscriber::builder(), config).build().await?)
}
