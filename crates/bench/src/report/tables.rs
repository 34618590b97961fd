//! The Markdown tables, one function per `<!-- bench:PART -->` section.

use serde_json::Value;

use super::{f, mib, ratio, thousands};

pub fn writer_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| items/batch | clients | batches | writer items/s | p50 ms | p95 ms | p99 ms | raw items/s | raw p50 | raw p95 | writer/raw | writer peak RSS |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.2} | {} |\n",
            thousands(f(r, "items")),
            r["clients"],
            r["batches"],
            thousands(f(r, "writer_items_s")),
            f(r, "p50"),
            f(r, "p95"),
            f(r, "p99"),
            thousands(f(r, "raw_items_s")),
            f(r, "raw_p50"),
            f(r, "raw_p95"),
            f(r, "writer_items_s") / f(r, "raw_items_s"),
            mib(r, "writer_rss_mib"),
        );
    }
    t
}

pub fn relay_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| backlog items | batch size | ordering key | raw publish items/s | raw marking items/s | relay items/s | relay/min(ceilings) | fenced marking items/s | relay/fenced marking | relay peak RSS |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} | `{}` | {} | {} | {} | {:.2} | {} | {} | {} |\n",
            thousands(f(r, "items")),
            thousands(f(r, "batch_size")),
            r["ordering"].as_str().unwrap_or("?"),
            thousands(f(r, "publish_ceiling")),
            thousands(f(r, "mark_ceiling")),
            thousands(f(r, "relay_items_s")),
            f(r, "relay_items_s") / f(r, "publish_ceiling").min(f(r, "mark_ceiling")),
            thousands(f(r, "fenced_marking")),
            ratio(f(r, "relay_items_s") / f(r, "fenced_marking")),
            mib(r, "relay_rss_mib"),
        );
    }
    t
}

/// Where each relay run's drain time went (`outbox_relay_drain_wait_microseconds_total`).
pub fn relay_profile_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| backlog items | ordering key | drain s | waiting on reads | waiting on Pub/Sub | waiting on writes | its own work |\n\
         |---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows.iter().filter(|r| r.get("drain_s").is_some()) {
        let drain = f(r, "drain_s");
        let share = |key: &str| {
            let s = f(r, key);
            format!("{s:.1} s ({:.0}%)", 100.0 * s / drain.max(1e-9))
        };
        let own =
            (drain - f(r, "wait_read_s") - f(r, "wait_publish_s") - f(r, "wait_write_s")).max(0.0);
        t += &format!(
            "| {} | `{}` | {:.1} | {} | {} | {} | {:.1} s ({:.0}%) |\n",
            thousands(f(r, "items")),
            r["ordering"].as_str().unwrap_or("?"),
            drain,
            share("wait_read_s"),
            share("wait_publish_s"),
            share("wait_write_s"),
            own,
            100.0 * own / drain.max(1e-9),
        );
    }
    t
}

pub fn latency_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| rate items/s | batches | wake-up | p50 ms | p95 ms | p99 ms | writer peak RSS | relay peak RSS |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            thousands(f(r, "rate")),
            r["batches"],
            r["wake"].as_str().unwrap_or("?"),
            thousands(f(r, "p50")),
            thousands(f(r, "p95")),
            thousands(f(r, "p99")),
            mib(r, "writer_rss_mib"),
            mib(r, "relay_rss_mib"),
        );
    }
    t
}

pub fn conflicts_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| items/batch | writers | counter incremented | conflicts per stored batch | item writes lost per stored batch | batches/s (model) |\n\
         |---:|---:|---|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} | {} | {:.2} | {} | {} |\n",
            thousands(f(r, "items")),
            r["writers"],
            r["counter"].as_str().unwrap_or("?"),
            f(r, "conflicts_per_batch"),
            thousands(f(r, "lost_per_batch")),
            thousands(f(r, "batches_s")),
        );
    }
    t
}

/// Aggregate drain: one row per relay count, one column per stream count.
pub fn streams_table(rows: &[Value]) -> String {
    let mut streams: Vec<u64> = rows.iter().filter_map(|r| r["streams"].as_u64()).collect();
    streams.sort_unstable();
    streams.dedup();
    let mut relays: Vec<u64> = rows.iter().filter_map(|r| r["relays"].as_u64()).collect();
    relays.sort_unstable();
    relays.dedup();
    let single = rows
        .iter()
        .find(|r| r["streams"] == 1 && r["relays"] == 1)
        .map_or(f64::NAN, |r| f(r, "items_s"));
    let mut t = String::from("| relays |");
    for s in &streams {
        t += &format!(" {s} stream{} |", if *s == 1 { "" } else { "s" });
    }
    t += "\n|---:|";
    t += &"---:|".repeat(streams.len());
    t += "\n";
    for r in &relays {
        t += &format!("| {r} |");
        for s in &streams {
            let cell = rows
                .iter()
                .find(|x| x["streams"] == *s && x["relays"] == *r)
                .map(|x| f(x, "items_s"));
            t += &match cell {
                Some(rate) => format!(" {} ({}) |", thousands(rate), ratio(rate / single)),
                None => " - |".to_owned(),
            };
        }
        t += "\n";
    }
    t
}

