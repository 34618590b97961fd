//! The OpenAPI document and the docs page, served by the writer itself.

use outbox_core::memory::MemoryStore;
use outbox_service::openapi::{document_problems, operations};
use serde_json::Value;

use crate::helpers::{json, spawn_memory_app};

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_the_docs_page_works_offline() {
    let app = spawn_memory_app(MemoryStore::new());
    let response = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let doc: Value = json(response).await;
    assert_eq!(document_problems(&doc), Vec::<String>::new());
    let routes: Vec<(String, String)> = [
        ("GET", "/api/v1/batch/{batch_id}/status"),
        ("GET", "/health/live"),
        ("GET", "/health/ready"),
        ("GET", "/metrics"),
        ("POST", "/api/v1/batch/process"),
        ("POST", "/api/v1/streams/{stream}/batches"),
    ]
    .iter()
    .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
    .collect();
    assert_eq!(operations(&doc), routes);

    let post = &doc["paths"]["/api/v1/batch/process"]["post"];
    let bodies: Vec<&String> = post["requestBody"]["content"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        bodies,
        ["application/json", "application/x-ndjson", "text/csv"]
    );
    let headers: Vec<&str> = post["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(headers, ["Idempotency-Key", "traceparent"]);
    let created = &post["responses"]["201"]["headers"];
    for header in ["Location", "Idempotent-Replayed", "traceparent"] {
        assert!(created.get(header).is_some(), "201 lacks {header}");
    }
    assert!(
        post["responses"]["503"]["headers"]
            .get("Retry-After")
            .is_some()
    );
    let text = doc.to_string();
    for code in [
        "invalid_json",
        "invalid_csv",
        "unauthorized",
        "batch_too_large",
        "item_too_large",
        "unsupported_media_type",
        "duplicate_key",
        "empty_body",
        "body_too_complex",
        "writer_busy",
        "body_timeout",
        "idempotency_key_reused",
        "csv_field_count",
        "rate_limited",
        "headers_too_large",
        "store_unavailable",
        "outcome_unknown",
        "batch_not_found",
        "invalid_batch_id",
    ] {
        assert!(
            text.contains(&format!("`{code}`")),
            "problem code {code} is not described"
        );
    }
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());

    // Swagger UI from the binary itself: no CDN.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let docs = http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), 307);
    assert_eq!(docs.headers()["location"], "/docs/");
    let page = app.http.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("https://"),
        "the docs page loads something from the internet"
    );
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "swagger-initializer.js",
    ] {
        let response = app
            .http
            .get(app.url(&format!("/docs/{asset}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asset}");
    }
    let init = app
        .http
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert!(init.text().await.unwrap().contains("/openapi.json"));
}

#[tokio::test]
async fn a_served_path_with_another_method_is_405_with_allow() {
    let app = spawn_memory_app(MemoryStore::new());
    for (method, path, allow) in [
        (reqwest::Method::GET, "/api/v1/batch/process", "POST"),
        (
            reqwest::Method::DELETE,
            "/api/v1/batch/0123456789abcdef/status",
            "GET",
        ),
        (
            reqwest::Method::from_bytes(b"TRACE").unwrap(),
            "/metrics",
            "GET",
        ),
    ] {
        let response = app
            .http
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(json(response).await["code"], "method_not_allowed");
    }
    let response = app.http.get(app.url("/nowhere")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(json(response).await["code"], "route_not_found");
}
