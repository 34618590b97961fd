//! The operator's page at `/` on the admin port: three static files compiled
//! into the binary (no CDN, works offline) that poll the admin API.
//!
//! The page builds every element with `textContent`, so the strict content
//! security policy below holds: nothing but this origin's files runs.

use actix_web::http::header;
use actix_web::{HttpResponse, get};

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'none'; \
    frame-ancestors 'none'; base-uri 'none'";

fn asset(content_type: &str, body: impl actix_web::body::MessageBody + 'static) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CONTENT_SECURITY_POLICY, POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// Dashboard
///
/// The operator's page: role, lease, pause state, the batch in flight, the
/// backlog, drain rate and lag, failed batches with a retry button, recent
/// errors. Polls the JSON endpoints below once a second.
#[utoipa::path(tag = "dashboard", responses(
    (status = 200, description = "The page.", body = String, content_type = "text/html"),
))]
#[get("/")]
pub async fn page(state: actix_web::web::Data<crate::admin::AdminState>) -> HttpResponse {
    // The page asks for the token before it reads anything when the relay
    // has one (the page itself holds no data).
    let token = if state.admin_token.is_some() {
        "required"
    } else {
        "open"
    };
    asset(
        "text/html; charset=utf-8",
        PAGE.replace("<body>", &format!("<body data-admin-token=\"{token}\">")),
    )
}

/// Dashboard script
#[utoipa::path(tag = "dashboard", responses(
    (status = 200, description = "The page's script.", body = String, content_type = "text/javascript"),
))]
#[get("/dashboard.js")]
pub async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// Dashboard style sheet
#[utoipa::path(tag = "dashboard", responses(
    (status = 200, description = "The page's style sheet.", body = String, content_type = "text/css"),
))]
#[get("/dashboard.css")]
pub async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE)
}
