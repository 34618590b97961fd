//! Google Cloud Pub/Sub through Google's official client: the
//! [`Publisher`] the relay drains through, and topic and subscription
//! set-up for development.

use std::collections::HashMap;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{
    Publisher as GooglePublisher, Subscriber, SubscriptionAdmin, TopicAdmin,
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
    /// How long the client retries one publish before reporting it failed.
    /// The relay then re-reads MongoDB and publishes again, so this only
    /// bounds how long a failure takes to surface.
    pub publish_retry_limit: Duration,
    /// How long the client waits to fill a request before sending it.
    pub batch_delay: Duration,
}

impl PubSubConfig {
    pub fn topic_path(&self) -> String {
        format!("projects/{}/topics/{}", self.project_id, self.topic)
    }

    pub fn subscription_path(&self, subscription: &str) -> String {
        format!("projects/{}/subscriptions/{subscription}", self.project_id)
    }

    fn endpoint(&self) -> Option<String> {
        self.emulator_host
            .as_ref()
            .map(|host| format!("http://{host}"))
    }
}

/// Applies the emulator endpoint and anonymous credentials to any of the
/// client builders, which share these two setters but no trait.
macro_rules! configured {
    ($builder:expr, $config:expr) => {{
        let mut builder = $builder;
        if let Some(endpoint) = $config.endpoint() {
            builder = builder.with_endpoint(endpoint).with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        builder
    }};
}

/// A [`Publisher`] over Google's client.
#[derive(Clone)]
pub struct PubSubPublisher {
    inner: GooglePublisher,
}

impl PubSubPublisher {
    /// # Errors
    /// When the client cannot be built (bad endpoint, no credentials).
    pub async fn connect(config: &PubSubConfig) -> anyhow::Result<Self> {
        let builder = GooglePublisher::builder(config.topic_path())
            .with_retry_policy(RetryableErrors.with_time_limit(config.publish_retry_limit))
            .set_delay_threshold(config.batch_delay);
        let inner = configured!(builder, config).build().await?;
        Ok(Self { inner })
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

impl Publisher for PubSubPublisher {
    fn publish(&self, message: OutboxMessage) -> PublishFuture {
        let mut google = Message::new()
            .set_data(message.data)
            .set_attributes(message.attributes.into_iter().collect::<HashMap<_, _>>());
        if let Some(key) = message.ordering_key {
            google = google.set_ordering_key(key);
        }
        self.inner
            .publish(google)
            .map(|result| result.map_err(classify))
            .boxed()
    }

    fn resume(&self, ordering_key: &str) {
        self.inner.resume_publish(ordering_key);
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        self.inner.flush().boxed()
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

/// Creates a subscription on the topic unless it exists; `ordered` enables
/// message ordering, which a consumer needs to see ordering keys honoured.
///
/// # Errors
/// When Pub/Sub cannot be reached or refuses.
pub async fn ensure_subscription(
    config: &PubSubConfig,
    subscription: &str,
    ordered: bool,
) -> anyhow::Result<()> {
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
        Ok(_) => Ok(()),
        Err(e) if e.status().is_some_and(|s| s.code == Code::AlreadyExists) => Ok(()),
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
