//! Checks deliveries against the contract as they arrive: each item's
//! first delivery in order on its ordering key, and in `global` mode (one
//! key a stream) batches whole: no first delivery of a later batch before
//! every item of the batch before it. Duplicates are counted. Pure bookkeeping: `outboxctl tail
//! --verify`, the [`Consumer`](crate::Consumer) and the chaos suite's
//! checker all use it.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::item::{Item, Lane, Position};

/// What the stream's ordering-key mode promises (docs/CONSUMING.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Contract {
    /// `global`: one key; first deliveries in (`batch_sequence`,
    /// `item_sequence`) order, batches whole.
    #[default]
    Global,
    /// `batch` and `field:`: first deliveries in order on each key; nothing
    /// across keys.
    PerKey,
}

/// What one delivery was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The item's first delivery, where the contract says it may come.
    First,
    /// Another delivery of an item already delivered (allowed: delivery is
    /// at least once).
    Duplicate,
    /// A first delivery that came after a later item on its ordering key.
    OutOfOrder { after: Position },
    /// A first delivery of a batch before the batch before it, in its
    /// lane, was complete (`missing` of its items had not come).
    BatchInterleaved { unfinished_batch: u64, missing: u64 },
}

/// How a lane's batches are going.
#[derive(Clone, Debug, Default)]
struct LaneState {
    /// The batch whose first deliveries come now, and how many of its
    /// items came.
    current: Option<(u64, u64, u64)>,
    /// Batches that started and never completed.
    incomplete: u64,
    /// Batch sequences skipped (never delivered) between two batches.
    skipped: u64,
}

/// Counts over everything observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub firsts: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// First deliveries of a batch before the one before it was complete.
    pub interleaved: u64,
    /// Batches a later batch followed before they were complete.
    pub incomplete_batches: u64,
    /// Sequence numbers a lane jumped over (batches never seen).
    pub skipped_batches: u64,
}

impl Report {
    /// Whether the order contract held (duplicates are allowed).
    pub fn held(&self) -> bool {
        self.out_of_order == 0 && self.interleaved == 0 && self.incomplete_batches == 0
    }
}

/// The bookkeeping. Remembers every item id it saw (a checker's memory;
/// a long-running consumer deduplicates with a bounded
/// [`SeenStore`](crate::SeenStore) instead).
#[derive(Debug, Default)]
pub struct Verifier {
    contract: Contract,
    seen: HashSet<String>,
    last_on_key: HashMap<(Lane, String), Position>,
    lanes: BTreeMap<Lane, LaneState>,
    report: Report,
}

impl Verifier {
    pub fn new(contract: Contract) -> Self {
        Self {
            contract,
            ..Self::default()
        }
    }

    /// Observes one delivery.
    pub fn observe(&mut self, item: &Item) -> Verdict {
        if !self.seen.insert(item.dedup_key()) {
            self.report.duplicates += 1;
            return Verdict::Duplicate;
        }
        self.report.firsts += 1;
        let lane = item.lane();
        let key = (lane.clone(), item.ordering_key.clone());
        let mut verdict = Verdict::First;
        match self.last_on_key.get(&key) {
            Some(last) if *last >= item.position => {
                self.report.out_of_order += 1;
                verdict = Verdict::OutOfOrder { after: *last };
            }
            _ => {
                self.last_on_key.insert(key, item.position);
            }
        }
        if self.contract == Contract::PerKey {
            return verdict;
        }
        let state = self.lanes.entry(lane).or_default();
        let batch = item.position.batch_sequence;
        match state.current {
            Some((current, came, total)) if current == batch => {
                state.current = Some((current, came + 1, total));
            }
            Some((current, came, total)) if batch > current => {
                if came < total {
                    state.incomplete += 1;
                    self.report.incomplete_batches += 1;
                    self.report.interleaved += 1;
                    if verdict == Verdict::First {
                        verdict = Verdict::BatchInterleaved {
                            unfinished_batch: current,
                            missing: total - came,
                        };
                    }
                }
                let skipped = batch - current - 1;
                state.skipped += skipped;
                self.report.skipped_batches += skipped;
                state.current = Some((batch, 1, item.batch_total_items));
            }
            Some((current, _, _)) => {
                // A first delivery of an earlier batch than the current.
                self.report.interleaved += 1;
                if verdict == Verdict::First {
                    verdict = Verdict::BatchInterleaved {
                        unfinished_batch: batch,
                        missing: 0,
                    };
                }
                let _ = current;
            }
            None => state.current = Some((batch, 1, item.batch_total_items)),
        }
        verdict
    }

