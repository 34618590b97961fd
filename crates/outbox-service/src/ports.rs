//! Ports for the processes the test suites, the chaos suite and the
//! benchmarks start.

use std::sync::atomic::{AtomicU32, Ordering};

/// Ports handed out per process: a block of its own (by pid), so that
/// processes running side by side do not pick the same one.
const BLOCK: u32 = 40;
const FIRST: u32 = 10_000;
const BLOCKS: u32 = 500;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1 that nothing listens on, for a child process to
/// bind.
///
/// Not the kernel's pick (`bind` to port 0): that comes from the ephemeral
/// range (32768-60999 on Linux), where every outgoing connection takes its
/// local port, so between the moment it is found free and the moment the
/// child binds it a MongoDB or HTTP client connection may take it (seen as
/// "Address already in use" in the suite). These come from 10000-29999,
/// below that range, each process from a block of its own.
///
/// # Panics
/// When no port of the process's block is free after trying each a hundred
/// times.
pub fn free_port() -> u16 {
    let block = FIRST + (std::process::id() % BLOCKS) * BLOCK;
    for _ in 0..BLOCK * 100 {
        let port = block + NEXT.fetch_add(1, Ordering::Relaxed) % BLOCK;
        let port = u16::try_from(port).unwrap_or(u16::MAX);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{block}..{}", block + BLOCK);
}
