//! What the node does, between the gRPC transport and storage: creating cases, recording
//! consent, sending a referral through the consent gate into the outbox, and accepting a
//! referral from a peer. Each workflow checks everything before it writes, and writes in
//! one transaction, so bad input never leaves a partial write.

use std::collections::HashMap;

use corridor::consent::{self, Consent};
use corridor::envelope::{ENVELOPE_VERSION, EnvelopeError};
use corridor::{Envelope, EnvelopeHeader, MessageId, MessageKind, OrgId, Purpose, Receipt};
use corridor_proto::v1 as pb;
use prost::Message as _;
use tonic::{Code, Status};

use crate::convert;
use crate::node::{Node, now_ms};
use crate::storage::{AcceptOutcome, AcceptedReferral, NewConsent, NewOutboxItem, User};
use crate::tls::PeerInfo;

/// Most fields one referral may carry.
pub const MAX_FIELDS: usize = 64;
/// Longest field name and value, in bytes.
pub const MAX_FIELD_NAME_LEN: usize = 64;
pub const MAX_FIELD_VALUE_LEN: usize = 8192;
/// Longest case label, in bytes.
pub const MAX_LABEL_LEN: usize = 200;
/// Most recipients and purposes one consent may name.
pub const MAX_CONSENT_LIST: usize = 64;

/// A workflow failure: the gRPC code and a message that names the problem. Messages never
/// contain personal data.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
    fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        Self::new(Code::Internal, format!("{context}; see the node's log"))
    }
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Self {
        Status::new(f.code, f.message)
    }
}

impl From<crate::storage::StoreError> for Failure {
    fn from(e: crate::storage::StoreError) -> Self {
        Self::internal("storage failed", e)
    }
}

/// The gRPC code for each envelope refusal.
pub fn envelope_failure(e: EnvelopeError) -> Failure {
    let code = match &e {
        EnvelopeError::BadSignature => Code::Unauthenticated,
        EnvelopeError::SenderMismatch { .. } => Code::PermissionDenied,
        EnvelopeError::Expired { .. } | EnvelopeError::FromTheFuture { .. } => {
            Code::FailedPrecondition
        }
        EnvelopeError::Randomness => Code::Internal,
        _ => Code::InvalidArgument,
    };
    Failure::new(code, format!("envelope refused: {e}"))
}

fn random_id(prefix: &str) -> Result<String, Failure> {
    let id = MessageId::random().map_err(|e| Failure::internal("randomness unavailable", e))?;
    Ok(format!("{prefix}-{}", id.to_hex()))
}

fn parse_org(field: &str, value: &str) -> Result<OrgId, Failure> {
    OrgId::new(value).map_err(|e| Failure::invalid(format!("{field}: {e}")))
}

fn parse_purpose(value: &str) -> Result<Purpose, Failure> {
    Purpose::parse(value).map_err(|e| Failure::invalid(e.to_string()))
}

pub async fn create_case(node: &Node, user: &User, label: &str) -> Result<String, Failure> {
    if label.len() > MAX_LABEL_LEN {
        return Err(Failure::invalid(format!(
            "label is longer than {MAX_LABEL_LEN} bytes"
        )));
    }
    let id = random_id("case")?;
    node.store
        .create_case(&id, label, user.id, now_ms())
        .await?;
    tracing::info!(case = %id, user = %user.name, "case created");
    Ok(id)
}

pub async fn record_consent(
    node: &Node,
    user: &User,
    req: pb::RecordConsentRequest,
) -> Result<String, Failure> {
    if req.recipients.is_empty() || req.recipients.len() > MAX_CONSENT_LIST {
        return Err(Failure::invalid(format!(
            "consent must name between 1 and {MAX_CONSENT_LIST} recipients"
        )));
    }
    if req.purposes.is_empty() || req.purposes.len() > MAX_CONSENT_LIST {
        return Err(Failure::invalid(format!(
            "consent must name between 1 and {MAX_CONSENT_LIST} purposes"
        )));
    }
    let mut recipients = Vec::new();
    for r in &req.recipients {
        let org = parse_org("recipient", r)?;
        if node.directory.get(&org).is_none() {
            return Err(Failure::not_found(format!(
                "recipient {org} is not a member of the federation"
            )));
        }
        recipients.push(org);
    }
    let purposes = req
        .purposes
        .iter()
        .map(|p| parse_purpose(p))
        .collect::<Result<Vec<_>, _>>()?;
    let given_by = match req.given_by.as_str() {
        "" | "person" => "person",
        "guardian" => "guardian",
        _ => {
            return Err(Failure::invalid(
                "given_by must be \"person\" or \"guardian\"",
            ));
        }
    };
    let method = match req.method.as_str() {
        "" | "written" => "written",
        m @ ("verbal" | "interpreter") => m,
        _ => {
            return Err(Failure::invalid(
                "method must be \"written\", \"verbal\" or \"interpreter\"",
            ));
        }
    };
    let now = now_ms();
    if req.expires_at_ms <= now {
        return Err(Failure::invalid("consent expiry must be in the future"));
    }
    if !node.store.case_exists(&req.case_id).await? {
        return Err(Failure::not_found(format!(
            "case {} not found",
            req.case_id
        )));
    }
    let id = random_id("consent")?;
    node.store
        .record_consent(&NewConsent {
            id: &id,
            case_id: &req.case_id,
            recipients: &recipients,
            purposes: &purposes,
            given_by,
            method,
            recorded_by: user.id,
            recorded_at_ms: now,
            expires_at_ms: req.expires_at_ms,
        })
        .await?;
    tracing::info!(case = %req.case_id, consent = %id, user = %user.name, "consent recorded");
    Ok(id)
}

