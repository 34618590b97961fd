//! `outboxctl submit`: one batch a file, with a content-derived
//! Idempotency-Key, an upload progress bar and safe retries.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cli::Format;
use crate::client::{Client, Failure, Service, json_of};

const CHUNK: usize = 64 * 1024;
/// Bodies at least this big get an upload progress bar.
const BAR_FROM: usize = 1024 * 1024;
/// The longest a Retry-After is honoured before the next attempt.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// A file read and ready to send.
pub struct Upload {
    pub name: String,
    pub body: Bytes,
    pub format: Format,
    pub key: String,
}

impl Upload {
    /// Reads `path` (`-` for standard input) and settles its format and key.
    pub fn read(path: &Path, format: Option<Format>, key: Option<&str>) -> Result<Self, Failure> {
        let name = path.display().to_string();
        let body = if name == "-" {
            let mut buffer = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buffer)
                .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
            buffer
        } else {
            std::fs::read(path).map_err(|e| Failure::Usage(format!("cannot read {name}: {e}")))?
        };
        let content = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&body);
        if content.iter().all(u8::is_ascii_whitespace) {
            // What the writer would answer (422 empty_body), said before sending.
            return Err(Failure::Usage(format!(
                "{name} is empty: a batch needs at least one item (empty_body)"
            )));
        }
        let format = format.or_else(|| format_of(path, &body)).ok_or_else(|| {
            Failure::Usage(format!(
                "cannot tell the format of {name}: name it .json, .ndjson or .csv, or pass --format"
            ))
        })?;
        let key = match key {
            Some(key)
                if !(1..=255).contains(&key.len())
                    || !key.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                return Err(Failure::Usage(
                    "--idempotency-key must be 1 to 255 visible ASCII characters".to_owned(),
                ));
            }
            Some(key) => key.to_owned(),
            None => derived_key(format, &body),
        };
        Ok(Self {
            name,
            body: Bytes::from(body),
            format,
            key,
        })
    }
}

/// The format by extension, else by the first character that is not
/// white space (`[` a JSON array, `{` NDJSON).
pub fn format_of(path: &Path, body: &[u8]) -> Option<Format> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("json") => Some(Format::Json),
        Some("ndjson" | "jsonl") => Some(Format::Ndjson),
        Some("csv") => Some(Format::Csv),
        _ => match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => Some(Format::Json),
            Some(b'{') => Some(Format::Ndjson),
            _ => None,
        },
    }
}

/// `outboxctl-sha256-<hex>` of the format and the bytes: the same file
/// sent again is the same request, another file another one.
pub fn derived_key(format: Format, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(content_type(format).as_bytes());
    hash.update([0]);
    hash.update(body);
    format!("outboxctl-sha256-{}", hex::encode(hash.finalize()))
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Json => "application/json",
        Format::Ndjson => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
    }
}

/// What the writer stored.
pub struct Stored {
    pub batch_id: String,
    pub batch_sequence: u64,
    pub items: u64,
    pub replayed: bool,
}

impl Stored {
    pub fn to_json(&self, upload: &Upload) -> Value {
        json!({
            "file": upload.name,
            "batch_id": self.batch_id,
            "batch_sequence": self.batch_sequence,
            "items": self.items,
            "replayed": self.replayed,
            "idempotency_key": upload.key,
        })
    }
}

