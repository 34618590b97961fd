//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>),
//! the one parser both binaries use.
//!
//! A request may carry a `traceparent`; the writer continues that trace with
//! a span of its own (same trace id, a new parent id) or, without a valid
//! one, starts a new trace. The result is stored with the batch, logged, and
//! put on every message of the batch by the relay (whose `publish_batch`
//! span is its child when spans are exported), so a consumer can continue
//! the trace.

use rand::RngCore;

pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent` (version 00).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: u8,
}

impl TraceParent {
    /// Parses a header value. Per the specification an invalid value is
    /// ignored (a new trace starts), never an error for the client.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        // Later versions may add fields after these four; version ff is invalid.
        let valid = hex(version, 2)
            && version != "ff"
            && (version != "00" || parts.next().is_none())
            && hex(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && hex(parent_id, 16)
            && parent_id.bytes().any(|b| b != b'0')
            && hex(flags, 2);
        valid.then(|| Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).unwrap_or(0),
        })
    }

    /// The writer's own span in the caller's trace, or a new sampled trace.
    pub fn continue_or_start(incoming: Option<&str>) -> Self {
        Self::continuing(incoming.and_then(Self::parse))
    }

    /// A new span id in `caller`'s trace, or a new sampled trace.
    fn continuing(caller: Option<Self>) -> Self {
        let mut rng = rand::rng();
        let parent_id = nonzero_hex::<8>(&mut rng);
        match caller {
            Some(caller) => Self {
                parent_id,
                ..caller
            },
            None => Self {
                trace_id: nonzero_hex::<16>(&mut rng),
                parent_id,
                flags: 1,
            },
        }
    }

    /// The trace context for `span`, the writer's span for one request.
    ///
    /// When spans are exported (OTLP), `span` is made a child of the
    /// caller's span and the answer names `span` itself, so a consumer that
    /// continues from a message's `traceparent` attaches to a span the
    /// collector has. Otherwise it is [`TraceParent::continue_or_start`].
    pub fn for_span(span: &tracing::Span, incoming: Option<&str>) -> Self {
        let caller = incoming.and_then(Self::parse);
        if let Some(caller) = &caller {
            crate::telemetry::set_remote_parent(span, caller);
        }
        match crate::telemetry::exported_ids(span) {
            Some((trace_id, parent_id, flags)) => Self {
                trace_id,
                parent_id,
                flags,
            },
            None => Self::continuing(caller),
        }
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

fn nonzero_hex<const N: usize>(rng: &mut impl RngCore) -> String {
    let mut bytes = [0_u8; N];
    while bytes.iter().all(|&b| b == 0) {
        rng.fill_bytes(&mut bytes);
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_parent_id() {
        let parsed = TraceParent::parse(VALID).unwrap();
        assert_eq!(parsed.to_string(), VALID);
        let ours = TraceParent::continue_or_start(Some(VALID));
        assert_eq!(ours.trace_id, parsed.trace_id);
        assert_eq!(ours.flags, 1);
        assert_ne!(ours.parent_id, parsed.parent_id);
        assert_eq!(TraceParent::parse(&ours.to_string()), Some(ours));
    }

    #[test]
    fn invalid_values_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
            let started = TraceParent::continue_or_start(Some(bad));
            assert_ne!(started.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(TraceParent::parse(&started.to_string()).is_some());
        }
        // A later version's extra fields are allowed.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }
}
