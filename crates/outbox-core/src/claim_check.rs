//! Claim-check: an item too large for a Pub/Sub message is stored in an
//! object store, named by its SHA-256, and published by reference. This
//! module is the domain of it: where a stream's objects go
//! ([`ClaimCheck`], [`Location`]), which items go there
//! ([`ClaimCheck::stores`]), and the reference a message carries in place of
//! the payload ([`Reference`], its three attributes), which a consumer
//! checks before it hands the payload over ([`Reference::verify`]).
//!
//! An object's name is its digest, so a retry or a duplicate writes the
//! same object once, and two items with the same payload share it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::publish::limits;

/// The message attribute naming the object (its full URL).
pub const URL_ATTRIBUTE: &str = "claim_check_url";
/// The message attribute with the payload's SHA-256, in lowercase hex.
pub const SHA256_ATTRIBUTE: &str = "claim_check_sha256";
/// The message attribute with the payload's size in bytes.
pub const BYTES_ATTRIBUTE: &str = "claim_check_bytes";

/// The largest item a writer accepts when a claim-check store is
/// configured (`MAX_ITEM_BYTES`): 100 MiB.
pub const DEFAULT_MAX_ITEM_BYTES: u64 = 100 * 1024 * 1024;

/// A stream's claim-check setting, as stored in its definition
/// (`claim_check`) or configured for `default` (`CLAIM_CHECK_URL`,
/// `CLAIM_CHECK_ABOVE_BYTES`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimCheck {
    /// `gs://bucket/prefix`, `file:///path` or `memory://`.
    pub url: String,
    /// Payloads above this many bytes are stored by reference. Unset: only
    /// those whose message Pub/Sub would refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above_bytes: Option<u64>,
}

/// Where a stream's objects go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// Google Cloud Storage, with the credentials Pub/Sub uses.
    Gcs { bucket: String, prefix: String },
    /// A directory on local disk (development, tests).
    File { path: String },
    /// In the process's memory (tests).
    Memory,
}

/// What is wrong with a claim-check setting or reference.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimCheckError {
    #[error(
        "claim-check url {0:?} is not supported: use gs://bucket/prefix, file:///absolute/path or memory://"
    )]
    UnsupportedUrl(String),
    #[error("claim_check.above_bytes must be between 1 and {max}, not {found}")]
    ThresholdOutOfRange { found: u64, max: u64 },
    #[error("the claim-check reference is incomplete or malformed: {0}")]
    BadReference(String),
    #[error("the object is {found} bytes, not the {expected} its reference says")]
    SizeMismatch { expected: u64, found: u64 },
    #[error("the object's SHA-256 is {found}, not the {expected} its reference says")]
    DigestMismatch { expected: String, found: String },
    #[error("the object is {bytes} bytes, over the limit of {limit}")]
    TooLarge { bytes: u64, limit: u64 },
}

