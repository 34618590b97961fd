//! The writer's and the relay's HTTP APIs, and what a failed call means for
//! the exit code.

use std::process::ExitCode;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use crate::cli::Connection;

/// Why a command failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The server answered and said no (4xx), or the batch failed.
    #[error("{0}")]
    Refused(String),
    /// Wrong usage, or a local file that cannot be read.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached, timed out, or answered 5xx.
    #[error("{0}")]
    Unavailable(String),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::Refused(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unavailable(_) => 3,
        })
    }
}

/// Which service a call goes to.
#[derive(Copy, Clone, Debug)]
pub enum Service {
    Writer,
    Admin,
}

pub struct Client {
    http: reqwest::Client,
    connection: Connection,
}

impl Client {
    pub fn new(connection: Connection) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(connection.timeout)
            .user_agent(concat!("outboxctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Usage(format!("cannot build the HTTP client: {e}")))?;
        for url in [&connection.writer_url, &connection.admin_url] {
            reqwest::Url::parse(url)
                .map_err(|e| Failure::Usage(format!("{url:?} is not a URL: {e}")))?;
        }
        Ok(Self { http, connection })
    }

    /// A request to `path` on `service`, with its credentials.
    pub fn request(&self, service: Service, method: Method, path: &str) -> RequestBuilder {
        let (base, secret) = match service {
            Service::Writer => (&self.connection.writer_url, &self.connection.api_key),
            Service::Admin => (&self.connection.admin_url, &self.connection.admin_token),
        };
        let request = self
            .http
            .request(method, format!("{}{path}", base.trim_end_matches('/')));
        match secret {
            Some(secret) => request.bearer_auth(secret),
            None => request,
        }
    }

    /// Sends a request and reads its JSON answer; a problem answer becomes a
    /// [`Failure`] that names its `code`.
    pub async fn call(&self, service: Service, request: RequestBuilder) -> Result<Value, Failure> {
        let response = self.send(service, request).await?;
        json_of(response).await
    }

    pub async fn send(
        &self,
        service: Service,
        request: RequestBuilder,
    ) -> Result<Response, Failure> {
        request
            .send()
            .await
            .map_err(|e| self.unreachable(service, &e))
    }

    fn unreachable(&self, service: Service, error: &reqwest::Error) -> Failure {
        let (name, base) = match service {
            Service::Writer => ("the writer", &self.connection.writer_url),
            Service::Admin => ("the relay's admin port", &self.connection.admin_url),
        };
        let what = if error.is_timeout() {
            "no answer in time".to_owned()
        } else {
            root_cause(error)
        };
        Failure::Unavailable(format!("cannot reach {name} at {base}: {what}"))
    }
}

/// The innermost cause, which is what a person can act on ("Connection
/// refused"), not reqwest's outer "error sending request".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// The JSON body of a 2xx answer, or the failure a problem answer means.
pub async fn json_of(response: Response) -> Result<Value, Failure> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| Failure::Unavailable(format!("the answer was cut off: {}", root_cause(&e))))?;
    let value: Option<Value> = serde_json::from_slice(&body).ok();
    if status.is_success() {
        return value.ok_or_else(|| {
            Failure::Unavailable(format!("the server answered {status} with no JSON body"))
        });
    }
    let message = problem_line(status, value.as_ref(), &body);
    Err(
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Failure::Unavailable(message)
        } else {
            Failure::Refused(message)
        },
    )
}

/// One line from an RFC 9457 problem: `detail (code, HTTP status)`, with
/// any extra members that locate the fault (`line 3`, `index 7`).
pub fn problem_line(status: StatusCode, problem: Option<&Value>, body: &[u8]) -> String {
    let Some(problem) = problem.and_then(Value::as_object) else {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        return if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            )
        };
    };
    let detail = problem
        .get("detail")
        .or_else(|| problem.get("title"))
        .and_then(Value::as_str)
        .unwrap_or("no detail");
    let mut context: Vec<String> = problem
        .iter()
        .filter(|(key, _)| {
            !["type", "title", "status", "detail", "code", "instance"].contains(&key.as_str())
        })
        .map(|(key, value)| match value {
            Value::String(s) => format!("{key} {s}"),
            other => format!("{key} {other}"),
        })
        // Said already (`line 3: ...`): not twice.
        .filter(|member| !detail.contains(member.as_str()))
        .collect();
    context.sort();
    let code = problem
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("no code");
    let mut line = format!("{detail} ({code}, HTTP {})", status.as_u16());
    if !context.is_empty() {
        line.push_str(&format!("; {}", context.join(", ")));
    }
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_problem_is_one_line_with_its_code_and_where() {
        let problem = json!({"type": "about:blank", "title": "Unprocessable", "status": 422,
            "detail": "row 3 has 2 fields, the header 3", "code": "csv_field_count", "line": 3});
        assert_eq!(
            problem_line(StatusCode::UNPROCESSABLE_ENTITY, Some(&problem), b""),
            "row 3 has 2 fields, the header 3 (csv_field_count, HTTP 422); line 3"
        );
        let said = json!({"detail": "line 3: 1 fields, but the header has 2",
            "code": "csv_field_count", "line": 3, "index": 2});
        assert_eq!(
            problem_line(StatusCode::UNPROCESSABLE_ENTITY, Some(&said), b""),
            "line 3: 1 fields, but the header has 2 (csv_field_count, HTTP 422); index 2"
        );
    }

    #[test]
    fn a_body_that_is_no_problem_is_quoted_short() {
        let body = "x".repeat(500);
        let line = problem_line(StatusCode::BAD_GATEWAY, None, body.as_bytes());
        assert_eq!(line.len(), "HTTP 502 Bad Gateway: ".len() + 200);
        assert_eq!(
            problem_line(StatusCode::BAD_GATEWAY, None, b" "),
            "HTTP 502 Bad Gateway"
        );
    }
}
