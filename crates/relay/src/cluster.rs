//! The cluster: which streams this replica leads, and the runners that lead
//! them.
//!
//! Every replica announces itself in the members registry every TTL/3
//! (expiring after the TTL, by the store's clock) and, every poll interval,
//! reads the stream definitions, the live members and every stream's lease.
//! Its share is `floor(streams / live members)`, plus one for the first
//! `streams mod members` members by id: every replica computes the same
//! shares from the same registry, they add up to the streams, and none is
//! above `ceil(streams / members)`:
//!
//! - it runs a [`Runner`] for each stream it leads, and for as many streams
//!   without a live leader (never led, released, or led by a member whose
//!   announcement expired) as its share leaves room for, in the order of a
//!   rendezvous hash of (stream, replica), so that replicas mostly prefer
//!   different streams; a runner takes the lease the usual way (acquire
//!   when free or expired, compare-and-swap, a new epoch);
//! - when it leads more than its share (a replica joined), it stops the
//!   runners of the excess, least preferred first: a stopped runner
//!   finishes its page in flight, settles its write and releases the lease,
//!   exactly as at shutdown, so a stream changes hands only the way a lease
//!   changes hands, and every ordering and fencing rule holds per stream;
//! - a runner that is only standing by for a stream another live member
//!   leads is stopped.
//!
//! Once the cluster is stable no replica leads more than its share. A
//! replica that starts takes its share within a few polls (the others hand
//! streams over at their next poll); the streams of one that dies are led
//! again once their leases expire (TTL + poll); one that stops (SIGTERM)
//! releases its leases and leaves the registry at once. Each stream has its
//! own runner, lease, status and backoff: a halted, paused or slow stream
//! never delays another.

use outbox_core::claim_check::ObjectRefStore;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::store::{
    Lease, LeaseStore, Member, MemberStore, OutboxStore, ReplayStore, StreamStore,
};
use outbox_core::stream::{StreamDefinition, StreamName};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::drain::{DrainSettings, Publishers};
use crate::lease::{Leadership, LeaseSettings};
use crate::retention::RetentionSettings;
use crate::runner::{Runner, RunnerSettings};
use crate::status::StatusBoard;

/// How many polls a replica leaves a stream it handed over to the others
/// before it may take it back (if none of them took it).
const HAND_OVER_POLLS: u32 = 3;

/// How many TTLs a replica keeps a stream it took because no one led it,
/// before the share rule may hand it over again.
const KEEP_TTLS: u32 = 2;

/// What the cluster runs each stream with.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub relay_id: String,
    /// Where this replica's admin port answers, for the others' pages.
    pub admin_url: String,
    pub page_size: u32,
    pub ttl: Duration,
    pub poll_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub shutdown_grace: Duration,
    pub retention: RetentionSettings,
    /// The default stream as the configuration describes it, used until a
    /// definition of `default` is stored.
    pub default_stream: StreamDefinition,
    /// Most streams the cluster runs (and values the metrics' `stream`
    /// label can take).
    pub max_streams: usize,
    /// This replica's admin token fingerprint (`None`: its admin API is
    /// open), announced with its member record.
    pub admin_token: Option<String>,
}

/// The stores the cluster works with.
#[derive(Clone)]
pub struct ClusterStores {
    pub outbox: Arc<dyn OutboxStore>,
    pub leases: Arc<dyn LeaseStore>,
    pub streams: Arc<dyn StreamStore>,
    pub members: Arc<dyn MemberStore>,
    pub replays: Arc<dyn ReplayStore>,
    /// Claim-check objects' references, which retention releases.
    pub objects: Arc<dyn ObjectRefStore>,
}

/// A runner this replica runs.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
    leadership: Leadership,
}

