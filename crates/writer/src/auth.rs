//! Optional API keys for the writer's `/api/v1/` routes, and a per-key rate
//! limit in items per second.
//!
//! Keys come from `WRITER_API_KEYS` (comma-separated) and/or the file named
//! by `WRITER_API_KEYS_FILE` (one per line, `#` comments; a Kubernetes secret
//! mounted as a file). Each entry is `NAME:KEY`; the name is recorded on the
//! batches the key submits (`submitted_by`) and is a metric label, so the
//! label set is bounded by the number of keys. Keys are compared in constant
//! time (over their SHA-256 digests, so the length leaks nothing either) and
//! never logged. With no keys configured the API is open, as before.

use std::num::NonZeroU32;

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::error::InternalError;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{FromRequest, HttpRequest, ResponseError, web};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use outbox_service::problem::Problem;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Whom a request is from: the index of its key's name (0 for everyone when
/// the API is open; [`Access::name`] then says [`ANONYMOUS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub usize);

/// The `submitted_by` label when no keys are configured.
pub const ANONYMOUS: &str = "anonymous";

struct ApiKey {
    /// Index into `Access::names`.
    name: usize,
    digest: [u8; 32],
}

/// The configured keys and their rate limiters. One name may have several
/// keys (the old and the new one while a key is rotated): they share the
/// name's label and its rate limit.
pub struct Access {
    keys: Vec<ApiKey>,
    names: Vec<String>,
    /// One limiter per name (or one for everyone when the API is open).
    limiters: Vec<DefaultDirectRateLimiter>,
}

impl Access {
    /// Reads keys from `inline` (comma-separated) and `file` (one per line).
    /// `items_per_second` of 0 means no rate limit; `burst` is the most
    /// items one request may take at once (at least one full batch).
    ///
    /// # Errors
    /// A one-line description of the first bad entry (never the key itself).
    pub fn new(
        inline: Option<&str>,
        file: Option<&str>,
        items_per_second: u32,
        burst: u32,
    ) -> Result<Self, String> {
        let mut entries: Vec<(String, String)> = Vec::new();
        if let Some(inline) = inline {
            for (n, entry) in inline.split(',').enumerate() {
                if !entry.trim().is_empty() {
                    entries.push((
                        format!("WRITER_API_KEYS entry {}", n + 1),
                        entry.trim().to_owned(),
                    ));
                }
            }
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("WRITER_API_KEYS_FILE {path}: {e}"))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if !line.is_empty() && !line.starts_with('#') {
                    entries.push((format!("{path} line {}", n + 1), line.to_owned()));
                }
            }
        }
        let mut keys: Vec<ApiKey> = Vec::with_capacity(entries.len());
        let mut names: Vec<String> = Vec::new();
        for (place, entry) in entries {
            let (name, key) = entry
                .split_once(':')
                .ok_or_else(|| format!("{place}: expected NAME:KEY"))?;
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid_name {
                return Err(format!(
                    "{place}: a key name is 1 to 64 letters, digits, '-', '_' or '.'"
                ));
            }
            if key.len() < 16 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "{place}: the key of {name:?} must be at least 16 visible ASCII characters"
                ));
            }
            let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            if keys.iter().any(|k| k.digest == digest) {
                return Err(format!("{place}: the key of {name:?} is listed twice"));
            }
            let index = names.iter().position(|n| n == name).unwrap_or_else(|| {
                names.push(name.to_owned());
                names.len() - 1
            });
            keys.push(ApiKey {
                name: index,
                digest,
            });
        }
        let limiters = match NonZeroU32::new(items_per_second) {
            None => Vec::new(),
            Some(rate) => {
                let burst = NonZeroU32::new(burst.max(rate.get())).unwrap_or(rate);
                let quota = Quota::per_second(rate).allow_burst(burst);
                (0..names.len().max(1))
                    .map(|_| RateLimiter::direct(quota))
                    .collect()
            }
        };
        Ok(Self {
            keys,
            names,
            limiters,
        })
    }

    /// Whether requests must present a key.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The name batches of `caller` are recorded under.
    pub fn name(&self, caller: &Caller) -> &str {
        self.names.get(caller.0).map_or(ANONYMOUS, String::as_str)
    }

    /// The key a bearer token belongs to, compared in constant time against
    /// every key.
    fn authenticate(&self, authorization: Option<&HeaderValue>) -> Result<Caller, Problem> {
        let token = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| {
                unauthorized("this API needs an API key: send Authorization: Bearer <key>")
            })?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&presented)) {
                found = Some(key.name);
            }
        }
        found
            .map(Caller)
            .ok_or_else(|| unauthorized("the API key is not valid"))
    }

    /// Takes `items` from the caller's rate limit, or says when to retry.
    ///
    /// # Errors
    /// 429 `rate_limited` with `Retry-After` when the key's budget is spent.
    pub fn admit(&self, caller: &Caller, items: usize) -> Result<(), Problem> {
        let Some(limiter) = self.limiters.get(caller.0) else {
            return Ok(());
        };
        let n =
            NonZeroU32::new(u32::try_from(items).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let seconds = u32::try_from(wait.as_secs())
                    .unwrap_or(u32::MAX)
                    .saturating_add(1);
                Err(Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("this key's item rate limit is spent; retry in {seconds} s"),
                )
                .with_retry_after(seconds))
            }
            // More items than the burst: never admissible at once.
            Err(_) => Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("{items} items is more than this key may send at once"),
            )),
        }
    }
}

