//! Prometheus metrics: what an operator watches on a node, served as OpenMetrics text at
//! `GET /metrics` on `[metrics] listen` when that is set (it is not by default).
//!
//! Counts, sizes, times and rule names only: nothing names a person, a case, a consent
//! or a local user, and no member is named either, since how much one organisation sends
//! another is itself telling. Most values are read when scraped (the outbox by state,
//! the audit log and its newest checkpoint, the directory, the writer's commits);
//! envelopes from other members are counted as they are answered. Scrapes are served one
//! at a time: each reads the database, and the endpoint has no authentication.

use std::sync::Weak;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::node::Node;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// A node's metrics and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    outbox: Family<StateLabel, Gauge>,
    audit_entries: Gauge,
    checkpoint_size: Gauge,
    checkpoint_signed: Gauge,
    checkpoint_cosignatures: Gauge,
    served_size: Gauge,
    served_vouched: Gauge,
    directory_serial: Gauge,
    directory_expiry: Gauge,
    commits: Counter,
    envelopes: Family<OutcomeLabel, Counter>,
    /// One scrape at a time: the reads stay off the pool's other users, and the commits
    /// counter is read and advanced as one step.
    scraping: tokio::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("corridor");
        let metrics = Self {
            outbox: Family::default(),
            audit_entries: Gauge::default(),
            checkpoint_size: Gauge::default(),
            checkpoint_signed: Gauge::default(),
            checkpoint_cosignatures: Gauge::default(),
            served_size: Gauge::default(),
            served_vouched: Gauge::default(),
            directory_serial: Gauge::default(),
            directory_expiry: Gauge::default(),
            commits: Counter::default(),
            envelopes: Family::default(),
            scraping: tokio::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "build",
            "The corridor-node version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "outbox_items",
            "Items in the outbox (referrals, withdrawals, narrowings) by state: queued, delivered or other (refused, expired, withdrawn, cancelled)",
            metrics.outbox.clone(),
        );
        registry.register(
            "audit_log_entries",
            "Entries in the node's audit log",
            metrics.audit_entries.clone(),
        );
        registry.register(
            "audit_checkpoint_size",
            "Entries covered by the newest checkpoint the node signed",
            metrics.checkpoint_size.clone(),
        );
        registry.register(
            "audit_checkpoint_signed_timestamp_seconds",
            "When the node signed its newest checkpoint",
            metrics.checkpoint_signed.clone(),
        );
        registry.register(
            "audit_checkpoint_cosignatures",
            "Witnesses' cosignatures of the newest checkpoint",
            metrics.checkpoint_cosignatures.clone(),
        );
        registry.register(
            "audit_served_checkpoint_size",
            "Entries covered by the checkpoint the node serves to auditors (the newest a majority of its witnesses cosigned, or the newest it signed when it has no witnesses)",
            metrics.served_size.clone(),
        );
        registry.register(
            "audit_served_checkpoint_vouched_timestamp_seconds",
            "When a majority of the node's witnesses last vouched for the checkpoint it serves: auditors refuse a log whose witnesses vouched too long ago (0 while they have not)",
            metrics.served_vouched.clone(),
        );
        registry.register(
            "directory_serial",
            "Serial number of the federation directory the node runs on",
            metrics.directory_serial.clone(),
        );
        registry.register(
            "directory_expiry_timestamp_seconds",
            "When that directory expires: the node refuses traffic after it",
            metrics.directory_expiry.clone(),
        );
        registry.register(
            "storage_commits",
            "Transactions the node's writer committed",
            metrics.commits.clone(),
        );
        registry.register(
            "envelopes_answered",
            "Envelopes from other members this node examined and answered: accepted (replays included), turned-away (the member's refusal budget was spent), or the rule that refused them (internal: this node's own fault, which the sender retries)",
            metrics.envelopes.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Counts an envelope answered: with a receipt, or refused by `rule` (a fixed code,
    /// see [`crate::workflows::Failure`]).
    pub fn envelope_answered(&self, refused_by: Option<&str>) {
        let outcome = refused_by.unwrap_or("accepted").to_owned();
        self.envelopes
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Reads what is read when scraped, then encodes every metric.
    async fn render(&self, node: &Node) -> Result<String, crate::storage::StoreError> {
        let _one_at_a_time = self.scraping.lock().await;
        let (queued, delivered, other) = node.store.outbox_stats().await?;
        for (state, n) in [
            ("queued", queued),
            ("delivered", delivered),
            ("other", other),
        ] {
            self.outbox
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(gauge_value(n));
        }
        self.audit_entries
            .set(gauge_value(node.store.audit_size().await?));
        if let Some((size, signed_at_ms, cosignatures)) = node.store.checkpoint_health().await? {
            self.checkpoint_size.set(gauge_value(size));
            self.checkpoint_signed.set(signed_at_ms / 1000);
            self.checkpoint_cosignatures.set(gauge_value(cosignatures));
        }
        if let Some((size, vouched)) = crate::audit_service::served_freshness(node).await? {
            self.served_size.set(gauge_value(size));
            self.served_vouched.set(gauge_value(vouched.unwrap_or(0)));
        }
        self.directory_serial
            .set(gauge_value(node.directory.serial));
        self.directory_expiry
            .set(node.directory.expires_at_ms / 1000);
        let commits = node.store.commits();
        self.commits
            .inc_by(commits.saturating_sub(self.commits.get()));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        Ok(text)
    }
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Serves `GET /metrics` on `listener` until `stop` turns true. Requests hold the node
/// only while they are answered, so a connection left open does not keep it alive.
pub async fn serve(
    node: Weak<Node>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let scrape = move || {
        let node = node.upgrade();
        async move {
            let Some(node) = node else {
                return (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping\n").into_response();
            };
            match node.metrics.render(&node).await {
                Ok(text) => {
                    (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
                }
                Err(error) => {
                    tracing::error!(%error, "metrics could not be read");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics could not be read; see the node's log\n",
                    )
                        .into_response()
                }
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
}
