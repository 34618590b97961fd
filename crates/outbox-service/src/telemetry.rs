//! Logging and metrics set-up.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::cli::{LogArgs, LogFormat};

/// The OTLP endpoint variable (OpenTelemetry's own name): when it is set,
/// spans are exported there over OTLP/HTTP (protobuf, `/v1/traces`).
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Keeps the span exporter alive; dropping it flushes what is buffered.
/// Drop it outside any async runtime (the exporter blocks).
#[must_use = "dropping it stops the span export"]
pub struct Tracing {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global tracing subscriber: logs to stdout and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans to that OTLP collector as
/// `service` (off by default: no exporter, no layer, no cost). Call once,
/// from `main`, before starting the async runtime.
///
/// # Errors
/// When the filter does not parse, the exporter cannot be built, or a
/// subscriber is already installed.
pub fn init_tracing(args: &LogArgs, service: &'static str) -> anyhow::Result<Tracing> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|e| anyhow::anyhow!("invalid log filter {:?}: {e}", args.log_filter))?;
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = match args.log_format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Pretty => fmt.boxed(),
    };
    let provider = match std::env::var(OTLP_ENDPOINT) {
        Ok(endpoint) if !endpoint.trim().is_empty() => Some(otlp_provider(service)?),
        _ => None,
    };
    let otel = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(provider.tracer(service))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
    Ok(Tracing { provider })
}

/// An OTLP/HTTP span exporter configured by OpenTelemetry's standard
/// variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_BSP_SCHEDULE_DELAY`, ...), batching on a thread of its own.
fn otlp_provider(
    service: &'static str,
) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    // The exporter's HTTP client takes rustls' process-wide provider: ring,
    // the one crypto stack of the build (see
    // `outbox_consumer::install_crypto_provider`).
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| anyhow::anyhow!("building the OTLP span exporter: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Histogram buckets for request and publish durations, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process-wide Prometheus recorder, installed on first use. Tests start
/// several apps in one process; they share it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&DURATION_BUCKETS)
                .map(PrometheusBuilder::build_recorder);
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    // Fails only if another recorder is installed; ours then
                    // renders an empty page rather than taking the process down.
                    let _ = metrics::set_global_recorder(recorder);
                    handle
                }
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Makes `span` a child of the remote span `parent` names, so that its
/// exported span joins that trace. Does nothing when spans are not exported.
pub fn set_remote_parent(span: &tracing::Span, parent: &crate::trace_context::TraceParent) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let (Ok(trace_id), Ok(span_id)) = (
        TraceId::from_hex(&parent.trace_id),
        SpanId::from_hex(&parent.parent_id),
    ) else {
        return;
    };
    let remote = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The exported span's (trace id, span id, flags) in lowercase hex, when
/// spans are exported.
pub fn exported_ids(span: &tracing::Span) -> Option<(String, String, u8)> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let context = span.context();
    let ids = context.span().span_context().clone();
    ids.is_valid().then(|| {
        (
            ids.trace_id().to_string(),
            ids.span_id().to_string(),
            ids.trace_flags().to_u8(),
        )
    })
}