fn check_fields(fields: &HashMap<String, String>) -> Result<(), Failure> {
    if fields.len() > MAX_FIELDS {
        return Err(Failure::invalid(format!(
            "a referral carries at most {MAX_FIELDS} fields"
        )));
    }
    for (name, value) in fields {
        let name_ok = !name.is_empty()
            && name.len() <= MAX_FIELD_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(Failure::invalid(format!(
                "field name {:?} must be 1-{MAX_FIELD_NAME_LEN} characters of a-z, 0-9, '_' or '-'",
                name.chars().take(MAX_FIELD_NAME_LEN).collect::<String>()
            )));
        }
        if value.len() > MAX_FIELD_VALUE_LEN {
            // Name the field, never its value.
            return Err(Failure::invalid(format!(
                "field {name} is longer than {MAX_FIELD_VALUE_LEN} bytes"
            )));
        }
    }
    Ok(())
}

fn consents_of(rows: Vec<crate::storage::ConsentRow>) -> Vec<Consent> {
    rows.into_iter()
        .map(|r| Consent {
            id: r.id,
            recipients: r
                .recipients
                .iter()
                .filter_map(|o| OrgId::new(o).ok())
                .collect(),
            purposes: r
                .purposes
                .iter()
                .filter_map(|p| Purpose::parse(p).ok())
                .collect(),
            expires_at_ms: r.expires_at_ms,
            withdrawn_at_ms: r.withdrawn_at_ms,
        })
        .collect()
}

/// Gates, seals, signs and queues a referral. Returns its id once it is durably queued.
pub async fn send_referral(
    node: &Node,
    user: &User,
    req: pb::SendReferralRequest,
) -> Result<MessageId, Failure> {
    let recipient = parse_org("recipient", &req.recipient)?;
    let member = node.directory.get(&recipient).ok_or_else(|| {
        Failure::not_found(format!(
            "recipient {recipient} is not a member of the federation"
        ))
    })?;
    if recipient == node.org {
        return Err(Failure::invalid("a node cannot refer a case to itself"));
    }
    let purpose = parse_purpose(&req.purpose)?;
    check_fields(&req.fields)?;
    if !node.store.case_exists(&req.case_id).await? {
        return Err(Failure::not_found(format!(
            "case {} not found",
            req.case_id
        )));
    }
    let now = now_ms();
    let consents = consents_of(node.store.consents_for_case(&req.case_id).await?);
    let consent = consent::gate(&consents, &recipient, purpose, now).map_err(|refusal| {
        tracing::info!(case = %req.case_id, %recipient, %purpose, %refusal, "referral refused by consent gate");
        Failure::new(Code::FailedPrecondition, format!("referral refused: {refusal}"))
    })?;

    let payload = pb::ReferralPayload {
        case_ref: node.case_refs.reference(&req.case_id, &recipient),
        purpose: purpose.as_str().to_owned(),
        fields: req.fields,
        consent_id: consent.id.clone(),
    }
    .encode_to_vec();
    let message_id =
        MessageId::random().map_err(|e| Failure::internal("randomness unavailable", e))?;
    let ttl_ms = i64::try_from(node.config.delivery.envelope_ttl_hours)
        .unwrap_or(72)
        .saturating_mul(3_600_000);
    let header = EnvelopeHeader {
        version: ENVELOPE_VERSION,
        message_id,
        kind: MessageKind::Referral,
        sender: node.org.clone(),
        recipient: recipient.clone(),
        route: Vec::new(),
        created_at_ms: now,
        expires_at_ms: now.saturating_add(ttl_ms),
    };
    let envelope = Envelope::seal(header, &payload, &member.sealing_key, &node.signing_key)
        .map_err(|e| match e {
            EnvelopeError::Seal(corridor::SealError::PayloadTooLarge(_)) => {
                Failure::invalid(format!(
                    "referral is larger than {} bytes",
                    corridor::MAX_PAYLOAD_LEN
                ))
            }
            other => Failure::internal("sealing failed", other),
        })?;
    let digest = envelope.digest();
    node.store
        .enqueue(&NewOutboxItem {
            message_id,
            case_id: &req.case_id,
            consent_id: &consent.id,
            recipient: &recipient,
            purpose: purpose.as_str(),
            envelope: &convert::envelope_to_pb(&envelope).encode_to_vec(),
            envelope_digest: &digest,
            created_by: user.id,
            created_at_ms: now,
            expires_at_ms: envelope.header.expires_at_ms,
        })
        .await?;
    node.outbox_ready.notify_one();
    tracing::info!(referral = %message_id, case = %req.case_id, %recipient, %purpose, "referral queued");
    Ok(message_id)
}

