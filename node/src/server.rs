//! Starting and stopping a node: both listeners (federation over mutual TLS, local API on
//! its own address), health checking and reflection on each, the delivery task, and a
//! graceful stop on SIGTERM or Ctrl-C.

use std::sync::Arc;

use corridor_proto::v1::audit_server::AuditServer;
use corridor_proto::v1::caseworker_server::CaseworkerServer;
use corridor_proto::v1::federation_server::FederationServer;
use corridor_proto::v1::witness_server::WitnessServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;

use crate::audit_service::{AuditService, WitnessService};
use crate::config::Config;
use crate::node::{Node, StartError};
use crate::services::{CaseworkerService, FederationService};
use crate::{delivery, tls};

/// Largest request the local API accepts, in bytes.
pub const MAX_LOCAL_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest audit or witness request, and witness answer, in bytes: ranges, proofs
/// asked for, notes and cosignatures are all small.
pub const MAX_CONTROL_MESSAGE_BYTES: usize = 64 * 1024;

/// Requests open at once on one federation connection. A sender's courier has at most
/// four requests open to a recipient, beside a few audit and witness calls; with at most
/// `tls::MAX_CONNECTIONS_PER_MEMBER` connections, a member holds at most 16 × 32 requests.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// How long a stopping node waits for its listeners' connections to close.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Takes the data directory for this process alone, for as long as the returned file
/// stays open: two nodes on one database would each take the other's writes for a
/// stranger's, and serve the same audit log twice. Offline commands (tokens) need no
/// lock: their writes are meant to reach a running node.
fn lock_data_dir(config: &Config) -> Result<std::fs::File, StartError> {
    let dir = &config.data_dir;
    let failed = |reason: String| StartError::DataDir {
        path: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
    let path = dir.join("node.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| failed(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StartError::DataDirInUse(dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(failed(format!("cannot lock {}: {e}", path.display())))
        }
    }
}

/// Runs a node until it is told to stop.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let _data_dir_lock = lock_data_dir(&config)?;
    let node = Node::load(config).await?;
    for warning in node.config_warnings() {
        tracing::warn!("{warning}");
    }
    // Listening first: a node that cannot take its addresses has not started, and its
    // log must not say it did.
    let fed_listener = bind(node.config.federation.listen).await?;
    let local_listener = bind(node.config.local.listen).await?;
    let metrics_listener = match node.config.metrics.listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    record_start(&node).await?;
    // Before anything is delivered: what an attempt cut short by the stop may have sent
    // counts as held by its recipient, whatever the next attempt meets.
    let marked = node.store.count_attempts_cut_short().await?;
    if marked > 0 {
        tracing::info!(
            marked,
            "queued referrals without a recorded attempt counted as possibly sent before the node stopped"
        );
    }
    // Before anything is delivered: nothing leaves that the consent no longer admits.
    if let Err(failure) = crate::workflows::cancel_referrals_no_longer_admitted(&node).await {
        return Err(StartError::Mismatch(format!(
            "cannot check the queued referrals against the federation directory: {}",
            failure.message
        )));
    }
    match crate::workflows::ask_outstanding_recipients_to_purge(&node).await {
        Ok(0) => {}
        Ok(queued) => tracing::info!(
            queued,
            "asked recipients that consents no longer admit to purge"
        ),
        Err(failure) => {
            tracing::error!(error = %failure.message, "could not ask recipients that consents no longer admit to purge; will try at the next start")
        }
    }
    match crate::workflows::seal_legacy_consent_details(&node).await {
        Ok(0) => {}
        Ok(sealed) => tracing::info!(
            sealed,
            "sealed the details of consents recorded in plaintext"
        ),
        Err(failure) => {
            return Err(StartError::Mismatch(format!(
                "cannot seal the details of consents recorded in plaintext: {}",
                failure.message
            )));
        }
    }
    match crate::workflows::key_legacy_request_ids(&node).await {
        Ok(0) => {}
        Ok(keyed) => tracing::info!(
            keyed,
            "replaced request ids stored in plaintext with their keys"
        ),
        Err(failure) => {
            return Err(StartError::Mismatch(format!(
                "cannot replace request ids stored in plaintext with their keys: {}",
                failure.message
            )));
        }
    }
    let fed_addr = fed_listener.local_addr().ok();
    let local_addr = local_listener.local_addr().ok();

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<FederationServer<FederationService>>()
        .await;
    health
        .set_serving::<CaseworkerServer<CaseworkerService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(corridor_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Mismatch(format!("reflection setup failed: {e}")))?;

    let stop_rx = node.stopping.subscribe();
    let f = &node.config.federation;
    let incoming = tls::accept_members(
        fed_listener,
        node.tls.server_config(node.directory.clone())?,
        node.directory.clone(),
        std::time::Duration::from_millis(f.handshake_timeout_ms),
        f.max_connections,
    );
    let federation = Server::builder()
        // Requests a member has open at once, each up to `max_message_bytes` held while it
        // waits for room (`services::InProgress`): a bound on memory, not only on work.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // A member that vanished without closing its connection gives its slot back.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(health_service.clone())
        .add_service(reflection.clone())
        .add_service(
            FederationServer::new(FederationService { node: node.clone() })
                .max_decoding_message_size(f.max_message_bytes),
        )
        .add_service(
            AuditServer::new(AuditService { node: node.clone() })
                .max_decoding_message_size(MAX_CONTROL_MESSAGE_BYTES),
        )
        .add_service(
            WitnessServer::new(WitnessService { node: node.clone() })
                .max_decoding_message_size(MAX_CONTROL_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    let local = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            CaseworkerServer::new(CaseworkerService { node: node.clone() })
                .max_decoding_message_size(MAX_LOCAL_MESSAGE_BYTES),
        )
        .add_service(
            AuditServer::new(AuditService { node: node.clone() })
                .max_decoding_message_size(MAX_CONTROL_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            // Small unary calls stall on delayed ACKs without TCP_NODELAY.
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(local_listener),
                |conn| {
                    if let Ok(stream) = &conn {
                        let _ = stream.set_nodelay(true);
                    }
                    conn
                },
            ),
            stopped(stop_rx.clone()),
        );
    let metrics_addr = metrics_listener
        .as_ref()
        .and_then(|listener| listener.local_addr().ok());
    let metrics = metrics_listener.map(|listener| {
        tokio::spawn(crate::metrics::serve(
            Arc::downgrade(&node),
            listener,
            stop_rx.clone(),
        ))
    });
    let delivery = tokio::spawn(delivery::run(node.clone(), stop_rx.clone()));
    let retention = tokio::spawn(enforce_retention(node.clone(), stop_rx.clone()));
    let checkpointer = tokio::spawn(crate::audit_service::run_checkpointer(
        node.clone(),
        stop_rx,
    ));
    let federation = tokio::spawn(federation);
    let local = tokio::spawn(local);
    tracing::info!(
        org = %node.org,
        federation = %fed_addr.map_or_else(|| "?".to_owned(), |a| a.to_string()),
        local = %local_addr.map_or_else(|| "?".to_owned(), |a| a.to_string()),
        metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        "corridor-node serving"
    );

    termination_signal().await;
    tracing::info!("stopping");
    node.stopping.send_replace(true);
    // Requests in progress get the grace period to finish; a client that keeps its
    // connection open after that (HTTP/2 closes it only once the client has answered a
    // last ping) is not waited for, so the node still closes its database itself. What a
    // request cut short had not committed it did not acknowledge either.
    let grace_ends = tokio::time::Instant::now() + STOP_GRACE;
    for (name, mut task) in [("federation", federation), ("local", local)] {
        match tokio::time::timeout_at(grace_ends, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::error!(%error, "{name} listener failed"),
            Ok(Err(error)) => tracing::error!(%error, "{name} listener panicked"),
            Err(_) => {
                tracing::warn!(
                    "{name} connections still open {}s after the stop began; no longer waiting for them",
                    STOP_GRACE.as_secs()
                );
                task.abort();
            }
        }
    }
    if let Some(mut task) = metrics {
        match tokio::time::timeout_at(grace_ends, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::error!(%error, "metrics listener failed"),
            Ok(Err(error)) => tracing::error!(%error, "metrics listener panicked"),
            Err(_) => {
                task.abort();
                let _ = task.await;
            }
        }
    }
    let _ = delivery.await;
    let _ = retention.await;
    let _ = checkpointer.await;
    close(node).await;
    tracing::info!("stopped");
    Ok(())
}

