//! Malformed and hostile requests to the writer and the admin port: each
//! must get a clear 4xx problem+json with a stable code, nothing may be
//! stored, and both processes must stay healthy.

use std::io::Write;
use std::time::Duration;

use mongodb::bson::{Document, doc};
use reqwest::Method;

use crate::check::Invariants;
use crate::scenarios::Report;
use crate::stack::{ADMIN_TOKEN, Stack};

/// One request and what must come back.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// The expected status; `None`: any 4xx.
    status: Option<u16>,
    /// The expected problem `code`; `None` where the answer comes from the
    /// HTTP layer before the app (no problem+json there).
    code: Option<&'static str>,
    admin: bool,
}

fn case(name: &'static str, body: impl Into<Vec<u8>>, status: u16, code: &'static str) -> Case {
    Case {
        name,
        method: Method::POST,
        path: "/api/v1/batch/process".into(),
        headers: vec![("content-type", "application/json".into())],
        body: body.into(),
        status: Some(status),
        code: Some(code),
        admin: false,
    }
}

fn with_header(mut case: Case, name: &'static str, value: impl Into<String>) -> Case {
    case.headers.retain(|(n, _)| *n != name);
    case.headers.push((name, value.into()));
    case
}

fn get(name: &'static str, path: impl Into<String>, status: u16, code: &'static str) -> Case {
    Case {
        method: Method::GET,
        path: path.into(),
        headers: Vec::new(),
        body: Vec::new(),
        ..case(name, "", status, code)
    }
}

fn admin(mut case: Case) -> Case {
    case.admin = true;
    case
}

/// An admin GET with the token: every admin `/api` route needs it.
fn admin_get(name: &'static str, path: impl Into<String>, status: u16, code: &'static str) -> Case {
    admin(with_header(
        get(name, path, status, code),
        "authorization",
        format!("Bearer {ADMIN_TOKEN}"),
    ))
}