fn unauthorized(detail: &str) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
}

/// The caller of an `/api/` route, authenticated by the route itself: every
/// handler that serves the API takes a `Caller` as its first argument, so the
/// key is checked wherever the router sends a request, however its path was
/// spelled (`/%61pi/...` reaches the same handler as `/api/...`). A path
/// prefix checked before routing could be bypassed; this cannot. Health,
/// metrics and docs take no `Caller` and stay open.
impl FromRequest for Caller {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(caller_of(req))
    }
}

fn caller_of(req: &HttpRequest) -> Result<Caller, actix_web::Error> {
    // No keys configured: everyone is one caller with one limiter. Without
    // the `Access` data at all, fail closed.
    let Some(access) = req.app_data::<web::Data<Access>>() else {
        return Err(InternalError::from_response(
            "no access data",
            Problem::internal().error_response(),
        )
        .into());
    };
    if !access.required() {
        return Ok(Caller(0));
    }
    access
        .authenticate(req.headers().get(header::AUTHORIZATION))
        .map_err(|problem| {
            metrics::counter!(crate::metrics::ERRORS, "code" => problem.code).increment(1);
            let mut response = problem.error_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"batch-outbox\""),
            );
            InternalError::from_response(problem.detail.clone(), response).into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "aaaaaaaaaaaaaaaa-1";
    const KEY_B: &str = "bbbbbbbbbbbbbbbb-2";

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn keys_from_the_variable_and_the_file_authenticate_by_name() {
        let dir = std::env::temp_dir().join(format!("keys-{}", std::process::id()));
        std::fs::write(&dir, format!("# rotated 2026-11\n\nbilling:{KEY_B}\n")).unwrap();
        let access = Access::new(Some(&format!("ops:{KEY_A}")), dir.to_str(), 0, 0).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(access.required());
        let a = access.authenticate(Some(&bearer(KEY_A))).unwrap();
        let b = access.authenticate(Some(&bearer(KEY_B))).unwrap();
        assert_eq!((access.name(&a), access.name(&b)), ("ops", "billing"));
        for bad in [
            None,
            Some(bearer("nope")),
            Some(HeaderValue::from_static("Basic b3BzOng=")),
        ] {
            let problem = access.authenticate(bad.as_ref()).unwrap_err();
            assert_eq!(
                (problem.status, problem.code),
                (StatusCode::UNAUTHORIZED, "unauthorized")
            );
        }
    }

    #[test]
    fn bad_key_entries_are_refused_without_echoing_the_key() {
        for (entry, expected) in [
            ("no-colon-here-long-enough", "expected NAME:KEY"),
            ("ops:short", "at least 16"),
            ("bad name:aaaaaaaaaaaaaaaa", "key name"),
            (&format!("ops:{KEY_A},dev:{KEY_A}") as &str, "listed twice"),
        ] {
            let error = Access::new(Some(entry), None, 0, 0).err().unwrap();
            assert!(error.contains(expected), "{entry}: {error}");
            assert!(
                !error.contains(KEY_A) && !error.contains("aaaaaaaaaaaaaaaa"),
                "{error}"
            );
        }
        assert!(!Access::new(Some(" , "), None, 0, 0).unwrap().required());
    }

    #[test]
    fn a_name_may_have_two_keys_while_one_is_rotated() {
        let access = Access::new(Some(&format!("ops:{KEY_A},ops:{KEY_B}")), None, 10, 10).unwrap();
        let old = access.authenticate(Some(&bearer(KEY_A))).unwrap();
        let new = access.authenticate(Some(&bearer(KEY_B))).unwrap();
        assert_eq!(old, new);
        assert_eq!(access.name(&new), "ops");
        // One name, one budget.
        access.admit(&old, 10).unwrap();
        assert_eq!(access.admit(&new, 1).unwrap_err().code, "rate_limited");
    }

    #[test]
    fn each_name_has_its_own_item_budget() {
        let access = Access::new(Some(&format!("a:{KEY_A},b:{KEY_B}")), None, 10, 20).unwrap();
        let (a, b) = (Caller(0), Caller(1));
        access.admit(&a, 20).unwrap();
        let problem = access.admit(&a, 5).unwrap_err();
        assert_eq!(problem.code, "rate_limited");
        assert!(problem.retry_after.is_some_and(|s| s >= 1));
        access.admit(&b, 15).unwrap();
        assert_eq!(access.admit(&b, 21).unwrap_err().code, "rate_limited");
        // Without a limit everything is admitted.
        let open = Access::new(None, None, 0, 0).unwrap();
        open.admit(&Caller(0), 1_000_000).unwrap();
    }
}