/// Sends the batch; an unavailable writer (no answer, 5xx, 429) is tried
/// again `retries` times, which the Idempotency-Key makes safe.
pub async fn submit(
    client: &Client,
    stream: &str,
    upload: &Upload,
    retries: u32,
    bars: bool,
) -> Result<Stored, Failure> {
    let mut attempt = 0;
    loop {
        match send_once(client, stream, upload, bars).await {
            Ok(stored) => return Ok(stored),
            Err((Failure::Unavailable(reason), retry_after)) if attempt < retries => {
                attempt += 1;
                let wait = retry_after
                    .unwrap_or_else(|| Duration::from_millis(500) * 2u32.pow(attempt - 1))
                    .min(MAX_RETRY_WAIT);
                eprintln!(
                    "{}: {reason}; trying again in {:.1} s ({attempt} of {retries})",
                    upload.name,
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            Err((failure, _)) => return Err(failure),
        }
    }
}

async fn send_once(
    client: &Client,
    stream: &str,
    upload: &Upload,
    bars: bool,
) -> Result<Stored, (Failure, Option<Duration>)> {
    let bar = if bars && upload.body.len() >= BAR_FROM {
        let bar = ProgressBar::new(upload.body.len() as u64).with_prefix(upload.name.clone());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let chunks: Vec<Bytes> = (0..upload.body.len())
        .step_by(CHUNK)
        .map(|start| {
            upload
                .body
                .slice(start..(start + CHUNK).min(upload.body.len()))
        })
        .collect();
    let counted = bar.clone();
    let body = futures::stream::iter(chunks).map(move |chunk| {
        counted.inc(chunk.len() as u64);
        Ok::<_, std::io::Error>(chunk)
    });
    let request = client
        .request(
            Service::Writer,
            Method::POST,
            &format!("/api/v1/streams/{stream}/batches"),
        )
        .header(CONTENT_TYPE, content_type(upload.format))
        .header(CONTENT_LENGTH, upload.body.len())
        .header("Idempotency-Key", &upload.key)
        .body(reqwest::Body::wrap_stream(body));
    let response = client.send(Service::Writer, request).await;
    bar.finish_and_clear();
    let response = response.map_err(|f| (f, None))?;
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let replayed = response
        .headers()
        .get("Idempotent-Replayed")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let body = json_of(response).await.map_err(|f| (f, retry_after))?;
    let data = &body["data"];
    match (data["batch_id"].as_str(), data["batch_sequence"].as_u64()) {
        (Some(batch_id), Some(batch_sequence)) => Ok(Stored {
            batch_id: batch_id.to_owned(),
            batch_sequence,
            items: data["total_json_objects"].as_u64().unwrap_or_default(),
            replayed,
        }),
        _ => Err((
            Failure::Unavailable(format!("the writer's answer has no batch id: {body}")),
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_comes_from_the_extension_then_the_first_character() {
        let format = |name: &str, body: &str| format_of(Path::new(name), body.as_bytes());
        assert_eq!(format("a.JSON", "{"), Some(Format::Json));
        assert_eq!(format("a.jsonl", "["), Some(Format::Ndjson));
        assert_eq!(format("a.csv", "["), Some(Format::Csv));
        assert_eq!(format("-", "\n  [{}]"), Some(Format::Json));
        assert_eq!(format("a.txt", "{\"a\":1}\n"), Some(Format::Ndjson));
        assert_eq!(format("a.txt", "a,b\n1,2\n"), None);
        assert_eq!(format("a", ""), None);
    }

    #[test]
    fn the_derived_key_follows_the_content_and_the_format() {
        let key = derived_key(Format::Json, b"[{}]");
        assert_eq!(key, derived_key(Format::Json, b"[{}]"));
        assert_ne!(key, derived_key(Format::Json, b"[{} ]"));
        assert_ne!(key, derived_key(Format::Ndjson, b"[{}]"));
        assert!(key.starts_with("outboxctl-sha256-") && key.len() == 17 + 64);
        assert!(key.bytes().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn a_given_key_must_be_one_the_writer_takes() {
        let dir = std::env::temp_dir().join(format!("outboxctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let file = dir.join("batch.json");
        std::fs::write(&file, "[{}]").unwrap_or_default();
        assert!(matches!(
            Upload::read(&file, None, Some("has space")),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(
            Upload::read(&file, None, Some("")),
            Err(Failure::Usage(_))
        ));
        let upload = Upload::read(&file, None, Some("mine-1"));
        assert!(upload.is_ok_and(|u| u.key == "mine-1" && u.format == Format::Json));
        assert!(matches!(
            Upload::read(&dir.join("missing.json"), None, None),
            Err(Failure::Usage(m)) if m.contains("missing.json")
        ));
    }
}
