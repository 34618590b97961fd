//! The chaos suite of batch-outbox: starts the real processes (writers,
//! 2-3 relays, MongoDB or its stand-in, the Pub/Sub emulator), drives load
//! through the writers, injects faults, consumes the topic with an ordered
//! subscription, and checks the invariants at the end (see [`check`]).
//!
//! # Layout
//! - [`cluster`]: processes: start, signal, kill, restart.
//! - [`stack`]: one scenario's system, the load generator and the consumer.
//! - [`check`]: the invariants, counted.
//! - [`scenarios`]: what is injected, and the figures each reports.
//!
//! `outbox-chaos [--length short|full] [SCENARIO ...]` (`scripts/chaos.sh`)
//! prints one table; `scripts/test.sh` runs the short form of each.

pub mod bad_input;
pub mod check;
pub mod cluster;
pub mod proxy;
pub mod scenarios;
pub mod stack;

pub use scenarios::{Length, Report, SCENARIOS, run};

/// The table for a set of reports.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<16} {:>7} {:>7} {:>5} {:>6} {:>5} {:>5} {:>6} {:>4} {:>5} {:>5} {:>6}  {}\n",
        "scenario",
        "batches",
        "items",
        "lost",
        "order",
        "dups",
        "marks",
        "uncomm",
        "gaps",
        "half",
        "stale",
        "held",
        "faults"
    ));
    for r in reports {
        let i = &r.invariants;
        out.push_str(&format!(
            "{:<16} {:>7} {:>7} {:>5} {:>6} {:>5} {:>5} {:>6} {:>4} {:>5} {:>5} {:>6}  {}\n",
            r.scenario,
            i.batches,
            i.items,
            i.lost + i.unexpected,
            i.out_of_order,
            i.duplicates,
            i.bad_marks,
            i.uncommitted,
            i.sequence_gaps,
            i.half_stored,
            i.stale_epoch_writes,
            if i.held() { "yes" } else { "NO" },
            r.faults
        ));
        for (name, value) in &r.figures {
            out.push_str(&format!("{:<16}   {name}: {value}\n", ""));
        }
        out.push_str(&format!("{:<16}   ran {:.0} s\n", "", r.took.as_secs_f64()));
    }
    out.push_str(
        "columns: lost = accepted but never delivered (+ delivered but never accepted); order = first deliveries out of \
         (batch_sequence, item_sequence) order; dups = redeliveries (allowed); marks = stored items not sent with the \
         publish_id of one of their deliveries; uncomm = batches not committed; gaps = missing batch_sequence numbers; \
         half = batches stored without all their items; stale = marks or commits written under a superseded epoch\n",
    );
    out
}
