#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The short form of every chaos scenario (seconds each): the real binaries,
//! faults injected, every invariant must hold. `scripts/chaos.sh` runs the
//! full forms.

async fn short(name: &str) {
    let Some(report) = chaos::run(name, chaos::Length::Short).await.unwrap() else {
        return;
    };
    let table = chaos::table(std::slice::from_ref(&report));
    println!("{table}");
    assert!(report.invariants.held(), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_leader_kills() {
    short("leader-kills").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_frozen_leader() {
    short("frozen-leader").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_pubsub_outage() {
    short("pubsub-outage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_mongodb_outage() {
    short("mongodb-outage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_writer_kills() {
    short("writer-kills").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_bad_input() {
    short("bad-input").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_slow_network() {
    short("slow-network").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak() {
    short("soak").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_streams() {
    short("streams").await;
}
