//! Tables for people; `--json` prints the server's JSON instead.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde_json::Value;

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic);
    if !header.is_empty() {
        table.set_header(header.to_vec());
    }
    table
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "–".to_owned(),
        Value::String(s) => printable(s),
        other => other.to_string(),
    }
}

/// `text` with control characters escaped (`\u{1b}`): request ids, vendor
/// names and errors come from clients, and a terminal escape sequence in
/// one must not reach the operator's terminal.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `12 s`, `3 min 4 s`, `2 h 5 min`.
pub fn age(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A stream as `GET /api/v1/streams/{stream}/status` describes it.
pub fn status(status: &Value, now_ms: i64) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        (
            "Stream",
            format!(
                "{} (topic {})",
                text(&status["stream"]),
                text(&status["topic"])
            ),
        ),
        (
            "This replica",
            format!(
                "{} (pid {}), {} of this stream",
                text(&status["relay_id"]),
                text(&status["relay_pid"]),
                text(&status["role"])
            ),
        ),
    ];
    let lease = &status["lease"];
    if let Some(error) = lease["error"].as_str() {
        rows.push(("Lease", format!("unknown: {error}")));
    } else if lease.is_null() {
        rows.push(("Lease", "nobody has taken it yet".to_owned()));
    } else {
        let leader = &status["leader"];
        rows.push((
            "Leader",
            match leader["admin_url"].as_str() {
                Some(url) => format!(
                    "{} (pid {}, {url})",
                    text(&lease["holder"]),
                    text(&leader["pid"])
                ),
                None => text(&lease["holder"]),
            },
        ));
        rows.push(("Epoch", text(&lease["epoch"])));
        if let Some(expires) = lease["expires_at_ms"].as_i64() {
            let left = (expires - now_ms) as f64 / 1000.0;
            rows.push((
                "Lease",
                if left >= 0.0 {
                    format!("expires in {left:.1} s")
                } else {
                    format!("expired {:.1} s ago", -left)
                },
            ));
        }
    }
    let halt = &status["halted"];
    let draining = match (halt.is_object(), status["paused"].as_bool()) {
        (true, _) => format!(
            "halted on batch {} ({}): {}",
            text(&halt["batch_sequence"]),
            text(&halt["batch_id"]),
            text(&halt["error"])
        ),
        (_, Some(true)) => "paused".to_owned(),
        _ => "running".to_owned(),
    };
    rows.push(("Draining", draining));
    let current = &status["current_batch"];
    rows.push((
        "Current batch",
        if current.is_null() {
            "none".to_owned()
        } else {
            format!(
                "{} ({}): {}/{} sent{}",
                text(&current["batch_sequence"]),
                text(&current["batch_id"]),
                current["sent"].as_u64().unwrap_or(0),
                text(&current["total_items"]),
                current["progress_percentage"]
                    .as_f64()
                    .map(|p| format!(" ({p:.1} %)"))
                    .unwrap_or_default()
            )
        },
    ));
    rows.push(("Pending batches", text(&status["pending_batches"])));
    rows.push((
        "Oldest pending",
        status["oldest_pending_age_seconds"]
            .as_f64()
            .map(age)
            .unwrap_or_else(|| "–".to_owned()),
    ));
    rows.push((
        "Published",
        format!(
            "{} by every replica, {} by this one",
            text(&status["cluster_published_total"]),
            text(&status["published_total"])
        ),
    ));
    rows.push((
        "Committed (this replica)",
        text(&status["batches_committed_total"]),
    ));
    rows.push((
        "Last error",
        match status["last_error"].as_str() {
            Some(error) => format!("{error} (at {})", text(&status["last_error_at"])),
            None => "none".to_owned(),
        },
    ));
    let mut table = table(&[]);
    for (name, value) in rows {
        table.add_row(vec![name.to_owned(), value]);
    }
    table.to_string()
}

