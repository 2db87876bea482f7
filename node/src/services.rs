//! The gRPC transport: thin tonic services that authenticate the caller and hand the
//! request to a workflow.
//!
//! * [`FederationService`] — node to node, over mutual TLS; the caller is the org its
//!   certificate names ([`PeerInfo`], set once per connection).
//! * [`CaseworkerService`] — the local API; the caller is the user of a bearer token.

use std::collections::HashMap;
use std::sync::Arc;

use corridor::envelope::MAX_BATCH_ENVELOPES;
use corridor::{MessageId, OrgId};
use corridor_proto::v1 as pb;
use corridor_proto::v1::caseworker_server::Caseworker;
use corridor_proto::v1::federation_server::Federation;
use prost::Message as _;
use tokio::sync::oneshot::Receiver;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use crate::auth::authorize;
use crate::delivery::Delivered;
use crate::node::Node;
use crate::tls::PeerInfo;
use crate::workflows::{self, Failure};
use corridor::LocalAction;

pub struct FederationService {
    pub node: Arc<Node>,
}

/// Envelopes one member may have in progress at this node at once: as many as a sender's
/// courier ever sends it together (four full batches), so an honest sender never waits.
/// More wait for their turn, so that one member's flood, junk or not, holds at most this
/// many tasks while other members' envelopes are handled beside it.
pub const MAX_ENVELOPES_IN_PROGRESS_PER_MEMBER: usize = 4 * MAX_BATCH_ENVELOPES;

/// Per member, the envelopes it has in progress at this node.
pub struct InProgress(HashMap<OrgId, Arc<Semaphore>>);

impl InProgress {
    pub fn new(members: impl IntoIterator<Item = OrgId>) -> Self {
        Self(
            members
                .into_iter()
                .map(|org| {
                    let room = Semaphore::new(MAX_ENVELOPES_IN_PROGRESS_PER_MEMBER);
                    (org, Arc::new(room))
                })
                .collect(),
        )
    }

    /// Waits until `member` has room for `n` more envelopes (at most a batch); the permit
    /// makes room again as it drops.
    pub async fn admit(&self, member: &OrgId, n: usize) -> Result<OwnedSemaphorePermit, Status> {
        let room = self
            .0
            .get(member)
            .ok_or_else(|| Status::permission_denied("not a member"))?;
        let n = u32::try_from(n.clamp(1, MAX_BATCH_ENVELOPES)).unwrap_or(1);
        room.clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| Status::unavailable("the node is stopping"))
    }
}

/// Most received referrals listed in one answer.
pub const MAX_INBOX_PAGE: u32 = 1000;

/// Where an inbox page starts: before the position a previous page's `next_page_token`
/// names.
fn inbox_page_token(token: &str) -> Result<Option<i64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix("before-")
        .and_then(|position| position.parse().ok())
        .map(Some)
        .ok_or_else(|| Status::invalid_argument("page_token is not one an earlier inbox page gave"))
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn deliver(
        &self,
        request: Request<pb::Envelope>,
    ) -> Result<Response<pb::DeliverResponse>, Status> {
        let peer = authenticated_member(&self.node, &request)?;
        let _room = self.node.in_progress.admit(&peer.org, 1).await?;
        let response = workflows::receive_envelope(&self.node, &peer, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn deliver_batch(
        &self,
        request: Request<pb::DeliverBatchRequest>,
    ) -> Result<Response<pb::DeliverBatchResponse>, Status> {
        let peer = authenticated_member(&self.node, &request)?;
        let envelopes = request.into_inner().envelopes;
        if envelopes.len() > corridor::envelope::MAX_BATCH_ENVELOPES {
            return Err(Status::invalid_argument(format!(
                "a batch holds at most {} envelopes",
                corridor::envelope::MAX_BATCH_ENVELOPES
            )));
        }
        // Room for all of them first: a request given up while it waits starts nothing.
        let mut room = self
            .node
            .in_progress
            .admit(&peer.org, envelopes.len())
            .await?;
        // Each envelope in a task of its own, as if it had come alone: their public-key
        // work spreads over the cores and their commits share the writer's groups. Each
        // holds its share of the room until it ends, also if the request is given up.
        let handled: Vec<_> = envelopes
            .into_iter()
            .map(|bytes| {
                let (node, peer) = (self.node.clone(), peer.clone());
                let share = room.split(1);
                tokio::spawn(async move {
                    let _share = share;
                    let envelope = pb::Envelope::decode(bytes).map_err(|_| {
                        Status::invalid_argument("an envelope of the batch is not an Envelope")
                    })?;
                    Ok::<_, Status>(workflows::receive_envelope(&node, &peer, envelope).await?)
                })
            })
            .collect();
        let mut outcomes = Vec::with_capacity(handled.len());
        for task in handled {
            let outcome = match task.await {
                Ok(Ok(accepted)) => pb::deliver_outcome::Outcome::Accepted(accepted),
                Ok(Err(status)) => pb::deliver_outcome::Outcome::Refused(pb::DeliverRefusal {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                }),
                Err(_) => pb::deliver_outcome::Outcome::Refused(pb::DeliverRefusal {
                    code: tonic::Code::Internal as i32,
                    message: "handling the envelope failed".into(),
                }),
            };
            outcomes.push(pb::DeliverOutcome {
                outcome: Some(outcome),
            });
        }
        Ok(Response::new(pb::DeliverBatchResponse { outcomes }))
    }
}

/// The member a federation request comes from, if this node accepts envelopes now.
fn authenticated_member<T>(node: &Node, request: &Request<T>) -> Result<PeerInfo, Status> {
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("connection has no authenticated member"))?;
    require_current_directory(node)?;
    Ok(peer)
}

