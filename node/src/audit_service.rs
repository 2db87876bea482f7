//! The audit log's network face: the `Audit` service (checkpoint, entries, proofs) for
//! auditors and witnesses over mutual TLS and for the node's own admin on the local API;
//! the `Witness` service (c2sp.org/tlog-witness add-checkpoint) for the logs this node
//! witnesses; and the checkpointer task that signs new checkpoints and collects
//! cosignatures from this node's witnesses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corridor::checkpoint::{self, Checkpoint, NoteVerifier};
use corridor::merkle;
use corridor::{OrgId, Role};
use corridor_proto::v1 as pb;
use corridor_proto::v1::audit_server::Audit;
use corridor_proto::v1::witness_client::WitnessClient;
use corridor_proto::v1::witness_server::Witness;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::node::{Node, now_ms, now_s};
use crate::storage::StoreError;
use crate::tls::PeerInfo;
use crate::workflows::Failure;

/// Most entries one GetEntries call returns.
pub const MAX_ENTRIES_PER_CALL: u64 = 1000;

/// This node's log origin: a schema-less URL naming the federation and the org.
pub fn origin(node: &Node) -> String {
    corridor::audit::origin(&node.directory.federation, &node.org)
}

fn storage(e: StoreError) -> Status {
    match e {
        // Say plainly where the log is broken: auditors need to know.
        StoreError::MissingEntry(_) => Status::data_loss(e.to_string()),
        e => Failure::from(e).into(),
    }
}

/// What a caller asks of the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Checkpoints and proofs: hashes, what a witness needs to cosign.
    Proofs,
    /// The entries themselves. They hold no personal data, but their case pseudonyms,
    /// recipients, purposes and times link the events of one person's case, so only
    /// auditors read them: a witness is a working member (a shelter, an embassy), which
    /// must not learn where else a person it knows was referred.
    Entries,
}

/// Who may read the audit log: over mutual TLS, members with the auditor role that work
/// no cases ([`corridor::Member::reads_audit_entries`]), and auditors and witnesses its
/// proofs only, and on the local API the node's users whose role may read it.
async fn authorize<T>(node: &Node, request: &Request<T>, access: Access) -> Result<(), Status> {
    if let Some(peer) = request.extensions().get::<PeerInfo>() {
        crate::services::require_current_directory(node)?;
        let member = node
            .directory
            .get(&peer.org)
            .ok_or_else(|| Status::permission_denied("not a member"))?;
        let allowed = match access {
            Access::Proofs => member.has_role(Role::Auditor) || member.has_role(Role::Witness),
            Access::Entries => member.reads_audit_entries(),
        };
        if allowed {
            return Ok(());
        }
        return Err(Status::permission_denied(match access {
            Access::Proofs => format!("{} has neither the auditor nor the witness role", peer.org),
            Access::Entries if member.has_role(Role::Auditor) => format!(
                "{} works cases beside its auditor role: audit entries are read only by auditors that work none, since they link the events of one person's case",
                peer.org
            ),
            Access::Entries => format!(
                "{} does not have the auditor role, which reading audit entries needs",
                peer.org
            ),
        }));
    }
    crate::auth::authorize(&node.store, request, corridor::LocalAction::ReadAuditLog).await?;
    Ok(())
}

pub struct AuditService {
    pub node: Arc<Node>,
}

impl AuditService {
    async fn checked_size(&self, size: u64) -> Result<u64, Status> {
        let current = self.node.store.audit_size().await.map_err(storage)?;
        if size > current {
            return Err(Status::out_of_range(format!(
                "tree size {size} is larger than the log ({current} entries)"
            )));
        }
        Ok(size)
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        authorize(&self.node, &request, Access::Proofs).await?;
        let (size, _, note) = served_checkpoint(&self.node)
            .await
            .map_err(storage)?
            .ok_or_else(|| Status::unavailable("no checkpoint signed yet"))?;
        let mut note = note;
        for line in self.node.store.cosignatures(size).await.map_err(storage)? {
            note.push_str(&line);
            note.push('\n');
        }
        Ok(Response::new(pb::CheckpointResponse {
            note,
            origin: origin(&self.node),
            verifier_key: log_verifier(&self.node).to_string(),
        }))
    }