    /// The counts so far; a lane's last batch counts as incomplete if not
    /// all of it came (call at the end).
    pub fn report(&self) -> Report {
        self.report.clone()
    }

    /// [`report`](Self::report), counting every lane's last batch that did
    /// not come whole.
    pub fn final_report(&self) -> Report {
        let mut report = self.report.clone();
        report.incomplete_batches += self
            .lanes
            .values()
            .filter(|s| s.current.is_some_and(|(_, came, total)| came < total))
            .count() as u64;
        report
    }

    /// Deliveries seen so far, duplicates aside.
    pub fn seen(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::tests::item;

    #[test]
    fn in_order_deliveries_with_duplicates_hold_the_contract() {
        let mut v = Verifier::new(Contract::Global);
        let deliveries = [
            item(1, 1, 2),
            item(1, 2, 2),
            item(1, 2, 2),
            item(2, 1, 1),
            item(1, 1, 2),
        ];
        let verdicts: Vec<Verdict> = deliveries.iter().map(|i| v.observe(i)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::First,
                Verdict::First,
                Verdict::Duplicate,
                Verdict::First,
                Verdict::Duplicate
            ]
        );
        let report = v.final_report();
        assert!(report.held(), "{report:?}");
        assert_eq!((report.firsts, report.duplicates), (3, 2));
    }

    #[test]
    fn a_first_delivery_behind_a_later_item_and_a_batch_left_unfinished_are_reported() {
        let mut v = Verifier::new(Contract::Global);
        v.observe(&item(1, 2, 3));
        assert_eq!(
            v.observe(&item(1, 1, 3)),
            Verdict::OutOfOrder {
                after: Position {
                    batch_sequence: 1,
                    item_sequence: 2
                }
            }
        );
        assert_eq!(
            v.observe(&item(2, 1, 1)),
            Verdict::BatchInterleaved {
                unfinished_batch: 1,
                missing: 1
            }
        );
        let report = v.final_report();
        assert_eq!(report.out_of_order, 1);
        assert_eq!(report.incomplete_batches, 1);
        assert!(!report.held());
    }

    #[test]
    fn per_key_only_ignores_batches_across_keys() {
        let mut v = Verifier::new(Contract::PerKey);
        let mut a = item(2, 1, 1);
        a.ordering_key = "b2".to_owned();
        let mut b = item(1, 1, 1);
        b.ordering_key = "b1".to_owned();
        assert_eq!(
            (v.observe(&a), v.observe(&b)),
            (Verdict::First, Verdict::First)
        );
        assert!(v.final_report().held());
    }

    #[test]
    fn a_replay_is_its_own_lane_and_a_skipped_batch_is_counted() {
        let mut v = Verifier::new(Contract::Global);
        v.observe(&item(5, 1, 1));
        // A replayed copy of batch 1 keeps the item's id, in a lane of its own.
        let mut replayed = item(1, 1, 1);
        replayed.replay_id = Some("r1".to_owned());
        assert_eq!(v.observe(&replayed), Verdict::First);
        v.observe(&item(7, 1, 1));
        let report = v.final_report();
        assert!(report.held(), "{report:?}");
        assert_eq!(report.skipped_batches, 1);
    }
}
