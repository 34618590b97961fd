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
    /// The same failure, naming the file it concerns.
    #[must_use]
    pub fn about(self, file: &str) -> Self {
        match self {
            Failure::Refused(m) => Failure::Refused(format!("{file}: {m}")),
            Failure::Usage(m) => Failure::Usage(format!("{file}: {m}")),
            Failure::Unavailable(m) => Failure::Unavailable(format!("{file}: {m}")),
        }
    }

    /// One failure for several files' (each said already): of the kind
    /// with the highest exit code, naming how many files failed.
    pub fn worst(failed: Vec<(String, Failure)>) -> Option<Self> {
        let count = failed.len();
        let kind = failed
            .into_iter()
            .map(|(_, f)| f)
            .max_by_key(Failure::rank)?;
        let message = if count == 1 {
            "1 file was not stored (above)".to_owned()
        } else {
            format!("{count} files were not stored (above)")
        };
        Some(match kind {
            Failure::Refused(_) => Failure::Refused(message),
            Failure::Usage(_) => Failure::Usage(message),
            Failure::Unavailable(_) => Failure::Unavailable(message),
        })
    }

    fn rank(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unavailable(_) => 3,
        }
    }

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
    /// The admin URLs to try, in order (`--admin-url a,b`).
    admin_urls: Vec<String>,
    /// The first of them that answered, once one was needed.
    admin: tokio::sync::OnceCell<String>,
}

/// Whether `url` names this machine (a secret sent there in clear text
/// does not cross a network).
fn loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The warning for a secret that would cross a network in clear text.
fn clear_text_warning(url: &reqwest::Url, secret: bool, what: &str) -> Option<String> {
    (secret && url.scheme() == "http" && !loopback(url)).then(|| {
        format!("warning: the {what} goes to {url} over plain http: anyone on the way can read it; use https://")
    })
}

impl Client {
    pub fn new(connection: Connection) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(connection.timeout)
            .user_agent(concat!("outboxctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Usage(format!("cannot build the HTTP client: {e}")))?;
        let admin_urls: Vec<String> = connection
            .admin_url
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if admin_urls.is_empty() {
            return Err(Failure::Usage("--admin-url names no URL".to_owned()));
        }
        let writer = std::iter::once((
            &connection.writer_url,
            connection.api_key.is_some(),
            "API key",
        ));
        let admins = admin_urls
            .iter()
            .map(|u| (u, connection.admin_token.is_some(), "admin token"));
        for (url, secret, what) in writer.chain(admins) {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| Failure::Usage(format!("{url:?} is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(Failure::Usage(format!(
                    "{url:?} is not an http:// or https:// URL"
                )));
            }
            if let Some(warning) = clear_text_warning(&parsed, secret, what) {
                eprintln!("{warning}");
            }
        }
        Ok(Self {
            http,
            connection,
            admin_urls,
            admin: tokio::sync::OnceCell::new(),
        })
    }

    /// A request to `path` on `service`, with its credentials. An admin
    /// request goes to the first admin URL that answers (see [`send`]).
    pub fn request(&self, service: Service, method: Method, path: &str) -> RequestBuilder {
        let (base, secret) = match service {
            Service::Writer => (
                self.connection.writer_url.trim_end_matches('/'),
                &self.connection.api_key,
            ),
            Service::Admin => (
                self.admin
                    .get()
                    .map_or(self.admin_urls[0].as_str(), String::as_str),
                &self.connection.admin_token,
            ),
        };
        let request = self.http.request(method, format!("{base}{path}"));
        match secret {
            Some(secret) => request.bearer_auth(secret),
            None => request,
        }
    }

    /// The admin URL to use: the only one given, or the first of several
    /// whose `/health/live` answers (said on stderr when it is not the
    /// first).
    async fn admin_url(&self) -> Result<&str, Failure> {
        if self.admin_urls.len() == 1 {
            return Ok(&self.admin_urls[0]);
        }
        self.admin
            .get_or_try_init(|| async {
                let mut tried = Vec::new();
                for url in &self.admin_urls {
                    let probe = self
                        .http
                        .get(format!("{url}/health/live"))
                        .timeout(std::time::Duration::from_secs(3))
                        .send()
                        .await;
                    match probe {
                        Ok(response) if response.status().is_success() => {
                            if !tried.is_empty() {
                                eprintln!("using the relay at {url} ({})", tried.join("; "));
                            }
                            return Ok(url.clone());
                        }
                        Ok(response) => tried.push(format!("{url} answered {}", response.status())),
                        Err(e) => tried.push(format!("{url}: {}", root_cause(&e))),
                    }
                }
                Err(Failure::Unavailable(format!(
                    "cannot reach any relay's admin port: {} (OUTBOX_ADMIN_URL or --admin-url takes a comma-separated list, tried in order)",
                    tried.join("; ")
                )))
            })
            .await
            .map(String::as_str)
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
        let mut request = request
            .build()
            .map_err(|e| Failure::Usage(format!("cannot build the request: {e}")))?;
        if let Service::Admin = service {
            // Built against the first URL; sent to the one that answers.
            let chosen = self.admin_url().await?;
            let first = &self.admin_urls[0];
            if chosen != first.as_str() && request.url().as_str().starts_with(&format!("{first}/"))
            {
                let url = request.url().as_str().replacen(first.as_str(), chosen, 1);
                *request.url_mut() = reqwest::Url::parse(&url)
                    .map_err(|e| Failure::Usage(format!("{url:?} is not a URL: {e}")))?;
            }
        }
        self.http
            .execute(request)
            .await
            .map_err(|e| self.unreachable(service, &e))
    }

    fn unreachable(&self, service: Service, error: &reqwest::Error) -> Failure {
        let (name, base) = match service {
            Service::Writer => ("the writer", self.connection.writer_url.clone()),
            Service::Admin => (
                "the relay's admin port",
                self.admin
                    .get()
                    .cloned()
                    .unwrap_or_else(|| self.admin_urls.join(", ")),
            ),
        };
        let what = if error.is_timeout() {
            "no answer in time".to_owned()
        } else {
            root_cause(error)
        };
        let hint = match service {
            Service::Admin if self.admin_urls.len() == 1 => {
                " (another replica? OUTBOX_ADMIN_URL or --admin-url takes a comma-separated list, tried in order)"
            }
            _ => "",
        };
        Failure::Unavailable(format!("cannot reach {name} at {base}: {what}{hint}"))
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
    fn a_secret_over_plain_http_off_this_machine_is_warned_about() {
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(
            clear_text_warning(&url("http://relay.example:9090"), true, "admin token").is_some()
        );
        assert!(clear_text_warning(&url("http://10.1.2.3:9090"), true, "API key").is_some());
        for quiet in [
            "http://127.0.0.1:9090",
            "http://localhost:8000",
            "http://[::1]:9090",
            "https://relay.example",
        ] {
            assert_eq!(
                clear_text_warning(&url(quiet), true, "admin token"),
                None,
                "{quiet}"
            );
        }
        assert_eq!(
            clear_text_warning(&url("http://relay.example"), false, "admin token"),
            None
        );
    }

    /// `https://` works: the TLS backend is built in (the connection is
    /// refused by a closed port, not by a missing scheme).
    #[tokio::test]
    async fn https_urls_are_spoken() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = reqwest::Client::new()
            .get(format!("https://127.0.0.1:{port}/health/live"))
            .send()
            .await
            .unwrap_err();
        assert!(error.is_connect(), "{error:?}");
        assert!(!root_cause(&error).contains("scheme"), "{error:?}");
    }

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