/// The writer on one stream or one stream per client, on the services and
/// on the model.
pub fn streams_writer_table(writer: &[Value], model: &[Value]) -> String {
    let mut t = String::from(
        "| clients | streams | writer items/s | p50 ms | p95 ms | model batches/s | model conflicts per batch |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in writer {
        let m = model
            .iter()
            .find(|m| m["streams"] == r["streams"] && m["clients"] == r["clients"]);
        t += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} |\n",
            r["clients"],
            r["streams"],
            thousands(f(r, "items_s")),
            f(r, "p50_ms"),
            f(r, "p95_ms"),
            m.map_or_else(|| "-".to_owned(), |m| thousands(f(m, "batches_s"))),
            m.map_or_else(
                || "-".to_owned(),
                |m| format!("{:.2}", f(m, "conflicts_per_batch"))
            ),
        );
    }
    t
}

/// A batch at the writer's limits beside small batches, per design and store.
pub fn big_batch_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| store | design | big batch | stored | seconds | small batches stored | small failed | small p50 ms | small p99 ms |\n\
         |---|---|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let size = match r["mib"].as_f64() {
            Some(m) => format!("{} items, {m:.1} MiB", thousands(f(r, "items"))),
            None => format!("{} items", thousands(f(r, "items"))),
        };
        t += &format!(
            "| {} | {} | {size} | {} | {:.2} | {} | {} | {:.1} | {:.1} |\n",
            r["store"].as_str().unwrap_or("?"),
            r["design"].as_str().unwrap_or("?"),
            if r["big_stored"] == true { "yes" } else { "no" },
            f(r, "big_seconds"),
            r["small_stored"],
            r["small_failed"],
            f(r, "small_p50_ms"),
            f(r, "small_p99_ms"),
        );
    }
    t
}

/// The drain rate against round-trip time: one row per (delayed side,
/// mode, batch size), one column per round trip, each cell items/s and its
/// ratio to loopback.
pub fn rtt_table(rows: &[Value]) -> String {
    let mut rtts: Vec<u64> = rows.iter().filter_map(|r| r["rtt_ms"].as_u64()).collect();
    rtts.sort_unstable();
    rtts.dedup();
    let mut keys: Vec<(String, String, u64)> = Vec::new();
    for r in rows {
        let key = (
            r["side"].as_str().unwrap_or("?").to_owned(),
            r["mode"].as_str().unwrap_or("?").to_owned(),
            r["batch_size"].as_u64().unwrap_or(0),
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut t = String::from("| delayed | ordering key | items/batch |");
    for ms in &rtts {
        t += &format!(" {ms} ms |");
    }
    t += "\n|---|---|---:|";
    t += &"---:|".repeat(rtts.len());
    t += "\n";
    for (side, mode, size) in keys {
        t += &format!("| {side} | `{mode}` | {} |", thousands(size as f64));
        for ms in &rtts {
            let cell = rows.iter().find(|r| {
                r["side"] == side.as_str()
                    && r["mode"] == mode.as_str()
                    && r["batch_size"] == size
                    && r["rtt_ms"] == *ms
            });
            t += &match cell {
                Some(r) if *ms == 0 => format!(" {} |", thousands(f(r, "items_s"))),
                Some(r) => format!(
                    " {} ({}) |",
                    thousands(f(r, "items_s")),
                    ratio(f(r, "items_s") / f(r, "loopback_items_s"))
                ),
                None => " |".to_owned(),
            };
        }
        t += "\n";
    }
    t
}

pub fn rtt_writer_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| round trip to MongoDB | p50 ms | p95 ms | items/s (one client) |\n|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} ms | {:.1} | {:.1} | {} |\n",
            r["rtt_ms"],
            f(r, "p50_ms"),
            f(r, "p95_ms"),
            thousands(f(r, "items_s"))
        );
    }
    t
}

pub fn seed_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| round trip (both) | items | the seed's algorithm items/s | ours items/s | ours ÷ seed |\n|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} ms | {} | {} | {} | {} |\n",
            r["rtt_ms"],
            thousands(f(r, "items")),
            thousands(f(r, "seed_items_s")),
            thousands(f(r, "ours_items_s")),
            ratio(f(r, "ours_items_s") / f(r, "seed_items_s"))
        );
    }
    t
}

pub fn budget_table(rows: &[Value], writer: &[Value]) -> String {
    let mut t = String::from(
        "| ordering key | items/batch | item reads | batch reads | fenced writes | statements in them | drain total | upkeep |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| `{}` | {} | {:.1} | {:.1} | {:.1} | {:.1} | **{:.1}** | {:.1} |\n",
            r["mode"].as_str().unwrap_or("?"),
            thousands(f(r, "batch_size")),
            f(r, "item_reads"),
            f(r, "batch_reads"),
            f(r, "writes"),
            f(r, "statements"),
            f(r, "drain"),
            f(r, "upkeep"),
        );
    }
    if !writer.is_empty() {
        t += "\n| the writer stores | commands | which |\n|---|---:|---|\n";
        for r in writer {
            let names: Vec<&str> = r["names"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            t += &format!(
                "| {} | {} | {} |\n",
                r["batch"].as_str().unwrap_or("?"),
                r["commands"],
                names.join(", ")
            );
        }
    }
    t
}