fn nested(depth: usize) -> String {
    format!("[{{\"a\":{}1{}}}]", "[".repeat(depth), "]".repeat(depth))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

fn cases() -> Vec<Case> {
    let valid_unknown = "0123456789abcdef";
    let bearer = |token: &str| format!("Bearer {token}");
    let mut cases = vec![
        case("empty body", "", 422, "empty_body"),
        case("truncated array", "[", 400, "invalid_json"),
        case(
            "truncated after an item",
            "[{\"a\":1},",
            400,
            "invalid_json",
        ),
        case(
            "truncated at depth 3",
            "[{\"a\":{\"b\":{\"c\":",
            400,
            "invalid_json",
        ),
        case("trailing garbage", "[{\"a\":1}] x", 400, "invalid_json"),
        case(
            "invalid UTF-8",
            b"[{\"a\":\"\xff\xfe\"}]".to_vec(),
            400,
            "invalid_json",
        ),
        case(
            "lone surrogate escape",
            "[{\"a\":\"\\ud800\"}]",
            400,
            "invalid_json",
        ),
        case("NaN literal", "[{\"a\":NaN}]", 400, "invalid_json"),
        case(
            "Infinity literal",
            "[{\"a\":Infinity}]",
            400,
            "invalid_json",
        ),
        case("number beyond f64", "[{\"a\":1e400}]", 400, "invalid_json"),
        case(
            "nesting past the depth limit",
            nested(200),
            400,
            "invalid_json",
        ),
        case(
            "100,000-element array",
            format!("[{}]", vec!["{}"; 100_000].join(",")),
            413,
            "batch_too_large",
        ),
        case("empty array", "[]", 422, "empty_batch"),
        case("array of numbers", "[1,2]", 422, "item_not_object"),
        case(
            "requests not an array",
            "{\"requests\":\"x\"}",
            422,
            "invalid_batch",
        ),
        case("a bare number", "42", 422, "invalid_batch"),
        case("null", "null", 422, "invalid_batch"),
        case(
            "duplicate keys",
            "[{\"a\":1,\"a\":2}]",
            422,
            "duplicate_key",
        ),
        case(
            "duplicate nested keys",
            "[{\"a\":{\"b\":1,\"b\":1}}]",
            422,
            "duplicate_key",
        ),
        case("NUL in a key", "[{\"a\\u0000b\":1}]", 422, "invalid_key"),
        case(
            "byte-order mark",
            b"\xef\xbb\xbf[{\"a\":1}]".to_vec(),
            400,
            "invalid_json",
        ),
        with_header(
            case("text/plain", "[{\"a\":1}]", 415, "unsupported_media_type"),
            "content-type",
            "text/plain",
        ),
        with_header(
            case("application/xml", "<a/>", 415, "unsupported_media_type"),
            "content-type",
            "application/xml",
        ),
        with_header(
            case("latin-1 charset", "[{\"a\":1}]", 415, "unsupported_charset"),
            "content-type",
            "application/json; charset=iso-8859-1",
        ),
        with_header(
            case(
                "NDJSON with a bad line",
                "{\"a\":1}\n{\"a\":",
                400,
                "invalid_json",
            ),
            "content-type",
            "application/x-ndjson",
        ),
        with_header(
            case("NDJSON of blank lines", "\n\n  \n", 422, "empty_body"),
            "content-type",
            "application/x-ndjson",
        ),
        with_header(
            case(
                "CSV with a short row",
                "a,b\r\n1,2\r\n3\r\n",
                422,
                "csv_field_count",
            ),
            "content-type",
            "text/csv",
        ),
        with_header(
            case(
                "CSV with a duplicate header",
                "a,a\n1,2\n",
                422,
                "csv_header",
            ),
            "content-type",
            "text/csv",
        ),
        with_header(
            case("CSV header only", "a,b\n", 422, "csv_no_rows"),
            "content-type",
            "text/csv",
        ),
        with_header(
            case(
                "CSV with invalid UTF-8",
                b"a\n\xff\xfe\n".to_vec(),
                400,
                "invalid_csv",
            ),
            "content-type",
            "text/csv",
        ),
        with_header(
            case(
                "CSV with an unterminated quote",
                "a,b\n\"1,2\n",
                422,
                "csv_quote",
            ),
            "content-type",
            "text/csv",
        ),
        with_header(
            case(
                "CSV whose unterminated quote would swallow the next row",
                "request_id,vendor_name\nm1,\"unterminated\nm2,acme\n",
                422,
                "csv_quote",
            ),
            "content-type",
            "text/csv",
        ),
        with_header(
            case(
                "CSV with a bare quote in an unquoted field",
                "a,b\nab\"cd,2\n",
                422,
                "csv_quote",
            ),
            "content-type",
            "text/csv",
        ),
        with_header(
            case(
                "over-long idempotency key",
                "[{\"a\":1}]",
                400,
                "invalid_idempotency_key",
            ),
            "idempotency-key",
            "k".repeat(300),
        ),
        with_header(
            case(
                "idempotency key with spaces",
                "[{\"a\":1}]",
                400,
                "invalid_idempotency_key",
            ),
            "idempotency-key",
            "a key",
        ),
        with_header(
            case(
                "declared length over the limit",
                "[{\"a\":1}]",
                413,
                "batch_too_large",
            ),
            "x-filler",
            "x",
        ),
        with_header(
            case("over-long header", "[{\"a\":1}]", 431, "headers_too_large"),
            "x-filler",
            "x".repeat(64 * 1024),
        ),
        admin(with_header(
            get(
                "admin over-long header",
                "/api/v1/outbox/status",
                431,
                "headers_too_large",
            ),
            "x-filler",
            "x".repeat(64 * 1024),
        )),
        Case {
            method: Method::PUT,
            ..case(
                "PUT on the batch route",
                "[{\"a\":1}]",
                405,
                "method_not_allowed",
            )
        },
        get(
            "GET on the batch route",
            "/api/v1/batch/process",
            405,
            "method_not_allowed",
        ),
        get(
            "path traversal in a batch id",
            "/api/v1/batch/%2e%2e%2f%2e%2e%2fetc%2fpasswd/status",
            400,
            "invalid_batch_id",
        ),
        get(
            "over-long batch id",
            format!("/api/v1/batch/{}/status", "a".repeat(1000)),
            400,
            "invalid_batch_id",
        ),
        get(
            "unicode batch id",
            "/api/v1/batch/%C3%A9%C3%A9/status",
            400,
            "invalid_batch_id",
        ),
        get(
            "unknown batch",
            format!("/api/v1/batch/{valid_unknown}/status"),
            404,
            "batch_not_found",
        ),
        get("unknown route", "/api/v2/anything", 404, "route_not_found"),
        admin(Case {
            headers: Vec::new(),
            ..case("admin stop without a token", "", 401, "unauthorized")
        }),
        admin(Case {
            headers: vec![("authorization", bearer("wrong"))],
            ..case("admin stop with a wrong token", "", 401, "unauthorized")
        }),
        admin(Case {
            headers: vec![("authorization", "Bearer".into())],
            ..case("admin stop with an empty bearer", "", 401, "unauthorized")
        }),
        admin(Case {
            headers: vec![("authorization", "Basic YTpi".into())],
            ..case("admin stop with basic auth", "", 401, "unauthorized")
        }),
        admin(Case {
            headers: vec![("authorization", bearer(ADMIN_TOKEN))],
            ..case("admin retry of a malformed id", "", 400, "invalid_batch_id")
        }),
        admin(Case {
            headers: vec![("authorization", bearer(ADMIN_TOKEN))],
            ..case(
                "admin retry of an unknown batch",
                "",
                404,
                "batch_not_found",
            )
        }),
        admin_get(
            "admin items of an unknown batch",
            format!("/api/v1/outbox/batch/{valid_unknown}/items"),
            404,
            "batch_not_found",
        ),
        admin_get(
            "admin negative limit",
            "/api/v1/outbox/pending-batches?limit=-1",
            400,
            "invalid_query",
        ),
        admin_get(
            "admin non-numeric limit",
            "/api/v1/outbox/pending-batches?limit=abc",
            400,
            "invalid_query",
        ),
        admin_get(
            "admin unknown route",
            "/api/v1/outbox/../../etc/passwd",
            404,
            "route_not_found",
        ),
    ];
    // Paths of the admin POST cases.
    for case in &mut cases {
        if case.admin && case.method == Method::POST {
            case.path = match case.name {
                "admin retry of a malformed id" => "/api/v1/outbox/batch/..%2f..%2fx/retry".into(),
                "admin retry of an unknown batch" => {
                    format!("/api/v1/outbox/batch/{valid_unknown}/retry")
                }
                _ => "/api/v1/outbox/stop".into(),
            };
        }
    }
    let bomb = gzip(&vec![b' '; 64 * 1024 * 1024]);
    cases.push(with_header(
        Case {
            status: None,
            code: None,
            ..case("gzip bomb (64 MiB of spaces)", bomb, 413, "-")
        },
        "content-encoding",
        "gzip",
    ));
    cases
}

/// Sends every case; returns the report. Fails the invariants (as
/// `unexpected`) for every answer that was not the expected one.
///
/// # Errors
/// When the system cannot be started.
pub async fn bad_input() -> anyhow::Result<Report> {
    let stack = Stack::start("bad-input", 1, 1).await?;
    let writer = stack.writers[0].url.clone();
    let relay = stack.relays[0].url.clone();
    let mut wrong = Vec::new();
    let cases = cases();
    for case in &cases {
        let base = if case.admin { &relay } else { &writer };
        let mut request = stack
            .http
            .request(case.method.clone(), format!("{base}{}", case.path))
            .timeout(Duration::from_secs(30))
            .body(case.body.clone());
        for (name, value) in &case.headers {
            request = request.header(*name, value);
        }
        if case.name == "declared length over the limit" {
            request = request.header("content-length", (1_u64 << 40).to_string());
        }
        let outcome = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let problem = response
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let code = body["code"].as_str().unwrap_or("").to_owned();
                let status_ok = case
                    .status
                    .map_or((400..500).contains(&status), |s| s == status);
                let code_ok = case.code.is_none_or(|c| problem && c == code);
                (status_ok && code_ok)
                    .then_some(())
                    .ok_or(format!("{status} {code}"))
            }
            // The server may close the connection on a request it will not
            // read (an over-long header): that is a refusal too.
            Err(e) if case.code.is_none() => {
                let _ = e;
                Ok(())
            }
            Err(e) => Err(format!("no answer: {e}")),
        };
        if let Err(got) = outcome {
            wrong.push(format!(
                "{}: expected {:?} {:?}, got {got}",
                case.name, case.status, case.code
            ));
        }
    }
    // Concurrent stop/start: every answer 200, and the last word holds.
    let calls = (0..20).map(|i| {
        let action = if i % 2 == 0 { "stop" } else { "start" };
        stack
            .http
            .post(format!("{relay}/api/v1/outbox/{action}"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
    });
    for answer in futures::future::join_all(calls).await {
        match answer {
            Ok(r) if r.status().is_success() => {}
            other => wrong.push(format!(
                "concurrent stop/start: {:?}",
                other.map(|r| r.status())
            )),
        }
    }
    let started = stack
        .http
        .post(format!("{relay}/api/v1/outbox/start"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await?;
    if !started.status().is_success() {
        wrong.push("start after the storm".into());
    }

    let db = stack.db().await?;
    let stored = db
        .collection::<Document>("batches")
        .count_documents(doc! {})
        .await?
        + db.collection::<Document>("batch_items")
            .count_documents(doc! {})
            .await?;
    for (what, url) in [("writer", &writer), ("relay", &relay)] {
        let live = stack.http.get(format!("{url}/health/live")).send().await;
        if !live.is_ok_and(|r| r.status().is_success()) {
            wrong.push(format!("the {what} is not healthy afterwards"));
        }
    }
    for line in &wrong {
        println!("bad input: {line}");
    }
    let invariants = Invariants {
        unexpected: wrong.len(),
        half_stored: usize::try_from(stored).unwrap_or(usize::MAX),
        ..Invariants::default()
    };
    Ok(Report {
        scenario: "bad-input",
        faults: format!(
            "{} malformed or hostile requests + 20 concurrent stop/start",
            cases.len()
        ),
        invariants,
        figures: vec![
            ("answers not as expected".into(), wrong.len().to_string()),
            ("documents stored".into(), stored.to_string()),
        ],
        took: Duration::ZERO,
    })
}
