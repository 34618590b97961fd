//! What a run did, line by line, stamped with virtual time: printed for a
//! failing seed, and hashed to show that a seed replays exactly.

use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::time::Instant;

#[derive(Clone)]
pub struct Trace {
    lines: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

impl Trace {
    pub fn new() -> Self {
        Self {
            lines: Arc::default(),
            started: Instant::now(),
        }
    }

    pub fn log(&self, line: impl Into<String>) {
        let ms = self.started.elapsed().as_millis();
        let line = format!("{:>4}.{:03} {}", ms / 1000, ms % 1000, line.into());
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// SHA-256 of every line: two runs of one seed give the same.
    pub fn digest(&self) -> String {
        let mut hash = Sha256::new();
        for line in self.lines() {
            hash.update(line.as_bytes());
            hash.update(b"\n");
        }
        hex::encode(hash.finalize())
    }
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}