impl Location {
    /// Parses a claim-check URL.
    ///
    /// # Errors
    /// [`ClaimCheckError::UnsupportedUrl`] for any other scheme, a `gs://`
    /// URL without a bucket, or a `file://` URL that is not absolute.
    pub fn parse(url: &str) -> Result<Self, ClaimCheckError> {
        let unsupported = || ClaimCheckError::UnsupportedUrl(url.to_owned());
        if let Some(rest) = url.strip_prefix("gs://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = !bucket.is_empty()
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
            if !valid_bucket {
                return Err(unsupported());
            }
            return Ok(Self::Gcs {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
                return Err(unsupported());
            }
            let trimmed = path.trim_end_matches('/');
            return Ok(Self::File {
                path: if trimmed.is_empty() { "/" } else { trimmed }.to_owned(),
            });
        }
        if url == "memory://" || url == "memory:///" {
            return Ok(Self::Memory);
        }
        Err(unsupported())
    }

    /// The store's URL, as a setting names it.
    pub fn url(&self) -> String {
        match self {
            Self::Gcs { bucket, prefix } if prefix.is_empty() => format!("gs://{bucket}"),
            Self::Gcs { bucket, prefix } => format!("gs://{bucket}/{prefix}"),
            Self::File { path } => format!("file://{path}"),
            Self::Memory => "memory://".to_owned(),
        }
    }

    /// The object's key within the store: `[prefix/]sha256/<hex>`.
    pub fn key(&self, sha256: &str) -> String {
        match self {
            Self::Gcs { prefix, .. } if !prefix.is_empty() => format!("{prefix}/sha256/{sha256}"),
            _ => format!("sha256/{sha256}"),
        }
    }

    /// The store and digest an object's full URL names (the inverse of
    /// [`Location::object_url`]); `None` for a URL that names no object.
    pub fn of_object(url: &str) -> Option<(Self, String)> {
        let (store, sha256) = url.rsplit_once("/sha256/")?;
        let hex_digest = sha256.len() == 64
            && sha256
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        if !hex_digest {
            return None;
        }
        let location = Self::parse(store).ok()?;
        (location.object_url(sha256) == url).then(|| (location, sha256.to_owned()))
    }

    /// The object's full URL, as a message's [`URL_ATTRIBUTE`] names it.
    pub fn object_url(&self, sha256: &str) -> String {
        match self {
            Self::Gcs { bucket, .. } => format!("gs://{bucket}/{}", self.key(sha256)),
            Self::File { path } => {
                format!("file://{}/{}", path.trim_end_matches('/'), self.key(sha256))
            }
            Self::Memory => format!("memory:///{}", self.key(sha256)),
        }
    }
}

/// The threshold a setting may name at most: what a message may carry at
/// all. Above it every payload goes to the store anyway.
pub const MAX_ABOVE_BYTES: u64 = (limits::MAX_MESSAGE_BYTES - limits::REQUEST_RESERVE_BYTES) as u64;

impl ClaimCheck {
    /// Checks the setting and says where its objects go.
    ///
    /// # Errors
    /// An unsupported URL, or a threshold of 0 or above what a message may
    /// carry.
    pub fn validate(&self) -> Result<Location, ClaimCheckError> {
        if let Some(found) = self.above_bytes
            && !(1..=MAX_ABOVE_BYTES).contains(&found)
        {
            return Err(ClaimCheckError::ThresholdOutOfRange {
                found,
                max: MAX_ABOVE_BYTES,
            });
        }
        Location::parse(&self.url)
    }

    /// Whether an item whose payload is `payload_bytes` long goes to the
    /// store: above the threshold when one is set, and whenever its message
    /// would be over Pub/Sub's limits (`message_fits` false) whatever the
    /// threshold.
    pub fn stores(&self, payload_bytes: u64, message_fits: bool) -> bool {
        !message_fits || self.above_bytes.is_some_and(|above| payload_bytes > above)
    }
}

/// A payload's SHA-256, in lowercase hex: its object's name.
pub fn sha256_hex(payload: &[u8]) -> String {
    hex::encode(Sha256::digest(payload))
}

/// The bytes of a request object as stored and published: its JSON text
/// (the canonical form docs/CONSUMING.md describes).
pub fn payload_text(payload: &Map<String, Value>) -> Vec<u8> {
    let mut text = Vec::with_capacity(usize::try_from(payload_bytes(payload)).unwrap_or(0));
    // Serializing a map of JSON values cannot fail.
    let _ = serde_json::to_writer(&mut text, payload);
    text
}

/// How long [`payload_text`] is, without writing it.
pub fn payload_bytes(payload: &Map<String, Value>) -> u64 {
    let mut counting = Digesting::default();
    let _ = serde_json::to_writer(&mut counting, payload);
    counting.bytes
}

/// The SHA-256 and length of [`payload_text`], without writing it.
pub fn digest_of(payload: &Map<String, Value>) -> (String, u64) {
    let mut digesting = Digesting {
        sha256: Some(Sha256::new()),
        bytes: 0,
    };
    let _ = serde_json::to_writer(&mut digesting, payload);
    let sha256 = digesting
        .sha256
        .map(|h| hex::encode(h.finalize()))
        .unwrap_or_default();
    (sha256, digesting.bytes)
}

/// Counts, and digests when asked, what is written to it.
#[derive(Default)]
struct Digesting {
    sha256: Option<Sha256>,
    bytes: u64,
}

impl std::io::Write for Digesting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(sha256) = &mut self.sha256 {
            sha256.update(buf);
        }
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a message carries in place of a stored payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    /// The object's full URL.
    pub url: String,
    /// The payload's SHA-256, lowercase hex.
    pub sha256: String,
    /// The payload's size.
    pub bytes: u64,
}

