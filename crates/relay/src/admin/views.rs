//! What the admin endpoints answer, described for OpenAPI. The handlers
//! build the same JSON; schemathesis (scripts/api-check.sh) checks every
//! answer against these.
#![allow(dead_code)]

use utoipa::ToSchema;

/// A stream's status (`GET /api/v1/streams/{stream}/status`).
pub type StreamStatusView = StatusView;

#[derive(ToSchema)]
pub struct LeaderView {
    /// Its name (`RELAY_ID`).
    relay_id: String,
    /// Its instance id, the lease's holder.
    instance: String,
    /// Where the leader's admin port (and dashboard) answers.
    admin_url: Option<String>,
    pid: Option<u32>,
}

/// A stream's definition, as `PUT /api/v1/streams/{stream}` takes it.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamDefinitionBody {
    /// The Pub/Sub topic, in the relay's project.
    #[schema(example = "orders")]
    topic: String,
    /// `global` (default), `batch`, `none` or `field:<json-pointer>`.
    #[schema(example = "field:/customer/id")]
    ordering_key: Option<String>,
    /// With `field:`, the key of items without the field (default: the stream's name).
    ordering_key_default: Option<String>,
    /// `halt` (default) or `dead-letter`.
    on_poison: Option<String>,
    /// A JSON Schema every item must satisfy (self-contained: no remote references).
    #[schema(value_type = Option<Object>)]
    schema: Option<serde_json::Value>,
    /// The API key names allowed to write the stream; absent: any.
    writers: Option<Vec<String>>,
    /// Where items too large for a Pub/Sub message go (claim-check); absent:
    /// the writers' `CLAIM_CHECK_URL`, if set.
    claim_check: Option<ClaimCheckBody>,
}

/// A stream's claim-check store: an item whose message Pub/Sub would refuse
/// (or whose payload is over `above_bytes`) is stored there under its
/// SHA-256, and its message carries `claim_check_url`,
/// `claim_check_sha256` and `claim_check_bytes` in place of the payload.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimCheckBody {
    /// `gs://bucket/prefix` (Google credentials as for Pub/Sub),
    /// `file:///absolute/path` or `memory://` (tests).
    #[schema(example = "gs://acme-outbox/invoices")]
    url: String,
    /// Payloads above this many bytes go to the store (1 to 9,998,976);
    /// absent: only those whose message Pub/Sub would refuse.
    #[schema(minimum = 1, maximum = 9_998_976)]
    above_bytes: Option<u64>,
}

/// A stream: its definition and its live state.
#[derive(ToSchema)]
pub struct StreamView {
    stream: String,
    topic: String,
    ordering_key: String,
    ordering_key_default: Option<String>,
    on_poison: String,
    #[schema(value_type = Option<Object>)]
    schema: Option<serde_json::Value>,
    writers: Option<Vec<String>>,
    claim_check: Option<ClaimCheckBody>,
    /// RFC 3339; null for the default stream until it is defined.
    created_at: Option<String>,
    updated_at: Option<String>,
    leader: Option<LeaderView>,
    epoch: Option<u64>,
    lease_expires_at_ms: Option<i64>,
    /// `running`, `idle`, `paused`, `halted` or `no leader`.
    state: String,
    paused: bool,
    halted: Option<HaltView>,
    /// Batches not committed yet.
    backlog: u64,
    oldest_pending_age_seconds: Option<f64>,
    /// Items the stream published, as its leaders recorded them (kept
    /// across changes of leader; an item published twice counts twice).
    published_total: u64,
    head_batch: Option<HeadBatchView>,
}

#[derive(ToSchema)]
pub struct HeadBatchView {
    batch_id: String,
    batch_sequence: u64,
    /// `pending`, `processing` or `failed`.
    status: String,
    total_items: u64,
}

#[derive(ToSchema)]
pub struct StreamList {
    streams: Vec<StreamView>,
}