/// What this replica keeps for one stream.
struct Slot {
    definition: watch::Sender<StreamDefinition>,
    status: Arc<StatusBoard>,
    wake: Arc<Notify>,
    running: Option<Running>,
    /// A runner handing the stream over (settling its page, releasing the
    /// lease): a new one starts only after it ended.
    stopping: Option<JoinHandle<()>>,
    /// When this replica last handed the stream over to make room for
    /// another: for [`HAND_OVER_POLLS`] polls it does not take the stream
    /// back while it is free, or two replicas whose rounds fall together
    /// could hand it back and forth without the other ever leading it (the
    /// simulator's seeds 15 to 17 did, every second).
    handed_over_at: Option<tokio::time::Instant>,
    /// Since when this replica's rounds have seen the stream without a
    /// live leader: after a TTL of that, it takes the stream even above its
    /// share (its owner by the share rule is alive but cannot lead it).
    free_since: Option<tokio::time::Instant>,
    /// Taken that way: not handed over again before then, so a stream whose
    /// owner cannot lead it is not handed to it each round.
    keep_until: Option<tokio::time::Instant>,
}

/// One stream as this replica sees it, for the admin API.
#[derive(Clone)]
pub struct StreamView {
    pub definition: StreamDefinition,
    pub status: Arc<StatusBoard>,
    /// Whether this replica leads it (its runner holds a valid lease).
    pub leading: bool,
    /// The lease this replica's runner holds, when it holds one.
    pub lease: Option<Lease>,
    /// Whether this replica runs it (leading or standing by).
    pub running: bool,
}

/// The streams, the runners and the share rule of one replica.
pub struct Cluster {
    settings: ClusterSettings,
    stores: ClusterStores,
    publishers: Arc<dyn Publishers>,
    slots: Mutex<BTreeMap<StreamName, Slot>>,
    /// Wakes the supervisor (a stream was defined, a replica stopped).
    wake: Notify,
    /// The live members and the leases as last read.
    seen: Mutex<(Vec<Member>, Vec<Lease>)>,
    /// Since when MongoDB has not answered this replica's supervision
    /// (`None` while it does): what the status says when it cannot ask.
    unreachable_since: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// Wakes the replay workers (a job was started or resumed).
    replays_wake: Arc<Notify>,
}

/// A deterministic score of (stream, replica): each replica prefers the
/// streams it scores highest (rendezvous hashing), so replicas mostly
/// reach for different free streams.
fn preference(stream: &StreamName, replica: &str) -> u64 {
    // FNV-1a, then MurmurHash3's finalizer so that every input bit moves
    // the high bits: stable across builds and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in stream.as_str().bytes().chain([0]).chain(replica.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// How a replica's admin token compares with this one's: `same`,
/// `different`, or `none` when it has none.
pub fn token_match(own: Option<&str>, theirs: Option<&str>) -> &'static str {
    match (own, theirs) {
        (_, None) => "none",
        (Some(own), Some(theirs)) if own == theirs => "same",
        _ => "different",
    }
}

/// The replicas (by name) whose admin token is not this one's.
pub fn token_mismatches(own: Option<&str>, members: &[Member]) -> Vec<String> {
    members
        .iter()
        .filter(|m| token_match(own, m.admin_token.as_deref()) != "same")
        .map(|m| m.name().to_owned())
        .collect()
}

/// The most streams a live member leads: the ceiling of streams / members
/// (at least one member: this one).
pub fn share(streams: usize, members: usize) -> usize {
    streams.div_ceil(members.max(1))
}

/// How many of the streams it leads a member hands over, so that
/// assignments stay where they are unless balance needs a move: only a
/// member over the ceiling (`share`) hands over what is above it, or, while
/// another live member leads fewer than the floor (`streams / members`), a
/// member above the floor hands over one. A replica back from a partition
/// or a restart gets streams from replicas over the ceiling, never from one
/// within it: a flapping network does not make a stream ping-pong.
/// `others` are what each other live member leads.
pub fn to_hand_over(leading: usize, streams: usize, others: &[usize]) -> usize {
    let members = others.len() + 1;
    let ceiling = share(streams, members);
    let floor = streams / members;
    if leading > ceiling {
        leading - ceiling
    } else if leading > floor && others.iter().any(|n| *n < floor) {
        1
    } else {
        0
    }
}

/// The share of the member `me` among `members` (ids, `me` among them):
/// `streams / members`, one more for the first `streams % members` by id.
pub fn share_of(streams: usize, members: &[&str], me: &str) -> usize {
    let mut ids: Vec<&str> = members.to_vec();
    if !ids.contains(&me) {
        ids.push(me);
    }
    ids.sort_unstable();
    ids.dedup();
    let count = ids.len();
    let rank = ids.iter().position(|id| *id == me).unwrap_or(0);
    streams / count + usize::from(rank < streams % count)
}