impl Reference {
    /// The reference to `payload` stored at `location`.
    pub fn of(location: &Location, payload: &[u8]) -> Self {
        let sha256 = sha256_hex(payload);
        Self {
            url: location.object_url(&sha256),
            sha256,
            bytes: payload.len() as u64,
        }
    }

    /// The three attributes a message carries.
    pub fn attributes(&self) -> [(&'static str, String); 3] {
        [
            (URL_ATTRIBUTE, self.url.clone()),
            (SHA256_ATTRIBUTE, self.sha256.clone()),
            (BYTES_ATTRIBUTE, self.bytes.to_string()),
        ]
    }

    /// The reference in a message's attributes: `None` when it carries
    /// none of them (its payload is inline).
    ///
    /// # Errors
    /// Some but not all of them, a digest that is not 64 lowercase hex
    /// digits, or a size that is not a number.
    pub fn from_attributes<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Option<Result<Self, ClaimCheckError>> {
        let (url, sha256, bytes) = (
            get(URL_ATTRIBUTE),
            get(SHA256_ATTRIBUTE),
            get(BYTES_ATTRIBUTE),
        );
        if url.is_none() && sha256.is_none() && bytes.is_none() {
            return None;
        }
        let parsed = (|| {
            let (Some(url), Some(sha256), Some(bytes)) = (url, sha256, bytes) else {
                return Err(ClaimCheckError::BadReference(format!(
                    "a message needs all of {URL_ATTRIBUTE}, {SHA256_ATTRIBUTE} and {BYTES_ATTRIBUTE}"
                )));
            };
            let hex_digest = sha256.len() == 64
                && sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            if !hex_digest {
                return Err(ClaimCheckError::BadReference(format!(
                    "{SHA256_ATTRIBUTE} is not 64 lowercase hex digits"
                )));
            }
            let bytes = bytes.parse::<u64>().map_err(|_| {
                ClaimCheckError::BadReference(format!("{BYTES_ATTRIBUTE} is not a number"))
            })?;
            Ok(Self {
                url: url.to_owned(),
                sha256: sha256.to_owned(),
                bytes,
            })
        })();
        Some(parsed)
    }

    /// Whether a consumer whose limit is `limit` bytes may fetch it at all.
    ///
    /// # Errors
    /// [`ClaimCheckError::TooLarge`].
    pub fn check_size(&self, limit: u64) -> Result<(), ClaimCheckError> {
        if self.bytes > limit {
            return Err(ClaimCheckError::TooLarge {
                bytes: self.bytes,
                limit,
            });
        }
        Ok(())
    }

    /// Checks a fetched payload against the reference: its size, then its
    /// digest. Only a payload that passes is handed over.
    ///
    /// # Errors
    /// [`ClaimCheckError::SizeMismatch`] or [`ClaimCheckError::DigestMismatch`].
    pub fn verify(&self, payload: &[u8]) -> Result<(), ClaimCheckError> {
        let found = payload.len() as u64;
        if found != self.bytes {
            return Err(ClaimCheckError::SizeMismatch {
                expected: self.bytes,
                found,
            });
        }
        let digest = sha256_hex(payload);
        if digest != self.sha256 {
            return Err(ClaimCheckError::DigestMismatch {
                expected: self.sha256.clone(),
                found: digest,
            });
        }
        Ok(())
    }
}

/// An item whose payload is in a claim-check store: what its item document
/// keeps in place of the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPayload {
    pub reference: Reference,
    /// Its ordering key in a `field:` mode, taken from the payload when it
    /// was written (the relay does not fetch the object to key it). `None`
    /// in the other modes, where the key does not depend on the payload.
    pub field_key: Option<String>,
}