/// Records the configuration and keys the node starts with (fingerprints only), so that
/// every change of either shows in the audit log.
async fn record_start(node: &Node) -> Result<(), StartError> {
    let config_text = std::fs::read(&node.config.path).unwrap_or_default();
    let entry = corridor::audit::encode(
        &corridor::audit::Event::NodeStarted {
            config_sha256: corridor::canonical::sha256(&config_text),
            signing_key: node.signing_key.verifying_key().to_base64(),
            sealing_key: node.sealing_key.public_key().to_base64(),
            cert_sha256: node
                .tls
                .chain
                .first()
                .map(|c| corridor::canonical::sha256(c.as_ref()))
                .unwrap_or_default(),
        },
        crate::node::now_ms(),
    );
    node.store.append_audit(vec![entry]).await?;
    Ok(())
}

/// Deletes received referrals past their purpose's retention and shreds their keys.
async fn enforce_retention(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let every = std::time::Duration::from_secs(node.config.retention.check_interval_s);
    loop {
        let now = crate::node::now_ms();
        let entry = Box::new(move |deleted| {
            corridor::audit::encode(&corridor::audit::Event::RetentionPurge { deleted }, now)
        });
        let checkpointed = match node.store.enforce_retention(now, entry).await {
            Ok(0) => false,
            Ok(deleted) => {
                tracing::info!(deleted, "received referrals past retention deleted");
                if let Err(error) = node.store.checkpoint().await {
                    tracing::warn!(%error, "WAL checkpoint after retention purge failed; tried again at the next check");
                }
                true
            }
            Err(error) => {
                tracing::error!(%error, "retention check failed");
                false
            }
        };
        // Not twice in one check: a checkpoint a reader holds up holds up every write.
        if !checkpointed {
            match node.store.checkpoint_if_owed().await {
                Ok(true) => tracing::info!("WAL checkpoint owed since a purge done"),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "WAL checkpoint owed since a purge failed again; tried again at the next check");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn close(node: Arc<Node>) {
    node.store.close().await;
}
