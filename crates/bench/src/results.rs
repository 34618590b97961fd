//! Every measurement as one JSON line in `BENCH_RESULTS` (when set), for
//! `outbox-bench report` to turn into docs/BENCHMARKS.md's tables and charts.

use std::io::Write;

use serde_json::Value;

/// Appends `record` (an object with a `part`) to the results file.
pub fn record(record: Value) {
    let Some(path) = std::env::var_os("BENCH_RESULTS") else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{record}"));
    if let Err(e) = written {
        eprintln!("cannot record a result in {}: {e}", path.to_string_lossy());
    }
}