impl Cluster {
    pub fn new(
        settings: ClusterSettings,
        stores: ClusterStores,
        publishers: Arc<dyn Publishers>,
    ) -> Self {
        let cluster = Self {
            settings,
            stores,
            publishers,
            slots: Mutex::default(),
            wake: Notify::new(),
            seen: Mutex::default(),
            unreachable_since: Mutex::default(),
            replays_wake: Arc::new(Notify::new()),
        };
        let default = cluster.settings.default_stream.clone();
        cluster.slot_for(&default);
        cluster
    }

    pub fn relay_id(&self) -> &str {
        &self.settings.relay_id
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn stores(&self) -> &ClusterStores {
        &self.stores
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<StreamName, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes (or updates) the slot of a stream.
    pub(crate) fn slot_for(&self, definition: &StreamDefinition) {
        let mut slots = self.lock();
        match slots.get(&definition.name) {
            Some(slot) => {
                slot.definition.send_if_modified(|current| {
                    // Dates aside: only a real change reaches the runner.
                    let changed = current.topic != definition.topic
                        || current.ordering != definition.ordering
                        || current.on_poison != definition.on_poison
                        || current.schema != definition.schema
                        || current.writers != definition.writers;
                    *current = definition.clone();
                    changed
                });
            }
            None => {
                slots.insert(
                    definition.name.clone(),
                    Slot {
                        definition: watch::channel(definition.clone()).0,
                        status: Arc::new(StatusBoard::default()),
                        wake: Arc::new(Notify::new()),
                        running: None,
                        stopping: None,
                        handed_over_at: None,
                        free_since: None,
                        keep_until: None,
                    },
                );
            }
        }
    }

    /// Every stream this replica knows, with its status here.
    pub fn streams(&self) -> Vec<StreamView> {
        self.lock()
            .values()
            .map(|slot| StreamView {
                definition: slot.definition.borrow().clone(),
                status: Arc::clone(&slot.status),
                leading: slot
                    .running
                    .as_ref()
                    .is_some_and(|r| r.leadership.is_leader()),
                lease: slot
                    .running
                    .as_ref()
                    .and_then(|r| r.leadership.held())
                    .map(|held| held.lease),
                running: slot.running.as_ref().is_some_and(|r| !r.task.is_finished()),
            })
            .collect()
    }

    /// One stream, when known.
    pub fn stream(&self, name: &StreamName) -> Option<StreamView> {
        self.streams()
            .into_iter()
            .find(|s| &s.definition.name == name)
    }

    /// The live members and the leases as the last supervision read them.
    /// Since when MongoDB has not answered this replica, if it does not.
    pub fn store_unreachable_since(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        *self
            .unreachable_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn seen(&self) -> (Vec<Member>, Vec<Lease>) {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Wakes one stream's runner (a batch to retry, a pause lifted).
    pub fn wake_stream(&self, name: &StreamName) {
        if let Some(slot) = self.lock().get(name) {
            slot.wake.notify_one();
        }
    }

    /// Wakes every runner (new batches) and the supervisor.
    /// Tells the replay workers that a job was started or resumed.
    pub fn wake_replays(&self) {
        self.replays_wake.notify_waiters();
    }

    pub fn wake_all(&self) {
        for slot in self.lock().values() {
            slot.wake.notify_one();
        }
        self.wake.notify_one();
    }

    /// Items this replica published, per stream, since it started.
    fn published(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|(name, slot)| (name.to_string(), slot.status.snapshot().published_total))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The definitions to run: the stored ones, and the default stream from
    /// the configuration unless it was stored too.
    async fn definitions(&self) -> Vec<StreamDefinition> {
        match self.stores.streams.streams().await {
            Ok(mut stored) => {
                if !stored.iter().any(|d| d.name.is_default()) {
                    stored.push(self.settings.default_stream.clone());
                }
                stored.sort_by(|a, b| a.name.cmp(&b.name));
                if stored.len() > self.settings.max_streams {
                    warn!(
                        message = "more streams are defined than MAX_STREAMS; the rest are not run",
                        defined = stored.len(),
                        max_streams = self.settings.max_streams
                    );
                    // The default stream always runs.
                    let default = stored.iter().position(|d| d.name.is_default());
                    let default = default.map(|i| stored.remove(i));
                    stored.truncate(self.settings.max_streams.saturating_sub(1));
                    stored.extend(default);
                }
                stored
            }
            Err(error) => {
                warn!(message = "cannot read the stream definitions; keeping the last", %error);
                self.lock()
                    .values()
                    .map(|slot| slot.definition.borrow().clone())
                    .collect()
            }
        }
    }

    /// Runs the share rule every poll interval until `shutdown`, then stops
    /// every runner (each releases its lease) and leaves the registry.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // Announced on a task of its own, every third of the TTL: a slow
        // supervision round cannot let this replica's record lapse (the
        // others would count it gone and the shares would churn). It goes
        // on while the streams are handed over, and stops before leaving.
        let announcing = CancellationToken::new();
        let announcer = tokio::spawn(Arc::clone(&self).announce(announcing.clone()));
        while !shutdown.is_cancelled() {
            // Bounded: a partitioned store must not stall the loop (a
            // driver waits up to its server selection timeout, 30 s).
            let supervised = tokio::time::timeout(self.settings.ttl, self.supervise(&shutdown));
            let reached = match supervised.await {
                Ok(Ok(())) => true,
                Ok(Err(error)) => {
                    warn!(message = "cannot work out this replica's streams; trying again", %error);
                    !matches!(error, outbox_core::store::StoreError::Unavailable(_))
                }
                Err(_) => {
                    warn!(
                        message = "cannot work out this replica's streams: MongoDB did not answer within the TTL"
                    );
                    false
                }
            };
            {
                let mut since = self
                    .unreachable_since
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if reached {
                    *since = None;
                } else if since.is_none() {
                    *since = Some(outbox_core::world::now());
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
        self.stop_all().await;
        announcing.cancel();
        let _ = announcer.await;
        let leave = tokio::time::timeout(
            self.settings.ttl / 2,
            self.stores.members.leave(&self.settings.relay_id),
        );
        if !matches!(leave.await, Ok(Ok(()))) {
            warn!(message = "cannot leave the members registry; the announcement expires");
        }
    }

    /// Announces this replica every third of the TTL until `stop`.
    async fn announce(self: Arc<Self>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            match tokio::time::timeout(self.settings.ttl / 2, self.heartbeat()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(message = "cannot announce this replica", %error),
                Err(_) => warn!(message = "cannot announce this replica: MongoDB did not answer"),
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = tokio::time::sleep(self.settings.ttl / 3) => {}
            }
        }
    }

    async fn heartbeat(&self) -> Result<(), outbox_core::store::StoreError> {
        let now_ms = self.stores.leases.now_ms().await?;
        let ttl_ms = i64::try_from(self.settings.ttl.as_millis()).unwrap_or(i64::MAX);
        self.stores
            .members
            .heartbeat(&Member {
                id: self.settings.relay_id.clone(),
                admin_url: self.settings.admin_url.clone(),
                host: hostname(),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at: started_at(),
                expires_at_ms: now_ms + ttl_ms,
                published: self.published(),
                admin_token: self.settings.admin_token.clone(),
            })
            .await
    }

    /// One round of the share rule.
    async fn supervise(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<(), outbox_core::store::StoreError> {
        // The leases first: on a server whose reads wait for an open
        // transaction, a blocked read of them is what lets a dead leader's
        // orphan be killed (LEASE_KILL_ON_BLOCKED_READ; neither MongoDB's
        // reads nor the stand-in's do now).
        let leases = self.stores.leases.leases().await?;
        let now_ms = self.stores.leases.now_ms().await?;
        let members = self.stores.members.members(now_ms).await?;
        metrics::gauge!(crate::metrics::ADMIN_TOKEN_MISMATCHES)
            .set(token_mismatches(self.settings.admin_token.as_deref(), &members).len() as f64);
        let shared = outbox_core::store::shared_names(&members);
        metrics::gauge!(crate::metrics::DUPLICATE_NAMES).set(shared.len() as f64);
        if !shared.is_empty() {
            warn!(message = "live relay processes share a RELAY_ID; give each its own", names = ?shared);
        }
        let definitions = self.definitions().await;
        for definition in &definitions {
            self.slot_for(definition);
        }
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (members.clone(), leases.clone());
        let me = self.settings.relay_id.as_str();
        let live = |id: &str| id == me || members.iter().any(|m| m.id == id);
        let holder = |stream: &StreamName| {
            leases
                .iter()
                .find(|l| &l.stream == stream && l.expires_at_ms > now_ms && !l.holder.is_empty())
                .map(|l| l.holder.as_str())
        };
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        let target = share_of(definitions.len(), &ids, me);

        let mut to_stop = Vec::new();
        let mut to_start = Vec::new();
        {
            let mut slots = self.lock();
            // Forget runners that ended by themselves.
            for slot in slots.values_mut() {
                if slot.running.as_ref().is_some_and(|r| r.task.is_finished()) {
                    slot.running = None;
                }
            }
            let names: Vec<StreamName> = definitions.iter().map(|d| d.name.clone()).collect();
            let leading: Vec<StreamName> = names
                .iter()
                .filter(|name| {
                    slots
                        .get(*name)
                        .and_then(|s| s.running.as_ref())
                        .is_some_and(|r| r.leadership.is_leader())
                        || holder(name) == Some(me)
                })
                .cloned()
                .collect();
            // Over the ceiling, or above the floor while another is under
            // it: hand the least preferred over (`to_hand_over`).
            let now = tokio::time::Instant::now();
            let mut excess: Vec<StreamName> = leading
                .iter()
                .filter(|name| {
                    slots
                        .get(*name)
                        .and_then(|s| s.keep_until)
                        .is_none_or(|until| now >= until)
                })
                .cloned()
                .collect();
            excess.sort_by_key(|name| preference(name, me));
            let others: Vec<usize> = members
                .iter()
                .filter(|m| m.id != me)
                .map(|m| {
                    names
                        .iter()
                        .filter(|name| holder(name) == Some(m.id.as_str()))
                        .count()
                })
                .collect();
            // Streams kept because no one else led them count for neither
            // the share nor the streams to share.
            let kept_unled = leading.len() - excess.len();
            let over = to_hand_over(excess.len(), names.len() - kept_unled, &others);
            let handed: Vec<StreamName> = excess.into_iter().take(over).collect();
            for name in &handed {
                if let Some(slot) = slots.get_mut(name) {
                    slot.handed_over_at = Some(now);
                }
            }
            // Standing by for a stream a live member leads: stop.
            for (name, slot) in slots.iter() {
                let Some(running) = &slot.running else {
                    continue;
                };
                let led_elsewhere = holder(name).is_some_and(|h| h != me && live(h));
                if handed.contains(name) || (led_elsewhere && !running.leadership.is_leader()) {
                    to_stop.push(name.clone());
                }
            }
            // Room left: free streams, most preferred first.
            let kept = leading.len() - handed.len();
            let standing_by = slots
                .iter()
                .filter(|(name, slot)| {
                    slot.running.is_some() && !leading.contains(name) && !to_stop.contains(name)
                })
                .count();
            // Streams without a live leader are taken by anyone with room
            // under the ceiling (not only under its rank's share): a
            // leader that is alive but cannot renew leaves its stream free,
            // and a replica whose share is 0 must still take it.
            let room = share(names.len(), others.len() + 1).saturating_sub(kept + standing_by);
            let mut free: Vec<StreamName> = names
                .iter()
                .filter(|name| slots.get(*name).is_some_and(|s| s.running.is_none()))
                .filter(|name| holder(name).is_none_or(|h| !live(h)))
                .filter(|name| {
                    slots
                        .get(*name)
                        .and_then(|s| s.handed_over_at)
                        .is_none_or(|at| now - at >= self.settings.poll_interval * HAND_OVER_POLLS)
                })
                .cloned()
                .collect();
            free.sort_by_key(|name| std::cmp::Reverse(preference(name, me)));
            // A stream no one has led for a TTL is taken whatever the share:
            // the replica whose share it is may be alive (announcing itself)
            // and still unable to lead it, and a stream must not wait for
            // that to end. The share rule hands it back once it can.
            for (name, slot) in slots.iter_mut() {
                let unled = holder(name).is_none_or(|h| !live(h));
                slot.free_since = if unled {
                    Some(slot.free_since.unwrap_or(now))
                } else {
                    None
                };
            }
            let (overdue, rest): (Vec<StreamName>, Vec<StreamName>) =
                free.into_iter().partition(|name| {
                    slots
                        .get(name)
                        .and_then(|s| s.free_since)
                        .is_some_and(|since| now - since >= self.settings.ttl)
                });
            to_start.extend(rest.into_iter().take(room.saturating_sub(overdue.len())));
            for name in &overdue {
                if let Some(slot) = slots.get_mut(name) {
                    slot.keep_until = Some(now + self.settings.ttl * KEEP_TTLS);
                }
            }
            to_start.extend(overdue);
        }
        // Hand-overs run in the background: one waiting for its page in
        // flight delays neither the other streams nor the heartbeat.
        for name in &to_stop {
            info!(message = "handing the stream over", stream = %name, share = target);
            self.begin_stop(name);
        }
        if !shutdown.is_cancelled() {
            for name in &to_start {
                self.start(name);
            }
        }
        Ok(())
    }

    /// Starts a runner for the stream.
    fn start(&self, name: &StreamName) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(name) else {
            return;
        };
        if slot.running.is_some() || slot.stopping.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        slot.stopping = None;
        let settings = RunnerSettings {
            drain: DrainSettings {
                page_size: self.settings.page_size,
                definition: slot.definition.subscribe(),
            },
            lease: LeaseSettings {
                stream: name.clone(),
                holder: self.settings.relay_id.clone(),
                ttl: self.settings.ttl,
                standby_poll: self.settings.poll_interval,
            },
            poll_interval: self.settings.poll_interval,
            backoff_base: self.settings.backoff_base,
            backoff_cap: self.settings.backoff_cap,
            shutdown_grace: self.settings.shutdown_grace,
        };
        let runner = Runner::new(
            Arc::clone(&self.stores.outbox),
            Arc::clone(&self.stores.leases),
            Arc::clone(&self.publishers),
            settings,
            Arc::clone(&slot.status),
            Arc::clone(&slot.wake),
        );
        let leadership = runner.leadership();
        let stop = CancellationToken::new();
        let retention = tokio::spawn(crate::retention::run(
            Arc::clone(&self.stores.outbox),
            Arc::clone(&self.stores.objects),
            name.clone(),
            runner.leadership(),
            self.settings.retention.clone(),
            stop.clone(),
        ));
        let replays = tokio::spawn(crate::replay::run(
            Arc::clone(&self.stores.replays),
            Arc::clone(&self.publishers),
            name.clone(),
            runner.leadership(),
            crate::replay::ReplaySettings {
                page_size: self.settings.page_size,
                poll_interval: self.settings.poll_interval,
                backoff_base: self.settings.backoff_base,
                backoff_cap: self.settings.backoff_cap,
            },
            Arc::clone(&self.replays_wake),
            stop.clone(),
        ));
        let span = info_span!("stream", stream = %name);
        let token = stop.clone();
        let task = tokio::spawn(
            async move {
                runner.run(token).await;
                let _ = retention.await;
                let _ = replays.await;
            }
            .instrument(span),
        );
        info!(message = "running the stream", stream = %name);
        slot.running = Some(Running {
            stop,
            task,
            leadership,
        });
    }

    /// Tells the stream's runner to hand the stream over; it settles and
    /// releases in the background.
    fn begin_stop(&self, name: &StreamName) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(name) else {
            return;
        };
        if let Some(running) = slot.running.take() {
            running.stop.cancel();
            slot.stopping = Some(running.task);
        }
    }

    async fn stop_all(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut slots = self.lock();
            let mut tasks = Vec::new();
            for slot in slots.values_mut() {
                if let Some(running) = slot.running.take() {
                    running.stop.cancel();
                    tasks.push(running.task);
                }
                tasks.extend(slot.stopping.take());
            }
            tasks
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default()
}

/// When this process started (first asked).
fn started_at() -> chrono::DateTime<chrono::Utc> {
    static STARTED: std::sync::OnceLock<chrono::DateTime<chrono::Utc>> = std::sync::OnceLock::new();
    *STARTED.get_or_init(chrono::Utc::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Assignments are sticky: a replica within the ceiling keeps what it
    /// leads (one back from a partition gets nothing taken from it), one
    /// over it hands the excess over, and a starved replica gets one from a
    /// replica above the floor.
    #[test]
    fn streams_move_only_when_balance_needs_it() {
        // One stream, two replicas: whoever leads it keeps it.
        assert_eq!(to_hand_over(1, 1, &[0]), 0);
        // Six streams, three replicas, one restarted: the two that took its
        // streams (3 each, ceiling 2) hand one each.
        assert_eq!(to_hand_over(3, 6, &[3, 0]), 1);
        // Four streams, three replicas at 2, 2, 0: the third is under the
        // floor (1): each replica above the floor hands one over.
        assert_eq!(to_hand_over(2, 4, &[2, 0]), 1);
        // At 2, 1, 1 nobody moves.
        assert_eq!(to_hand_over(2, 4, &[1, 1]), 0);
        assert_eq!(to_hand_over(1, 4, &[2, 1]), 0);
        // Alone, it leads everything.
        assert_eq!(to_hand_over(5, 5, &[]), 0);
        // Simulated rounds converge and then stay put.
        let mut leads = vec![6_usize, 0, 0];
        for _ in 0..10 {
            let moves: Vec<usize> = (0..leads.len())
                .map(|i| {
                    let others: Vec<usize> = (0..leads.len())
                        .filter(|j| *j != i)
                        .map(|j| leads[j])
                        .collect();
                    to_hand_over(leads[i], 6, &others)
                })
                .collect();
            let handed: usize = moves.iter().sum();
            for (i, n) in moves.iter().enumerate() {
                leads[i] -= n;
            }
            // The freed streams go to the least loaded.
            for _ in 0..handed {
                let least = (0..leads.len()).min_by_key(|i| leads[*i]).unwrap();
                leads[least] += 1;
            }
        }
        let mut sorted = leads.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [2, 2, 2]);
    }

    #[test]
    fn the_shares_add_up_and_none_is_over_the_ceiling() {
        for streams in 0..20 {
            for count in 1..6 {
                let ids: Vec<String> = (0..count).map(|i| format!("relay-{i}")).collect();
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                let shares: Vec<usize> =
                    refs.iter().map(|me| share_of(streams, &refs, me)).collect();
                assert_eq!(
                    shares.iter().sum::<usize>(),
                    streams,
                    "{streams} over {count}"
                );
                assert!(shares.iter().all(|s| *s <= share(streams, count)));
                assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
            }
        }
        // A member missing from the registry (its announcement failed)
        // counts itself.
        assert_eq!(share_of(7, &["relay-b", "relay-c"], "relay-a"), 3);
    }

    #[test]
    fn the_share_is_the_ceiling() {
        assert_eq!(share(6, 3), 2);
        assert_eq!(share(7, 3), 3);
        assert_eq!(share(1, 3), 1);
        assert_eq!(share(0, 3), 0);
        assert_eq!(share(5, 0), 5);
    }

    #[test]
    fn replicas_prefer_different_streams() {
        let streams: Vec<StreamName> = (0..60).map(|i| format!("s{i}").parse().unwrap()).collect();
        let top = |replica: &str| {
            let mut ranked = streams.clone();
            ranked.sort_by_key(|s| std::cmp::Reverse(preference(s, replica)));
            ranked.truncate(20);
            ranked
        };
        let (one, two) = (top("relay-1"), top("relay-2"));
        let shared = one.iter().filter(|s| two.contains(s)).count();
        // Independent rankings share about a third of their top thirds.
        assert!(shared < 14, "{shared} of 20 in common");
        assert_eq!(preference(&streams[0], "a"), preference(&streams[0], "a"));
    }
}