    async fn get_entries(
        &self,
        request: Request<pb::GetEntriesRequest>,
    ) -> Result<Response<pb::GetEntriesResponse>, Status> {
        authorize(&self.node, &request, Access::Entries).await?;
        let r = request.get_ref();
        if r.start >= r.end || r.end - r.start > MAX_ENTRIES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "entries range must be non-empty and at most {MAX_ENTRIES_PER_CALL} long"
            )));
        }
        self.checked_size(r.end).await?;
        let entries = self
            .node
            .store
            .audit_entries(r.start, r.end)
            .await
            .map_err(storage)?;
        Ok(Response::new(pb::GetEntriesResponse { entries }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::InclusionProofResponse>, Status> {
        authorize(&self.node, &request, Access::Proofs).await?;
        let r = request.get_ref();
        let size = self.checked_size(r.tree_size).await?;
        let index = r.index;
        if index >= size {
            return Err(Status::out_of_range(format!(
                "index {index} is not in a tree of size {size}"
            )));
        }
        if !r.leaf_hash.is_empty() {
            let entry = self
                .node
                .store
                .audit_entries(index, index + 1)
                .await
                .map_err(storage)?;
            if entry.first().map(|e| merkle::leaf_hash(e).to_vec()) != Some(r.leaf_hash.clone()) {
                return Err(Status::not_found(format!(
                    "entry {index} does not have that leaf hash"
                )));
            }
        }
        let proof = self
            .node
            .store
            .with_audit_hashes(|reader| merkle::prove_record(size, index, reader))
            .await
            .map_err(storage)?;
        Ok(Response::new(pb::InclusionProofResponse {
            index,
            tree_size: size,
            proof: proof.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::ConsistencyProofResponse>, Status> {
        authorize(&self.node, &request, Access::Proofs).await?;
        let r = request.get_ref();
        let new = self.checked_size(r.new_size).await?;
        if r.old_size > new {
            return Err(Status::invalid_argument("old size is larger than new size"));
        }
        // The empty tree is a prefix of every tree: its proof is empty.
        if r.old_size == 0 {
            return Ok(Response::new(pb::ConsistencyProofResponse {
                proof: Vec::new(),
            }));
        }
        let proof = self
            .node
            .store
            .with_audit_hashes(|reader| merkle::prove_tree(new, r.old_size, reader))
            .await
            .map_err(storage)?;
        Ok(Response::new(pb::ConsistencyProofResponse {
            proof: proof.iter().map(|h| h.to_vec()).collect(),
        }))
    }
}

/// The C2SP verifier of this node's checkpoints.
pub fn log_verifier(node: &Node) -> NoteVerifier {
    NoteVerifier::new(&origin(node), node.signing_key.verifying_key())
}

/// The name under which `org` cosigns checkpoints as a witness.
pub fn witness_name(node: &Node, org: &OrgId) -> String {
    corridor::audit::witness_name(&node.directory.federation, org)
}

pub struct WitnessService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl Witness for WitnessService {
    async fn add_checkpoint(
        &self,
        request: Request<pb::AddCheckpointRequest>,
    ) -> Result<Response<pb::AddCheckpointResponse>, Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| {
                Status::unauthenticated("witnessing is only offered to members over mutual TLS")
            })?;
        let node = &self.node;
        crate::services::require_current_directory(node)?;
        if !node.config.audit.witness_for.contains(&peer.org) {
            return Err(Status::permission_denied(format!(
                "this node does not witness {}",
                peer.org
            )));
        }
        let member = node
            .directory
            .get(&peer.org)
            .ok_or_else(|| Status::permission_denied("not a member"))?;
        let log_origin = corridor::audit::origin(&node.directory.federation, &peer.org);
        let log_key = NoteVerifier::new(&log_origin, member.signing_key);
        let r = request.into_inner();
        let proof = r
            .consistency_proof
            .iter()
            .map(|h| <[u8; 32]>::try_from(h.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Status::invalid_argument("consistency proof hashes must be 32 bytes"))?;
        let stored = node.store.witnessed(&log_origin).await.map_err(storage)?;
        let stored_state = stored
            .as_ref()
            .map(|(size, root)| {
                <[u8; 32]>::try_from(root.as_slice())
                    .map(|root| corridor::witness::WitnessState { size: *size, root })
            })
            .transpose()
            .map_err(|_| Status::internal("stored witness state is corrupt"))?;
        let decision = corridor::witness::add_checkpoint(
            &log_origin,
            &log_key,
            stored_state.as_ref(),
            r.old_size,
            &proof,
            &r.checkpoint,
        );
        let checkpoint = match decision {
            Ok(checkpoint) => checkpoint,
            Err(corridor::witness::WitnessError::Conflict { witness_size }) => {
                return Ok(Response::new(pb::AddCheckpointResponse {
                    result: Some(pb::add_checkpoint_response::Result::ConflictSize(
                        witness_size,
                    )),
                }));
            }
            Err(e) => {
                tracing::warn!(log = %peer.org, error = %e, "refused to cosign a checkpoint");
                return Err(Status::failed_precondition(format!(
                    "checkpoint refused: {e}"
                )));
            }
        };
        let now = now_ms();
        let advanced = node
            .store
            .advance_witnessed(
                &log_origin,
                stored.map(|(size, _)| size),
                checkpoint.size,
                &checkpoint.root,
                now,
            )
            .await
            .map_err(storage)?;
        if !advanced {
            let current = node
                .store
                .witnessed(&log_origin)
                .await
                .map_err(storage)?
                .map(|(size, _)| size)
                .unwrap_or(0);
            return Ok(Response::new(pb::AddCheckpointResponse {
                result: Some(pb::add_checkpoint_response::Result::ConflictSize(current)),
            }));
        }
        let line = checkpoint::cosign(
            &checkpoint,
            &witness_name(node, &node.org),
            &node.signing_key,
            (now / 1000) as u64,
        );
        tracing::debug!(log = %peer.org, size = checkpoint.size, "cosigned checkpoint");
        Ok(Response::new(pb::AddCheckpointResponse {
            result: Some(pb::add_checkpoint_response::Result::Cosignature(line)),
        }))
    }
}

/// The checkpoint this node serves: the newest a majority of its witnesses cosigned —
/// a newer one not yet cosigned (its witnesses are asked one after another, and one may be
/// down) would fail every auditor's quorum — but never one older than it served before,
/// which an auditor that pinned it would take for a fork. Before it served any since it
/// started, that is the newest as it started (what earlier versions served). Without
/// witnesses, or before a majority cosigned any, the newest.
async fn served_checkpoint(node: &Node) -> Result<Option<(u64, Vec<u8>, String)>, StoreError> {
    use std::sync::atomic::Ordering;
    let chosen = checkpoint_to_serve(node).await?;
    if let Some((size, _, _)) = &chosen {
        node.served_checkpoint_size
            .fetch_max(*size, Ordering::Relaxed);
    }
    Ok(chosen)
}

/// The checkpoint [`served_checkpoint`] would serve now, without recording that it did.
async fn checkpoint_to_serve(node: &Node) -> Result<Option<(u64, Vec<u8>, String)>, StoreError> {
    use std::sync::atomic::Ordering;
    let witnesses: Vec<String> = node
        .config
        .audit
        .witnesses
        .iter()
        .map(|w| w.to_string())
        .collect();
    let cosigned = match witnesses.is_empty() {
        true => None,
        false => {
            node.store
                .newest_cosigned_size(&witnesses, witnesses.len() / 2 + 1)
                .await?
        }
    };
    let floor = node.served_checkpoint_size.load(Ordering::Relaxed);
    // Without a checkpoint the majority cosigned (no witnesses, or none yet), the newest:
    // never smaller than one served before, since signing refuses a shorter log.
    match cosigned {
        Some(size) => node.store.checkpoint_at(size.max(floor)).await,
        None => node.store.latest_checkpoint().await,
    }
}

/// The checkpoint this node serves, and when a majority of its witnesses last vouched
/// for it (seconds, from their cosignatures), if they have: what auditors judge a log's
/// freshness by. Reading it changes nothing of what auditors are served.
pub async fn served_freshness(node: &Node) -> Result<Option<(u64, Option<u64>)>, StoreError> {
    let Some((size, _, note)) = checkpoint_to_serve(node).await? else {
        return Ok(None);
    };
    let witnesses = &node.config.audit.witnesses;
    let lines = node.store.cosignatures(size).await?;
    let verifiers: Vec<_> = witnesses
        .iter()
        .filter_map(|w| {
            let member = node.directory.get(w)?;
            Some(checkpoint::CosignatureVerifier::new(
                &witness_name(node, w),
                member.signing_key,
            ))
        })
        .collect();
    let timestamps = verifiers.iter().filter_map(|verifier| {
        lines
            .iter()
            .find_map(|line| verifier.verify_line(&note, line).ok())
    });
    let quorum = match witnesses.len() {
        0 => 0,
        n => n / 2 + 1,
    };
    Ok(Some((
        size,
        checkpoint::quorum_time(timestamps, quorum, now_s()),
    )))
}

/// Signs a checkpoint for the current tree if it grew. First, every time, it checks that
/// the stored log still holds the last checkpoint signed — as long, with the same root —
/// and that the new tree extends it: otherwise the stored log changed (its tables edited,
/// or a database put back together wrongly), and it signs nothing, so that its witnesses
/// are asked for nothing either.
pub async fn sign_checkpoint(node: &Node) -> Result<Option<u64>, StoreError> {
    let size = node.store.audit_size().await?;
    let last = node.store.latest_checkpoint().await?;
    if let Some((last_size, last_root, _)) = &last {
        if *last_size > size {
            return Err(StoreError::Corrupt(
                "the stored audit log is shorter than its last signed checkpoint",
            ));
        }
        let again = node
            .store
            .with_audit_hashes(|reader| merkle::tree_hash(*last_size, reader))
            .await?;
        if again.as_slice() != last_root.as_slice() {
            return Err(StoreError::Corrupt(
                "the stored audit log no longer matches its last signed checkpoint",
            ));
        }
        if *last_size == size {
            return Ok(None);
        }
    }
    if size == 0 {
        return Ok(None);
    }
    let root = node
        .store
        .with_audit_hashes(|reader| merkle::tree_hash(size, reader))
        .await?;
    // The empty tree is a prefix of every tree (and no proof starts from it).
    if let Some((last_size, last_root, _)) = last.as_ref().filter(|(n, _, _)| *n > 0) {
        let proof = node
            .store
            .with_audit_hashes(|reader| merkle::prove_tree(size, *last_size, reader))
            .await?;
        let old_root: merkle::Hash = last_root
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("a stored checkpoint root is not 32 bytes"))?;
        if merkle::verify_consistency(*last_size, size, &proof, &old_root, &root).is_err() {
            return Err(StoreError::Corrupt(
                "the stored audit log does not extend its last signed checkpoint",
            ));
        }
    }
    let checkpoint = Checkpoint {
        origin: origin(node),
        size,
        root,
    };
    let note = checkpoint::sign(&checkpoint, &log_verifier(node), &node.signing_key);
    node.store
        .store_checkpoint(size, &root, &note, now_ms())
        .await?;
    tracing::debug!(size, "checkpoint signed");
    Ok(Some(size))
}

/// Asks `witness` to cosign our checkpoint `note` of `size`, and stores its cosignature.
async fn ask_witness(node: &Node, witness: &OrgId, size: u64, note: &str) -> Result<(), String> {
    let member = node
        .directory
        .get(witness)
        .ok_or_else(|| format!("{witness} is not a member"))?;
    let channel = crate::delivery::channel_to(node, witness).map_err(|e| e.to_string())?;
    let mut client = WitnessClient::new(channel)
        .max_decoding_message_size(crate::server::MAX_CONTROL_MESSAGE_BYTES);
    let mut old = node
        .store
        .witness_view(witness.as_str())
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..2 {
        let proof = if old == 0 || old >= size {
            Vec::new()
        } else {
            node.store
                .with_audit_hashes(|reader| merkle::prove_tree(size, old, reader))
                .await
                .map_err(|e| e.to_string())?
        };
        let response = client
            .add_checkpoint(pb::AddCheckpointRequest {
                old_size: old,
                consistency_proof: proof.iter().map(|h| h.to_vec()).collect(),
                checkpoint: note.to_owned(),
            })
            .await
            .map_err(|s| crate::workflows::peer_message(&s))?
            .into_inner();
        match response.result {
            Some(pb::add_checkpoint_response::Result::Cosignature(line)) => {
                let verifier = checkpoint::CosignatureVerifier::new(
                    &witness_name(node, witness),
                    member.signing_key,
                );
                let timestamp = verifier
                    .verify_line(note, &line)
                    .map_err(|e| format!("cosignature does not verify: {e}"))?;
                let now_s = now_s();
                if !checkpoint::cosigned_in_time(timestamp, now_s) {
                    return Err(format!(
                        "cosignature is dated {timestamp}, more than {} s ahead of this node's clock ({now_s})",
                        checkpoint::MAX_COSIGNATURE_SKEW_S
                    ));
                }
                node.store
                    .store_cosignature(size, witness.as_str(), &line)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            Some(pb::add_checkpoint_response::Result::ConflictSize(theirs)) => {
                if theirs > size {
                    return Err(format!("witness has size {theirs}, larger than our log"));
                }
                node.store
                    .set_witness_view(witness.as_str(), theirs)
                    .await
                    .map_err(|e| e.to_string())?;
                old = theirs;
            }
            None => return Err("empty answer".into()),
        }
    }
    Err("witness kept answering with a conflict".into())
}

/// How often a failure that keeps happening (a witness down, a log that cannot be
/// checkpointed) is logged again.
const REPEATED_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Failures that recur every round, logged when they start, when their reason changes
/// and once a minute, not several times a second.
struct RepeatedFailures<K>(HashMap<K, (String, Instant)>);

impl<K> Default for RepeatedFailures<K> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<K: std::hash::Hash + Eq + Clone> RepeatedFailures<K> {
    /// Records `reason` for `key`; true if it is due to be logged.
    fn failed(&mut self, key: &K, reason: String) -> bool {
        let due = self
            .0
            .get(key)
            .is_none_or(|(last, at)| *last != reason || at.elapsed() >= REPEATED_FAILURE_LOG_EVERY);
        if due {
            self.0.insert(key.clone(), (reason, Instant::now()));
        }
        due
    }

    /// Records that `key` succeeded; true if it had been failing.
    fn succeeded(&mut self, key: &K) -> bool {
        self.0.remove(key).is_some()
    }
}

/// Signs checkpoints as the log grows and collects cosignatures — asking again, each
/// round, every witness that has not cosigned the latest checkpoint, and every
/// `audit.cosignature_refresh_s` those that have — until `stop`.
///
/// The refresh is what lets an auditor tell a quiet log from one that stopped
/// checkpointing: a log whose stored tree no longer matches what it signed asks its
/// witnesses for nothing more, so the newest time its quorum vouched for it falls behind.
pub async fn run_checkpointer(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(node.config.audit.checkpoint_interval_ms);
    let refresh = Duration::from_secs(node.config.audit.cosignature_refresh_s);
    let mut failing_witnesses: RepeatedFailures<OrgId> = RepeatedFailures::default();
    let mut failing_log: RepeatedFailures<()> = RepeatedFailures::default();
    // Per witness: the size it last cosigned for us in this run, and when. Measured on
    // this node's clock, whatever the witness's says; empty at start, so every witness is
    // asked once as the node starts.
    let mut cosigned_at: HashMap<OrgId, (u64, Instant)> = HashMap::new();
    let mut told_expired = false;
    loop {
        let signed = sign_checkpoint(&node).await;
        match &signed {
            Err(error) => {
                if failing_log.failed(&(), error.to_string()) {
                    tracing::error!(
                        %error,
                        "checkpoint not signed; its witnesses are not asked to cosign until it is, so auditors see its last cosignatures age"
                    );
                }
            }
            Ok(_) => {
                if failing_log.succeeded(&()) {
                    tracing::info!("checkpoints are signed again");
                }
            }
        }
        // With its directory expired the node sends nothing, cosignature requests too
        // (its witnesses would refuse them, each round); it says so once.
        let current = node.directory.is_current(crate::node::now_ms());
        if !current && !told_expired {
            tracing::error!(
                expired_at = %corridor::utc::format(node.directory.expires_at_ms),
                "the federation directory has expired: this node sends and accepts nothing until a newer one is installed and the node restarted"
            );
            told_expired = true;
        }
        let latest = match signed {
            Ok(_) if current => node.store.latest_checkpoint().await,
            _ => Ok(None),
        };
        if let Ok(Some((size, _, note))) = latest {
            for witness in &node.config.audit.witnesses {
                let seen = node.store.witness_view(witness.as_str()).await.unwrap_or(0);
                let fresh = seen >= size
                    && cosigned_at
                        .get(witness)
                        .is_some_and(|(at_size, at)| *at_size == size && at.elapsed() < refresh);
                if fresh {
                    continue;
                }
                match ask_witness(&node, witness, size, &note).await {
                    Ok(()) => {
                        cosigned_at.insert(witness.clone(), (size, Instant::now()));
                        if failing_witnesses.succeeded(witness) {
                            tracing::info!(%witness, size, "cosigned again");
                        }
                    }
                    Err(reason) => {
                        if failing_witnesses.failed(witness, reason.clone()) {
                            tracing::warn!(%witness, size, %reason, "no cosignature");
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
