//! The writer's OpenAPI 3.1 description. The paths are collected from the
//! routes the app registers (`routes::configure`), so the document lists
//! exactly what is served; this module adds what is not a route: the
//! title, the tags and the API-key scheme. Served at `/openapi.json`, with
//! Swagger UI (bundled in the binary, no CDN) at `/docs/`.

use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "batch-outbox writer",
        description = "Takes batches of JSON requests and stores each one atomically in MongoDB \
            with a gap-free `batch_sequence`; the relay publishes every item to Pub/Sub in that \
            order. Errors are `application/problem+json` with a stable `code`; each operation \
            lists the codes it answers. When the writer is started with API keys \
            (`WRITER_API_KEYS`), every `/api/v1/` request needs `Authorization: Bearer <key>`.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "batches", description = "Submit batches and follow them"),
        (name = "operations", description = "Health and metrics (never need a key)")
    ),
    modifiers(&ApiKeyScheme)
)]
pub struct WriterApi;

struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        outbox_service::openapi::add_bearer_scheme(
            openapi,
            "api_key",
            "An API key from WRITER_API_KEYS, when the writer has any.",
        );
    }
}