/// The live replicas and what each leads.
#[derive(ToSchema)]
pub struct ClusterView {
    /// This replica.
    relay_id: String,
    replicas: Vec<ReplicaView>,
    /// Streams defined.
    streams: u64,
    /// How many streams each replica leads at most once the cluster is stable.
    share: u64,
    /// Replicas whose admin token differs from this one's, or that have none
    /// (`admin_token` is not `same`): each obeys what any replica stores, so
    /// one open replica opens the cluster.
    admin_token_mismatches: Vec<String>,
    /// Names (`RELAY_ID`) two or more live processes share: give each its own.
    duplicate_names: Vec<String>,
    /// Replicas gone in the last 10 minutes (left, or stopped announcing
    /// themselves), newest first.
    gone: Vec<GoneView>,
    /// This process's instance id (`RELAY_ID#suffix`): its lease holder id.
    instance: String,
}

#[derive(ToSchema)]
pub struct GoneView {
    relay_id: String,
    instance: String,
    host: String,
    pid: u32,
    /// When its announcement expired or it left (RFC 3339).
    gone_at: Option<String>,
}

#[derive(ToSchema)]
pub struct ReplicaView {
    /// Its name (`RELAY_ID`).
    relay_id: String,
    /// Its instance id (`RELAY_ID#suffix`, drawn when the process started).
    instance: String,
    admin_url: String,
    host: String,
    pid: u32,
    version: String,
    started_at: String,
    leads: Vec<String>,
    /// Whether this is the replica answering.
    this: bool,
    /// Its admin token compared with this replica's: `same`, `different`,
    /// or `none` (its admin API is open).
    #[schema(pattern = "^(same|different|none)$")]
    admin_token: String,
}

/// A stream as this replica sees it (`/api/v1/outbox/status` is the
/// default stream's).
#[derive(utoipa::ToSchema)]
pub struct StatusView {
    stream: String,
    topic: String,
    /// This replica's name (`RELAY_ID`).
    relay_id: String,
    /// This process's instance id (`RELAY_ID#suffix`).
    instance: String,
    /// This replica's process id.
    relay_pid: u32,
    /// This replica's role for the stream: `leader` or `standby`.
    role: String,
    /// The replica leading the stream, with its admin URL, when one does.
    leader: Option<LeaderView>,
    /// `running`, `idle`, `paused`, `halted` or `no leader`.
    state: String,
    /// Items the stream published, as its leaders recorded them (kept
    /// across changes of leader): the stream's count.
    cluster_published_total: u64,
    /// The lease as stored (null before anyone took it; `{error}` when
    /// MongoDB did not answer).
    lease: Option<LeaseView>,
    /// Draining the stream paused, for every replica.
    paused: bool,
    /// The failed batch draining halted on, if any (retry it to go on).
    halted: Option<HaltView>,
    current_batch: Option<CurrentBatchView>,
    pending_batches: Option<u64>,
    oldest_pending_age_seconds: Option<f64>,
    /// Items this replica published since it started (the stream's count,
    /// whoever led, is `cluster_published_total`).
    published_total: u64,
    batches_committed_total: u64,
    last_error: Option<String>,
    last_error_at: Option<String>,
    /// Since when MongoDB has not answered this replica (RFC 3339), while
    /// it does not; what only MongoDB can say is then unknown.
    mongodb_unreachable_since: Option<String>,
    /// This replica's last errors, newest first (at most 20).
    recent_errors: Vec<ErrorView>,
}

#[derive(utoipa::ToSchema)]
pub struct HistoryView {
    /// Seconds between two samples.
    interval_seconds: u64,
    /// Oldest first; at most 300.
    samples: Vec<SampleView>,
}

#[derive(utoipa::ToSchema)]
pub struct SampleView {
    /// RFC 3339.
    at: String,
    /// Items this replica has published since it started.
    published_total: u64,
    pending_batches: Option<u64>,
    oldest_pending_age_seconds: Option<f64>,
}

#[derive(utoipa::ToSchema)]
pub struct ErrorView {
    /// RFC 3339.
    at: String,
    message: String,
}

#[derive(utoipa::ToSchema)]
pub struct HaltView {
    batch_id: String,
    batch_sequence: u64,
    error: Option<String>,
}

#[derive(utoipa::ToSchema)]
pub struct LeaseView {
    /// The holder's name (`RELAY_ID`).
    holder: Option<String>,
    /// The holder's instance id (`RELAY_ID#suffix`).
    holder_instance: Option<String>,
    epoch: Option<u64>,
    expires_at_ms: Option<i64>,
    error: Option<String>,
}