/// A deletion of a claim-check object, begun when its last reference went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub url: String,
    /// When it began (Unix milliseconds): it names this deletion.
    pub marked_ms: i64,
}

/// The references a set of retained items makes to claim-check objects, and
/// the protocol that keeps an object while anything may still refer to it.
///
/// Each object has a count of references (`pin`): a writer pins before it
/// puts the object, so a count above zero always precedes the object's
/// use; retention `release`s what it removed (and a writer what its failed
/// batch would have referred to), and only a count that reached zero lets
/// the object be deleted (`release` answers the [`Deletion`] it began).
/// While it is being deleted a pin waits, so a writer never finds an object
/// that is about to go; `forget` ends that deletion once the object is
/// gone. A count a crashed writer left behind keeps its object for good:
/// harmless, only storage.
#[async_trait::async_trait]
pub trait ObjectRefStore: Send + Sync + 'static {
    /// Counts `count` more references to the object at `url`, before it is
    /// put. Waits (until `deadline`) while the object is being deleted.
    ///
    /// # Errors
    /// `StoreError::Unavailable` when the store cannot be reached or the
    /// deletion does not end by `deadline`.
    async fn pin(
        &self,
        url: &str,
        count: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), crate::store::StoreError>;

    /// `count` references are gone (retention removed their items, or a
    /// writer's batch was not stored). When none is left, the object is now
    /// being deleted: the caller deletes it, then [`ObjectRefStore::forget`]s
    /// the deletion.
    async fn release(
        &self,
        url: &str,
        count: u64,
    ) -> Result<Option<Deletion>, crate::store::StoreError>;

    /// The objects whose deletion began before `marked_before_ms` (Unix
    /// milliseconds) and did not end (a relay died between the two):
    /// retention finishes them. Only deletions older than any pass takes:
    /// a pass that is still running would otherwise delete an object that
    /// another finished, forgot, and a writer put again.
    async fn being_deleted(
        &self,
        marked_before_ms: i64,
    ) -> Result<Vec<Deletion>, crate::store::StoreError>;

    /// The object of `deletion` is gone from its store: pins may create it
    /// again. Ends only that deletion (not a later one of the same object).
    async fn forget(&self, deletion: &Deletion) -> Result<(), crate::store::StoreError>;

    /// The object of `deletion` could not be deleted (its store failed): the
    /// deletion ends without it, and the object is kept with no reference
    /// (harmless, only storage), so pins need not wait for a store that may
    /// stay down.
    async fn abandon(&self, deletion: &Deletion) -> Result<(), crate::store::StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_url_names_its_store_and_digest_back() {
        let digest = sha256_hex(b"x");
        for store in [
            "gs://b",
            "gs://b/some/prefix",
            "file:///var/objects",
            "memory://",
        ] {
            let location = Location::parse(store).unwrap();
            let url = location.object_url(&digest);
            assert_eq!(
                Location::of_object(&url),
                Some((location, digest.clone())),
                "{url}"
            );
        }
        for bad in ["gs://b/sha256/short", "http://h/sha256/aa", "file:///x/y"] {
            assert_eq!(Location::of_object(bad), None, "{bad}");
        }
    }
    use std::collections::BTreeMap;

    #[test]
    fn the_three_kinds_of_url_parse_and_nothing_else_does() {
        assert_eq!(
            Location::parse("gs://invoices-eu/outbox/big/").unwrap(),
            Location::Gcs {
                bucket: "invoices-eu".to_owned(),
                prefix: "outbox/big".to_owned()
            }
        );
        assert_eq!(
            Location::parse("gs://b").unwrap(),
            Location::Gcs {
                bucket: "b".to_owned(),
                prefix: String::new()
            }
        );
        assert_eq!(
            Location::parse("file:///var/lib/outbox/").unwrap(),
            Location::File {
                path: "/var/lib/outbox".to_owned()
            }
        );
        assert_eq!(Location::parse("memory://").unwrap(), Location::Memory);
        for url in ["gs://b/p/q", "gs://b", "file:///tmp/cc", "memory://"] {
            assert_eq!(
                Location::parse(url).unwrap().url(),
                url,
                "{url} round-trips"
            );
        }
        for bad in [
            "s3://bucket",
            "gs://",
            "gs://Upper/x",
            "file://relative/path",
            "file:///a/../etc",
            "memory://name",
            "https://storage.googleapis.com/b",
            "",
        ] {
            assert!(
                matches!(
                    Location::parse(bad),
                    Err(ClaimCheckError::UnsupportedUrl(_))
                ),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn an_object_is_named_by_its_digest_under_the_prefix() {
        let sha = sha256_hex(b"payload");
        assert_eq!(sha.len(), 64);
        let gcs = Location::parse("gs://b/p/q").unwrap();
        assert_eq!(gcs.object_url(&sha), format!("gs://b/p/q/sha256/{sha}"));
        let file = Location::parse("file:///tmp/cc").unwrap();
        assert_eq!(
            file.object_url(&sha),
            format!("file:///tmp/cc/sha256/{sha}")
        );
        assert_eq!(file.key(&sha), format!("sha256/{sha}"));
        assert_eq!(
            Location::Memory.object_url(&sha),
            format!("memory:///sha256/{sha}")
        );
    }

    #[test]
    fn the_threshold_is_checked_and_a_message_that_does_not_fit_is_always_stored() {
        let unset = ClaimCheck {
            url: "memory://".to_owned(),
            above_bytes: None,
        };
        assert_eq!(unset.validate(), Ok(Location::Memory));
        assert!(!unset.stores(9_000_000, true));
        assert!(unset.stores(11_000_000, false));
        let set = ClaimCheck {
            above_bytes: Some(1024),
            ..unset.clone()
        };
        assert!(!set.stores(1024, true));
        assert!(set.stores(1025, true));
        for found in [0, MAX_ABOVE_BYTES + 1] {
            let bad = ClaimCheck {
                above_bytes: Some(found),
                ..unset.clone()
            };
            assert_eq!(
                bad.validate(),
                Err(ClaimCheckError::ThresholdOutOfRange {
                    found,
                    max: MAX_ABOVE_BYTES
                })
            );
        }
        let parsed: Result<ClaimCheck, _> =
            serde_json::from_str(r#"{"url": "memory://", "above_byts": 5}"#);
        assert!(parsed.is_err(), "a misspelt field is refused");
    }

    #[test]
    fn a_reference_round_trips_through_its_attributes() {
        let reference = Reference::of(&Location::parse("gs://b/p").unwrap(), b"a big document");
        let attributes: BTreeMap<&str, String> = reference.attributes().into_iter().collect();
        let back = Reference::from_attributes(|name| attributes.get(name).map(String::as_str));
        assert_eq!(back, Some(Ok(reference.clone())));
        assert_eq!(Reference::from_attributes(|_| None), None);
        let partial = Reference::from_attributes(|name| {
            (name == URL_ATTRIBUTE).then_some("gs://b/p/sha256/x")
        });
        assert!(matches!(
            partial,
            Some(Err(ClaimCheckError::BadReference(_)))
        ));
        let upper = reference.sha256.to_uppercase();
        let shouting = Reference::from_attributes(|name| match name {
            SHA256_ATTRIBUTE => Some(upper.as_str()),
            other => attributes.get(other).map(String::as_str),
        });
        assert!(matches!(
            shouting,
            Some(Err(ClaimCheckError::BadReference(_)))
        ));
    }

    #[test]
    fn only_the_exact_payload_verifies() {
        let reference = Reference::of(&Location::Memory, b"a big document");
        assert_eq!(reference.bytes, 14);
        assert_eq!(reference.verify(b"a big document"), Ok(()));
        assert!(matches!(
            reference.verify(b"a big documenT"),
            Err(ClaimCheckError::DigestMismatch { .. })
        ));
        assert_eq!(
            reference.verify(b"a big document!"),
            Err(ClaimCheckError::SizeMismatch {
                expected: 14,
                found: 15
            })
        );
        assert_eq!(reference.check_size(14), Ok(()));
        assert_eq!(
            reference.check_size(13),
            Err(ClaimCheckError::TooLarge {
                bytes: 14,
                limit: 13
            })
        );
    }
}