/// Every stream and who leads it (`GET /api/v1/streams`), then the
/// replicas (`GET /api/v1/cluster`).
pub fn streams(streams: &Value, cluster: &Value) -> String {
    let mut table = table(&[
        "Stream",
        "Topic",
        "Leader",
        "State",
        "Backlog",
        "Oldest",
        "Published",
    ]);
    for stream in streams["streams"].as_array().into_iter().flatten() {
        table.add_row(vec![
            text(&stream["stream"]),
            text(&stream["topic"]),
            stream["leader"]["relay_id"]
                .as_str()
                .map_or_else(|| "–".to_owned(), str::to_owned),
            text(&stream["state"]),
            text(&stream["backlog"]),
            stream["oldest_pending_age_seconds"]
                .as_f64()
                .map_or_else(|| "–".to_owned(), age),
            text(&stream["published_total"]),
        ]);
    }
    let mut replicas = table_of(&["Replica", "Pid", "Admin", "Leads"]);
    for replica in cluster["replicas"].as_array().into_iter().flatten() {
        let leads: Vec<String> = replica["leads"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        let name = if replica["this"] == true {
            format!("{} (this one)", text(&replica["relay_id"]))
        } else {
            text(&replica["relay_id"])
        };
        replicas.add_row(vec![
            name,
            text(&replica["pid"]),
            text(&replica["admin_url"]),
            if leads.is_empty() {
                "–".to_owned()
            } else {
                leads.join(", ")
            },
        ]);
    }
    let plural = |n: u64, one: &str, many: &str| {
        if n == 1 {
            format!("1 {one}")
        } else {
            format!("{n} {many}")
        }
    };
    for gone in cluster["gone"].as_array().into_iter().flatten() {
        replicas.add_row(vec![
            format!(
                "{} (gone since {})",
                text(&gone["relay_id"]),
                text(&gone["gone_at"])
            ),
            text(&gone["pid"]),
            "–".to_owned(),
            "–".to_owned(),
        ]);
    }
    let replica_count = cluster["replicas"].as_array().map_or(0, Vec::len) as u64;
    let mut out = format!(
        "{table}\n{replicas}\n{} over {}: each leads at most {}",
        plural(
            cluster["streams"].as_u64().unwrap_or(0),
            "stream",
            "streams"
        ),
        plural(replica_count, "replica", "replicas"),
        text(&cluster["share"])
    );
    out.push_str(&cluster_warnings(cluster));
    out
}

/// What an operator must fix: replicas whose admin token is not this one's
/// (every replica obeys what any of them stores), names two live processes
/// share.
pub fn cluster_warnings(cluster: &Value) -> String {
    let names = |key: &str| -> Vec<String> {
        cluster[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect()
    };
    let mut out = String::new();
    let mismatched = names("admin_token_mismatches");
    if !mismatched.is_empty() {
        out.push_str(&format!(
            "\nwarning: admin token missing or different on {}: give every replica the same ADMIN_TOKEN (docs/OPERATIONS.md, Security)",
            mismatched.join(", ")
        ));
    }
    let shared = names("duplicate_names");
    if !shared.is_empty() {
        out.push_str(&format!(
            "\nwarning: more than one live relay process is named {}: give each its own RELAY_ID",
            shared.join(", ")
        ));
    }
    out
}

fn table_of(header: &[&str]) -> Table {
    table(header)
}

/// The stream's ordering key as it applies to its messages: the key
/// `global` puts on every message (the stream's name; `batch-outbox` for
/// `default`), what `batch` and `field:` take it from.
fn ordering_key(stream: &Value) -> String {
    let mode = text(&stream["ordering_key"]);
    let name = text(&stream["stream"]);
    match mode.as_str() {
        "global" => {
            let key = if name == "default" {
                "batch-outbox"
            } else {
                name.as_str()
            };
            format!("global: every message on the key {key}")
        }
        "batch" => "batch: each batch's id as its key".to_owned(),
        "none" => "none: no ordering key".to_owned(),
        field => {
            // The relay puts a stream's name where `batch-outbox` would
            // be: two streams never share a key.
            let default = text(&stream["ordering_key_default"]);
            let default = if default == "batch-outbox" && name != "default" {
                name
            } else {
                default
            };
            format!("{field}: the item's value there, else the key {default}")
        }
    }
}

/// One stream's definition and live state.
pub fn stream(stream: &Value) -> String {
    let mut table = table(&[]);
    let rows = [
        ("Stream", text(&stream["stream"])),
        ("Topic", text(&stream["topic"])),
        ("Ordering key", ordering_key(stream)),
        ("On poison", text(&stream["on_poison"])),
        (
            "Schema",
            if stream["schema"].is_null() {
                "none".to_owned()
            } else {
                stream["schema"].to_string()
            },
        ),
        (
            "Writers",
            stream["writers"].as_array().map_or_else(
                || "any".to_owned(),
                |w| w.iter().map(text).collect::<Vec<_>>().join(", "),
            ),
        ),
        ("Leader", text(&stream["leader"]["relay_id"])),
        ("Epoch", text(&stream["epoch"])),
        ("State", text(&stream["state"])),
        ("Backlog", text(&stream["backlog"])),
        ("Published", text(&stream["published_total"])),
        ("Updated", text(&stream["updated_at"])),
    ];
    for (name, value) in rows {
        table.add_row(vec![name.to_owned(), value]);
    }
    table.to_string()
}

/// A page of `pending-batches`.
pub fn pending(page: &Value) -> String {
    if page["batches"].as_array().is_none_or(Vec::is_empty) && page["next_cursor"].is_null() {
        return "No batch is waiting: everything stored was published.".to_owned();
    }
    let mut table = table(&["Sequence", "Batch", "Status", "Items", "Created", "Error"]);
    for batch in page["batches"].as_array().into_iter().flatten() {
        table.add_row(
            [
                "batch_sequence",
                "batch_id",
                "status",
                "total_items",
                "created_at",
                "last_error",
            ]
            .map(|k| {
                if k == "last_error" && batch[k].is_null() {
                    String::new()
                } else {
                    text(&batch[k])
                }
            }),
        );
    }
    with_cursor(table, page)
}

/// A page of a batch's items.
pub fn items(page: &Value) -> String {
    let mut table = table(&[
        "#",
        "Request",
        "Vendor",
        "Status",
        "Pub/Sub id",
        "Sent at",
        "Error",
    ]);
    for item in page["items"].as_array().into_iter().flatten() {
        table.add_row(
            [
                "item_sequence",
                "request_id",
                "vendor_name",
                "status",
                "publish_id",
                "sent_at",
                "error",
            ]
            .map(|k| {
                if k == "error" && item[k].is_null() {
                    String::new()
                } else {
                    text(&item[k])
                }
            }),
        );
    }
    with_cursor(table, page)
}

fn with_cursor(table: Table, page: &Value) -> String {
    match page["next_cursor"].as_str() {
        Some(cursor) => format!("{table}\nmore: --cursor {cursor}"),
        None => table.to_string(),
    }
}

/// One batch as the writer's status describes it.
pub fn batch(status: &Value) -> String {
    let mut table = table(&[]);
    let rows = [
        ("Batch", text(&status["batch_id"])),
        ("Sequence", text(&status["batch_sequence"])),
        ("Status", text(&status["status"])),
        (
            "Items",
            format!(
                "{} total, {} sent, {} dead-lettered, {} pending ({:.1} %)",
                text(&status["total"]),
                text(&status["sent"]),
                text(&status["failed"]),
                text(&status["pending"]),
                status["progress_percentage"].as_f64().unwrap_or(0.0)
            ),
        ),
        ("Created", text(&status["created_at"])),
        ("Committed", text(&status["committed_at"])),
        ("Submitted by", text(&status["submitted_by"])),
        ("Last error", text(&status["last_error"])),
        ("Trace", text(&status["traceparent"])),
    ];
    for (name, value) in rows {
        table.add_row(vec![name.to_owned(), value]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What clients sent (request ids, vendor names, errors) cannot drive
    /// the operator's terminal: control characters are printed escaped.
    #[test]
    fn control_characters_from_clients_are_escaped() {
        assert_eq!(printable("acme"), "acme");
        assert_eq!(printable("ev\u{1b}[2Jil\u{7}"), "ev\\u{1b}[2Jil\\u{7}");
        assert_eq!(text(&serde_json::json!("a\nb")), "a\\nb");
    }

    #[test]
    fn ages_read_like_a_person_says_them() {
        assert_eq!(age(0.4), "0 s");
        assert_eq!(age(59.6), "1 min 0 s");
        assert_eq!(age(3725.0), "1 h 2 min");
        assert_eq!(age(-3.0), "0 s");
    }

    #[test]
    fn the_status_table_says_who_leads_and_why_draining_stopped() {
        let status = json!({"stream": "default", "topic": "batch-outbox", "relay_id": "relay-1", "relay_pid": 42, "role": "leader",
            "lease": {"holder": "relay-1", "epoch": 7, "expires_at_ms": 11_500},
            "paused": false, "halted": {"batch_id": "00000000000000aa", "batch_sequence": 3, "error": "poison"},
            "current_batch": null, "pending_batches": 4, "oldest_pending_age_seconds": 75.0,
            "published_total": 10, "batches_committed_total": 2, "last_error": null});
        let table = status_table(&status);
        for expected in [
            "relay-1 (pid 42), leader of this stream",
            "Epoch",
            "7",
            "expires in 1.5 s",
            "halted on batch 3 (00000000000000aa): poison",
            "1 min 15 s",
            "Last error",
        ] {
            assert!(table.contains(expected), "{expected} missing from\n{table}");
        }
    }

    fn status_table(status: &Value) -> String {
        super::status(status, 10_000)
    }

    #[test]
    fn an_empty_page_says_so() {
        assert_eq!(
            pending(&json!({"batches": [], "next_cursor": null})),
            "No batch is waiting: everything stored was published."
        );
    }

    #[test]
    fn a_page_with_more_says_how_to_go_on() {
        let page = json!({"batches": [{"batch_sequence": 1, "batch_id": "00000000000000aa", "status": "pending",
            "total_items": 3, "created_at": "2026-11-29T00:00:00.000Z", "last_error": null}], "next_cursor": "1"});
        let text = pending(&page);
        assert!(
            text.contains("00000000000000aa") && text.ends_with("more: --cursor 1"),
            "{text}"
        );
    }
}