#[derive(utoipa::ToSchema)]
pub struct CurrentBatchView {
    batch_id: String,
    batch_sequence: u64,
    total_items: u64,
    sent: Option<u64>,
    pending: Option<u64>,
    progress_percentage: Option<f64>,
}

#[derive(utoipa::ToSchema)]
pub struct PausedView {
    stream: String,
    paused: bool,
}

#[derive(utoipa::ToSchema)]
pub struct PendingPage {
    batches: Vec<PendingBatchView>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

#[derive(utoipa::ToSchema)]
pub struct PendingBatchView {
    batch_id: String,
    stream: String,
    batch_sequence: u64,
    /// `pending`, `processing` or `failed`.
    status: String,
    total_items: u64,
    created_at: String,
    last_error: Option<String>,
    traceparent: Option<String>,
}

#[derive(utoipa::ToSchema)]
pub struct AdminBatchView {
    batch_id: String,
    stream: String,
    batch_sequence: u64,
    /// `pending`, `processing`, `committed` or `failed`.
    status: String,
    items: ItemCountsView,
    progress_percentage: f64,
    created_at: String,
    committed_at: Option<String>,
    last_error: Option<String>,
}

#[derive(utoipa::ToSchema)]
pub struct ItemCountsView {
    total: u64,
    sent: u64,
    failed: u64,
    pending: u64,
}

#[derive(utoipa::ToSchema)]
pub struct ItemsPage {
    batch_id: String,
    items: Vec<ItemViewDoc>,
    next_cursor: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[schema(as = Item)]
pub struct ItemViewDoc {
    item_id: String,
    item_sequence: u32,
    request_id: Option<String>,
    vendor_name: String,
    /// `pending`, `sent` or `failed`.
    status: String,
    /// The Pub/Sub message id, once acknowledged.
    publish_id: Option<String>,
    sent_at: Option<String>,
    /// Why the item was dead-lettered.
    error: Option<String>,
}

#[derive(utoipa::ToSchema)]
pub struct RetryView {
    batch_id: String,
    stream: String,
    /// `processing`.
    status: String,
}

#[derive(utoipa::ToSchema)]
pub struct HealthView {
    /// `ok`, `ready` or `unavailable`.
    status: String,
    reason: Option<String>,
}

/// What `POST /api/v1/outbox/replays` takes.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// The stream (default `default`).
    #[schema(example = "default", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    stream: Option<String>,
    /// The first batch of the range (inclusive).
    #[schema(minimum = 1, example = 1)]
    from_sequence: u64,
    /// The last batch of the range (inclusive); committed.
    #[schema(minimum = 1, example = 100)]
    to_sequence: u64,
    /// Where the copies go (default: the stream's topic).
    #[schema(example = "orders-replay")]
    topic: Option<String>,
    /// The ordering-key mode of the copies (default: the stream's).
    ordering_key: Option<String>,
    /// Items per second at most (default: no limit).
    #[schema(minimum = 1)]
    max_items_per_second: Option<u32>,
}

#[derive(ToSchema)]
pub struct ReplayPositionView {
    /// The next batch to publish.
    batch_sequence: u64,
    /// Positions of it already published.
    after_item: u32,
}

/// A replay job and its progress.
#[derive(ToSchema)]
pub struct ReplayView {
    replay_id: String,
    stream: String,
    from_sequence: u64,
    to_sequence: u64,
    topic: String,
    ordering_key: String,
    max_items_per_second: Option<u32>,
    /// `running`, `paused`, `done`, `cancelled` or `failed`.
    state: String,
    /// Positions of the range done (an item dead-lettered when first
    /// published is counted, not published).
    items_sent: u64,
    items_total: u64,
    batches_sent: u64,
    batches_total: u64,
    position: ReplayPositionView,
    /// While it runs: items per second since it last started.
    rate_items_per_second: Option<f64>,
    eta_seconds: Option<f64>,
    /// Why it failed.
    error: Option<String>,
    created_at: String,
    updated_at: String,
}

#[derive(ToSchema)]
pub struct ReplayList {
    replays: Vec<ReplayView>,
}
