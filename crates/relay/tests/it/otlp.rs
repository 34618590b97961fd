//! OTLP span export with the real binaries: a fake collector on loopback
//! receives the writer's and the relay's spans when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` names it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;

use crate::e2e::{env, eventually, start_stack_on};

type Bodies = Arc<Mutex<Vec<Vec<u8>>>>;

/// Accepts OTLP/HTTP trace exports and keeps their (protobuf) bodies.
fn collector() -> (String, Bodies) {
    let bodies: Bodies = Arc::default();
    let kept = Arc::clone(&bodies);
    let server = HttpServer::new(move || {
        let kept = Arc::clone(&kept);
        App::new().route(
            "/v1/traces",
            web::post().to(move |body: web::Bytes| {
                kept.lock().unwrap().push(body.to_vec());
                async {
                    HttpResponse::Ok()
                        .content_type("application/x-protobuf")
                        .finish()
                }
            }),
        )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let url = format!("http://{}", server.addrs()[0]);
    tokio::spawn(server.run());
    (url, bodies)
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn received(bodies: &Bodies, needle: &[u8]) -> bool {
    bodies
        .lock()
        .unwrap()
        .iter()
        .any(|b| b.windows(needle.len()).any(|w| w == needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_otlp_endpoint_spans_are_exported_in_the_callers_trace() {
    let (endpoint, bodies) = collector();
    let otel = [
        ("REQUEST_DEADLINE_SECONDS", "30".to_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let standin = std::env::var("MONGODB_FLAVOR").as_deref() == Ok("standin");
    let stack = start_stack_on(&env("MONGODB_URL"), standin, &otel).await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .json(&json!([{"request_id": "r1"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let answered = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(&answered[3..35], caller_trace);
    let writer_span = hex_bytes(&answered[36..52]);

    // The writer's span, in the caller's trace, with the id the messages carry.
    eventually(
        Duration::from_secs(30),
        "the writer's span to be exported",
        || {
            let found =
                received(&bodies, &hex_bytes(caller_trace)) && received(&bodies, &writer_span);
            async move { found }
        },
    )
    .await;
    assert!(
        received(&bodies, b"outbox-writer"),
        "the service name is exported"
    );

    // The relay exports its own spans too.
    let endpoint_var = endpoint.clone();
    let (relay, _admin) = stack.relay(
        "relay-otlp",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint_var.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
        ],
    );
    eventually(
        Duration::from_secs(60),
        "the relay's spans to be exported",
        || {
            let found = received(&bodies, b"outbox-relay");
            async move { found }
        },
    )
    .await;
    drop(relay);
}