/// Fails once this node's directory has expired: who is a member, and with which keys,
/// is no longer known, so no member's request is served — also on a connection opened
/// before (new ones are refused at the handshake).
pub(crate) fn require_current_directory(node: &Node) -> Result<(), Status> {
    if node.directory.is_current(crate::node::now_ms()) {
        Ok(())
    } else {
        Err(Status::unavailable(
            "this node's federation directory has expired: it accepts nothing until a newer one is installed",
        ))
    }
}

/// Waits (up to 30 s, or until the node is asked to stop) until a sent referral is no
/// longer queued, then answers its status. `first_attempt` (registered before the
/// referral could be attempted, with its status as queued) spares the looks at the stored
/// status when that attempt delivers it.
async fn settled_status(
    node: &Node,
    id: MessageId,
    mut first_attempt: Option<(Receiver<Option<Delivered>>, pb::GetReferralStatusResponse)>,
) -> Result<pb::GetReferralStatusResponse, Status> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut stopping = node.stopping.subscribe();
    let status = async {
        loop {
            let (attempt, queued) = match first_attempt.take() {
                Some((attempt, queued)) => (attempt, Some(queued)),
                None => {
                    // Register before looking, so that no attempt ending between the two
                    // is missed.
                    let attempt = node.waiters.wait(id);
                    let status = referral_status(node, id).await?;
                    if status.state != "queued" {
                        return Ok(status);
                    }
                    (attempt, None)
                }
            };
            // A stop waits for the calls in progress: this one must not hold it up.
            let ended = tokio::select! {
                ended = tokio::time::timeout_at(deadline, attempt) => ended,
                _ = async { stopping.wait_for(|stop| *stop).await.is_ok() } => {
                    return referral_status(node, id).await;
                }
            };
            match ended {
                Err(_) => return referral_status(node, id).await,
                Ok(Ok(Some(delivered))) if let Some(queued) = queued => {
                    return delivered_status(queued, delivered);
                }
                Ok(_) => {}
            }
        }
    }
    .await;
    // Every registration of this call is dropped by now: forget them all.
    node.waiters.forget(id);
    status
}

/// The status of a referral as queued, once `delivered`: what a look at the stored
/// status would give.
fn delivered_status(
    queued: pb::GetReferralStatusResponse,
    delivered: Delivered,
) -> Result<pb::GetReferralStatusResponse, Status> {
    let receipt = pb::Receipt::decode(delivered.receipt.as_slice())
        .map_err(|_| Status::internal("stored receipt is corrupt"))?;
    Ok(pb::GetReferralStatusResponse {
        state: "delivered".into(),
        attempts: u32::try_from(delivered.attempts).unwrap_or(u32::MAX),
        receipt: Some(receipt),
        ..queued
    })
}

async fn referral_status(
    node: &Node,
    id: MessageId,
) -> Result<pb::GetReferralStatusResponse, Status> {
    let status = node
        .store
        .outbox_status(id)
        .await
        .map_err(Failure::from)?
        .ok_or_else(|| Status::not_found(format!("no sent referral {id}")))?;
    crate::convert::outbox_status_to_pb(status)
        .map_err(|_| Status::internal("stored receipt is corrupt"))
}

