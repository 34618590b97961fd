//! What both services' OpenAPI documents share: the bearer scheme, and
//! soundness checks on a served document (for their tests).

use serde_json::Value;

/// What is wrong with an OpenAPI 3.1 document, beyond what its schema
/// says: a `$ref` that resolves to nothing, an operation without
/// responses, summary or operation id, a problem answer not typed as
/// `application/problem+json`. Empty when it is sound.
pub fn document_problems(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if doc["openapi"] != "3.1.0" {
        problems.push(format!("openapi is {}, not 3.1.0", doc["openapi"]));
    }
    let mut refs = Vec::new();
    collect_refs(doc, &mut refs);
    for reference in refs {
        let resolved = reference
            .strip_prefix('#')
            .and_then(|pointer| doc.pointer(pointer));
        if resolved.is_none() {
            problems.push(format!("$ref {reference} resolves to nothing"));
        }
    }
    let Some(paths) = doc["paths"].as_object() else {
        problems.push("no paths".to_owned());
        return problems;
    };
    for (path, item) in paths {
        for (method, operation) in item.as_object().into_iter().flatten() {
            let place = format!("{} {path}", method.to_uppercase());
            if operation["operationId"].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{place}: no operationId"));
            }
            if operation["summary"].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{place}: no summary"));
            }
            let Some(responses) = operation["responses"].as_object().filter(|r| !r.is_empty())
            else {
                problems.push(format!("{place}: no responses"));
                continue;
            };
            for (status, response) in responses {
                if response["description"].as_str().is_none_or(str::is_empty) {
                    problems.push(format!("{place} {status}: no description"));
                }
                let error = status.starts_with('4') || status.starts_with('5');
                let problem_json = response["content"]
                    .as_object()
                    .is_some_and(|c| c.contains_key("application/problem+json"));
                if error && !problem_json && path.starts_with("/api/") {
                    problems.push(format!("{place} {status}: not application/problem+json"));
                }
            }
        }
    }
    problems
}

/// The (METHOD, path) pairs a document describes, sorted.
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut operations: Vec<(String, String)> = doc["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .map(move |(method, _)| (method.to_uppercase(), path.clone()))
        })
        .collect();
    operations.sort();
    operations
}

fn collect_refs(value: &Value, refs: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(reference)) => refs.push(reference.clone()),
                    _ => collect_refs(value, refs),
                }
            }
        }
        Value::Array(values) => values.iter().for_each(|v| collect_refs(v, refs)),
        _ => {}
    }
}

/// Serves `api` at `/openapi.json`, with Swagger UI (compiled into the
/// binary: no CDN) at `/docs/`, and keeps the methods each path answers for
/// the 405s of [`crate::problem::no_route`]. For `App::configure`, after the
/// routes `api` was collected from.
pub fn serve(api: utoipa::openapi::OpenApi) -> impl FnOnce(&mut actix_web::web::ServiceConfig) {
    use actix_web::web;
    move |cfg| {
        cfg.app_data(web::Data::new(crate::problem::AllowedMethods::from(&api)))
            .service(utoipa_swagger_ui::SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", api))
            .service(web::redirect("/docs", "/docs/"));
    }
}

/// Adds an HTTP bearer-token security scheme called `name` to a document
/// (for a `utoipa::Modify`).
pub fn add_bearer_scheme(openapi: &mut utoipa::openapi::OpenApi, name: &str, description: &str) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
    openapi
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            name,
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            ),
        );
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_dangling_ref_and_an_untyped_error_are_reported() {
        let doc = json!({
            "openapi": "3.1.0",
            "paths": {"/api/x": {"get": {
                "operationId": "x", "summary": "X",
                "responses": {
                    "200": {"description": "ok", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Missing"}}}},
                    "404": {"description": "no", "content": {"application/json": {}}}
                }
            }}}
        });
        let problems = document_problems(&doc);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(operations(&doc), [("GET".to_owned(), "/api/x".to_owned())]);
    }
}