/// Accepts an envelope from an authenticated peer: verifies every rule, answers a replay
/// with the receipt it got the first time, opens and checks the payload, and stores it
/// with a signed receipt in one transaction before answering.
pub async fn receive_envelope(
    node: &Node,
    peer: &PeerInfo,
    envelope: pb::Envelope,
) -> Result<pb::Receipt, Failure> {
    let envelope = convert::envelope_from_pb(envelope).map_err(envelope_failure)?;
    // The peer passed the handshake, so it is a member; its key signs its envelopes.
    let member = node.directory.get(&peer.org).ok_or_else(|| {
        Failure::new(
            Code::PermissionDenied,
            format!("{} is not a member", peer.org),
        )
    })?;
    let now = now_ms();
    let verified = envelope
        .verify(&node.org, &peer.org, &member.signing_key, now)
        .map_err(|e| {
            tracing::warn!(peer = %peer.org, error = %e, "envelope refused");
            envelope_failure(e)
        })?;
    let message_id = verified.header().message_id;
    let digest = verified.digest();
    if let Some(seen) = node.store.seen(message_id).await? {
        return replay_answer(seen, &peer.org, &digest);
    }
    let opened = verified.open(&node.sealing_key).map_err(|e| {
        tracing::warn!(peer = %peer.org, referral = %message_id, error = %e, "envelope does not open");
        envelope_failure(e)
    })?;
    let payload = pb::ReferralPayload::decode(opened.payload.as_slice())
        .map_err(|_| Failure::invalid("referral payload is not a valid ReferralPayload"))?;
    parse_purpose(&payload.purpose)?;
    check_fields(&payload.fields)?;
    if payload.case_ref.is_empty() || payload.case_ref.len() > 128 {
        return Err(Failure::invalid("referral case_ref must be 1-128 bytes"));
    }

    let receipt = Receipt::sign(
        message_id,
        digest,
        peer.org.clone(),
        node.org.clone(),
        now,
        0,
        &node.signing_key,
    );
    let receipt_pb = convert::receipt_to_pb(&receipt);
    let receipt_bytes = receipt_pb.encode_to_vec();
    let outcome = node
        .store
        .accept_referral(&AcceptedReferral {
            message_id,
            sender: &peer.org,
            envelope_digest: &digest,
            receipt: &receipt_bytes,
            purpose: &payload.purpose,
            case_ref: &payload.case_ref,
            payload: &opened.payload,
            received_at_ms: now,
        })
        .await?;
    match outcome {
        AcceptOutcome::Stored => {
            tracing::info!(referral = %message_id, sender = %peer.org, purpose = %payload.purpose, "referral received");
            Ok(receipt_pb)
        }
        AcceptOutcome::AlreadySeen(seen) => replay_answer(seen, &peer.org, &digest),
    }
}

/// A message id seen before: the same envelope gets the same receipt; anything else
/// reusing the id is refused.
fn replay_answer(
    seen: crate::storage::SeenMessage,
    sender: &OrgId,
    digest: &[u8; 32],
) -> Result<pb::Receipt, Failure> {
    if seen.sender != sender.as_str() || seen.envelope_digest != digest {
        return Err(Failure::new(
            Code::AlreadyExists,
            "message id was already used for a different envelope",
        ));
    }
    tracing::info!(sender = %sender, "duplicate envelope answered with its original receipt");
    pb::Receipt::decode(seen.receipt.as_slice())
        .map_err(|e| Failure::internal("stored receipt is corrupt", e))
}