/// What the recipient of the delivered referral `id` proved it did to it since, with the
/// purge receipts it gave: "purged", "cut", or "" for neither.
async fn since_delivered(node: &Node, id: MessageId) -> Result<&'static str, Status> {
    use prost::Message as _;
    let mut since = "";
    for bytes in node
        .store
        .purge_receipts_covering(id)
        .await
        .map_err(Failure::from)?
    {
        let receipt = pb::PurgeReceipt::decode(bytes.as_slice())
            .map_err(|_| Status::internal("stored purge receipt is corrupt"))?;
        if receipt.purged_referrals.iter().any(|r| r[..] == id.0[..]) {
            return Ok("purged");
        }
        if receipt.cut_referrals.iter().any(|r| r[..] == id.0[..]) {
            since = "cut";
        }
    }
    Ok(since)
}

pub struct CaseworkerService {
    pub node: Arc<Node>,
}

fn referral_id(text: &str) -> Result<MessageId, Status> {
    MessageId::from_hex(text)
        .map_err(|_| Status::invalid_argument("referral id must be 32 hex digits"))
}

#[tonic::async_trait]
impl Caseworker for CaseworkerService {
    async fn create_case(
        &self,
        request: Request<pb::CreateCaseRequest>,
    ) -> Result<Response<pb::CreateCaseResponse>, Status> {
        let user = authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let case_id = workflows::create_case(&self.node, &user, &request.get_ref().label).await?;
        Ok(Response::new(pb::CreateCaseResponse { case_id }))
    }

    async fn record_consent(
        &self,
        request: Request<pb::RecordConsentRequest>,
    ) -> Result<Response<pb::RecordConsentResponse>, Status> {
        let user = authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let consent_id = workflows::record_consent(&self.node, &user, request.into_inner()).await?;
        Ok(Response::new(pb::RecordConsentResponse { consent_id }))
    }

    async fn send_referral(
        &self,
        request: Request<pb::SendReferralRequest>,
    ) -> Result<Response<pb::SendReferralResponse>, Status> {
        let user = authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let wait = request.get_ref().wait;
        let queued = workflows::send_referral(&self.node, &user, request.into_inner()).await?;
        let state_now = queued.status.state.clone();
        let status = if wait {
            let first = queued.first_attempt.map(|attempt| (attempt, queued.status));
            match settled_status(&self.node, queued.id, first).await {
                Ok(status) => Some(status),
                // It is queued, committed and will be delivered: the caller must learn
                // its id, not an error that reads as "nothing was sent" and sends it twice.
                Err(error) => {
                    tracing::warn!(referral = %queued.id, error = %error.message(), "could not wait for a queued referral; answered as queued");
                    None
                }
            }
        } else {
            None
        };
        Ok(Response::new(pb::SendReferralResponse {
            referral_id: queued.id.to_hex(),
            state: status.as_ref().map_or(state_now, |s| s.state.clone()),
            status,
        }))
    }

    async fn list_inbox(
        &self,
        request: Request<pb::ListInboxRequest>,
    ) -> Result<Response<pb::ListInboxResponse>, Status> {
        authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let page_size = match request.get_ref().page_size {
            0 => MAX_INBOX_PAGE,
            n => n.min(MAX_INBOX_PAGE),
        };
        let before = inbox_page_token(&request.get_ref().page_token)?;
        // One more than asked for tells whether a next page exists.
        let mut rows = self
            .node
            .store
            .inbox_page(i64::from(page_size) + 1, before)
            .await
            .map_err(Failure::from)?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => format!("before-{}", last.position),
            _ => String::new(),
        };
        let items = rows
            .into_iter()
            .map(|r| pb::InboxItem {
                referral_id: r.message_id.to_hex(),
                sender: r.sender,
                purpose: r.purpose,
                case_ref: r.case_ref,
                received_at_ms: r.received_at_ms,
            })
            .collect();
        Ok(Response::new(pb::ListInboxResponse {
            items,
            next_page_token,
        }))
    }

    async fn get_referral(
        &self,
        request: Request<pb::GetReferralRequest>,
    ) -> Result<Response<pb::GetReferralResponse>, Status> {
        let user = authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let id = referral_id(&request.get_ref().referral_id)?;
        let sender =
            match request.get_ref().sender.as_str() {
                "" => None,
                org => Some(OrgId::new(org).map_err(|e| {
                    Status::invalid_argument(format!("sender is not an org id: {e}"))
                })?),
            };
        let response = workflows::read_referral(&self.node, &user, id, sender.as_ref()).await?;
        Ok(Response::new(response))
    }

    async fn get_referral_status(
        &self,
        request: Request<pb::GetReferralStatusRequest>,
    ) -> Result<Response<pb::GetReferralStatusResponse>, Status> {
        authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let id = referral_id(&request.get_ref().referral_id)?;
        let mut status = referral_status(&self.node, id).await?;
        if status.state == "delivered" {
            status.since_delivered = since_delivered(&self.node, id).await?.into();
        }
        Ok(Response::new(status))
    }

    async fn await_referral(
        &self,
        request: Request<pb::GetReferralStatusRequest>,
    ) -> Result<Response<pb::GetReferralStatusResponse>, Status> {
        authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let id = referral_id(&request.get_ref().referral_id)?;
        Ok(Response::new(settled_status(&self.node, id, None).await?))
    }

    async fn get_outbox_stats(
        &self,
        request: Request<pb::OutboxStatsRequest>,
    ) -> Result<Response<pb::OutboxStatsResponse>, Status> {
        authorize(&self.node.store, &request, LocalAction::ViewOutboxStats).await?;
        let (queued, delivered, other) = self
            .node
            .store
            .outbox_stats()
            .await
            .map_err(Failure::from)?;
        Ok(Response::new(pb::OutboxStatsResponse {
            queued,
            delivered,
            other,
        }))
    }

    async fn get_consent(
        &self,
        request: Request<pb::ConsentRequest>,
    ) -> Result<Response<pb::ConsentView>, Status> {
        let user = authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let view = workflows::get_consent(&self.node, &user, &request.get_ref().consent_id).await?;
        Ok(Response::new(view))
    }

    async fn narrow_consent(
        &self,
        request: Request<pb::NarrowConsentRequest>,
    ) -> Result<Response<pb::ConsentView>, Status> {
        let user = authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let view = workflows::narrow_consent(&self.node, &user, request.into_inner()).await?;
        Ok(Response::new(view))
    }

    async fn withdraw_consent(
        &self,
        request: Request<pb::ConsentRequest>,
    ) -> Result<Response<pb::ConsentStatusResponse>, Status> {
        let user = authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let status =
            workflows::withdraw_consent(&self.node, &user, &request.get_ref().consent_id).await?;
        Ok(Response::new(status))
    }

    async fn get_consent_status(
        &self,
        request: Request<pb::ConsentRequest>,
    ) -> Result<Response<pb::ConsentStatusResponse>, Status> {
        authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let status = workflows::consent_status(&self.node, &request.get_ref().consent_id).await?;
        Ok(Response::new(status))
    }

    async fn restate_consent_terms(
        &self,
        request: Request<pb::ConsentRequest>,
    ) -> Result<Response<pb::RestateConsentTermsResponse>, Status> {
        let user = authorize(&self.node.store, &request, LocalAction::CaseWork).await?;
        let response =
            workflows::restate_consent_terms(&self.node, &user, &request.get_ref().consent_id)
                .await?;
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A member with as many envelopes in progress as it may have waits for room; another
    /// member does not wait behind it, and one that is not a member is refused.
    #[tokio::test]
    async fn a_member_at_its_bound_waits_and_others_do_not() {
        let (a, b) = (OrgId::new("org-a").unwrap(), OrgId::new("org-b").unwrap());
        let in_progress = InProgress::new([a.clone(), b.clone()]);
        let mut full = Vec::new();
        for _ in 0..MAX_ENVELOPES_IN_PROGRESS_PER_MEMBER / MAX_BATCH_ENVELOPES {
            full.push(in_progress.admit(&a, MAX_BATCH_ENVELOPES).await.unwrap());
        }
        let waits = tokio::time::timeout(Duration::from_millis(50), in_progress.admit(&a, 1));
        assert!(waits.await.is_err(), "a member past its bound was admitted");
        let _b = in_progress
            .admit(&b, 1)
            .await
            .expect("another member waits for nothing");
        full.pop();
        let _a = in_progress.admit(&a, 1).await.expect("room again");
        let stranger = OrgId::new("org-c").unwrap();
        assert!(in_progress.admit(&stranger, 1).await.is_err());
    }
}
