//! Carries envelopes to one member. Attempts to deliver to the same member at the same
//! time share requests (`DeliverBatch`): under load a request carries many envelopes, so
//! its fixed cost (an HTTP/2 stream, headers, TLS records, the recipient's dispatch) is
//! shared; unloaded, an envelope goes at once, alone, from the attempt's own task.
//!
//! At most [`REQUESTS_PER_MEMBER`] requests are in flight to a member; envelopes that
//! arrive meanwhile queue here and leave together in the next request. The verdict on
//! each envelope is its own outcome in the answer. A status for the request as a whole
//! that would be final for an envelope (the member does not know batches, or finds this
//! one too large) says nothing final about any one of them: they are sent again one by
//! one, so that only an answer about an envelope itself can end its delivery.
//!
//! An envelope leaves only if no narrowing or withdrawal was answered since its attempt
//! last knew it to be queued ([`Revocations`]): that is checked as its request is
//! formed, not when it was queued here, which may be a request's time earlier.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corridor::envelope::MAX_BATCH_ENVELOPES;
use corridor_proto::v1 as pb;
use corridor_proto::v1::federation_client::FederationClient;
use prost::Message as _;
use prost::bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::delivery::{Revocations, refusal_is_final};

/// Requests in flight to one member at once. Enough to keep a recipient's cores busy
/// while another of its requests waits for its commit; more would only make batches
/// smaller.
const REQUESTS_PER_MEMBER: usize = 4;

/// How long a member that does not know `DeliverBatch` is sent envelopes one by one
/// before it is asked again (it may have been upgraded).
const SINGLY_FOR: Duration = Duration::from_secs(600);

/// Bytes an envelope adds to a batch beyond its own: the field's tag and length.
const PER_ENVELOPE_OVERHEAD: usize = 6;

/// Why an envelope was not delivered.
#[derive(Debug)]
pub enum NotDelivered {
    /// What the member, or the transport, answered.
    Failed(Status),
    /// Not sent: a narrowing or withdrawal was answered since its attempt noted the
    /// [`Revocations`] count; the attempt must find out whether it is still queued.
    Revoked,
}

type Verdict = Result<pb::DeliverResponse, NotDelivered>;

/// An envelope waiting for a request to carry it, and where its verdict goes.
struct Pending {
    envelope: Bytes,
    /// The [`Revocations`] count its attempt noted.
    revocations: u64,
    answer: oneshot::Sender<Verdict>,
}

pub struct Courier {
    client: FederationClient<Channel>,
    /// A batch's bytes stay within this, the limit on a federation message.
    max_bytes: usize,
    queue: Mutex<VecDeque<Pending>>,
    requests: Arc<Semaphore>,
    /// Until when the member gets envelopes one by one.
    singly_until: Mutex<Option<Instant>>,
    revocations: Arc<Revocations>,
}

impl Courier {
    pub fn new(
        client: FederationClient<Channel>,
        max_bytes: usize,
        revocations: Arc<Revocations>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            max_bytes,
            queue: Mutex::default(),
            requests: Arc::new(Semaphore::new(REQUESTS_PER_MEMBER)),
            singly_until: Mutex::default(),
            revocations,
        })
    }

    /// Delivers one encoded envelope, whose attempt noted the [`Revocations`] count
    /// `revocations` before it last knew it to be queued, and answers what the member
    /// answered about it.
    pub async fn deliver(self: &Arc<Self>, envelope: Bytes, revocations: u64) -> Verdict {
        let (answer, answered) = oneshot::channel();
        self.queue
            .lock()
            .map_err(|_| NotDelivered::Failed(Status::internal("the delivery queue is poisoned")))?
            .push_back(Pending {
                envelope,
                revocations,
                answer,
            });
        // With a request free this attempt carries what is queued itself, its own
        // envelope included unless another took it; what queues meanwhile goes in a task
        // of its own, so that this attempt's answer is not held up by others.
        if let Some((batch, permit)) = self.next_batch() {
            self.send(batch).await;
            drop(permit);
            if let Some((batch, permit)) = self.next_batch() {
                let courier = self.clone();
                tokio::spawn(async move { courier.send_while_queued(batch, permit).await });
            }
        }
        answered.await.unwrap_or_else(|_| {
            Err(NotDelivered::Failed(Status::unavailable(
                "the request carrying it was lost",
            )))
        })
    }

    async fn send_while_queued(&self, mut batch: Vec<Pending>, mut permit: OwnedSemaphorePermit) {
        loop {
            self.send(batch).await;
            drop(permit);
            match self.next_batch() {
                Some(next) => (batch, permit) = next,
                None => return,
            }
        }
    }

    /// A free request and what it should carry, if anything is queued and a request is
    /// free.
    ///
    /// Whoever queues an envelope then looks for a free request, and whoever frees one
    /// then looks for queued envelopes, so no envelope is left behind: one queued
    /// while every request was taken is found when the first of them is freed.
    fn next_batch(&self) -> Option<(Vec<Pending>, OwnedSemaphorePermit)> {
        loop {
            let permit = self.requests.clone().try_acquire_owned().ok()?;
            let mut queue = self.queue.lock().ok()?;
            let batch = self.still_sendable(take_batch(&mut queue, self.max_bytes));
            if !batch.is_empty() {
                return Some((batch, permit));
            }
            drop(permit);
            // Queued by one that found every request taken, just before we freed ours.
            if queue.is_empty() {
                return None;
            }
        }
    }

    /// The envelopes of `batch` whose attempts saw the latest narrowing or withdrawal;
    /// the others' attempts are told to look again.
    fn still_sendable(&self, batch: Vec<Pending>) -> Vec<Pending> {
        let revocations = self.revocations.current();
        let (sendable, revoked): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|p| p.revocations == revocations);
        for pending in revoked {
            let _ = pending.answer.send(Err(NotDelivered::Revoked));
        }
        sendable
    }

    fn singly(&self) -> bool {
        self.singly_until
            .lock()
            .map(|until| until.is_some_and(|until| Instant::now() < until))
            .unwrap_or(false)
    }

    /// Sends `batch` and answers each envelope's attempt.
    async fn send(&self, batch: Vec<Pending>) {
        if self.singly() {
            return self.send_singly(batch).await;
        }
        tracing::debug!(envelopes = batch.len(), "sending a batch");
        let request = pb::DeliverBatchRequest {
            envelopes: batch.iter().map(|p| p.envelope.clone()).collect(),
        };
        match self.client.clone().deliver_batch(request).await {
            Ok(response) => {
                let outcomes = response.into_inner().outcomes;
                if outcomes.len() != batch.len() {
                    let status = Status::unknown(format!(
                        "the member answered a batch of {} with {} outcomes",
                        batch.len(),
                        outcomes.len()
                    ));
                    for pending in batch {
                        let _ = pending
                            .answer
                            .send(Err(NotDelivered::Failed(status.clone())));
                    }
                    return;
                }
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = pending
                        .answer
                        .send(verdict(outcome).map_err(NotDelivered::Failed));
                }
            }
            Err(status) if refusal_is_final(status.code()) => {
                if status.code() == Code::Unimplemented
                    && let Ok(mut until) = self.singly_until.lock()
                {
                    *until = Some(Instant::now() + SINGLY_FOR);
                }
                self.send_singly(batch).await;
            }
            Err(status) => {
                for pending in batch {
                    let _ = pending
                        .answer
                        .send(Err(NotDelivered::Failed(status.clone())));
                }
            }
        }
    }

    /// Sends each envelope in a `Deliver` request of its own, all at once; like a batch,
    /// only those whose attempts saw the latest narrowing or withdrawal.
    async fn send_singly(&self, batch: Vec<Pending>) {
        let requests: Vec<_> = self
            .still_sendable(batch)
            .into_iter()
            .map(|pending| {
                let mut client = self.client.clone();
                tokio::spawn(async move {
                    let result = match pb::Envelope::decode(pending.envelope) {
                        Ok(envelope) => client.deliver(envelope).await.map(|r| r.into_inner()),
                        Err(_) => Err(Status::invalid_argument("stored envelope is corrupt")),
                    };
                    let _ = pending.answer.send(result.map_err(NotDelivered::Failed));
                })
            })
            .collect();
        for request in requests {
            let _ = request.await;
        }
    }
}

/// Takes from the front of `queue` as many envelopes as one request may carry: at least
/// one, at most [`MAX_BATCH_ENVELOPES`], within `max_bytes`.
fn take_batch(queue: &mut VecDeque<Pending>, max_bytes: usize) -> Vec<Pending> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queue.front() {
        let size = next.envelope.len() + PER_ENVELOPE_OVERHEAD;
        if batch.len() == MAX_BATCH_ENVELOPES || (!batch.is_empty() && bytes + size > max_bytes) {
            break;
        }
        bytes += size;
        batch.extend(queue.pop_front());
    }
    batch
}

/// The member's answer about one envelope, as `Deliver` would have given it.
fn verdict(outcome: pb::DeliverOutcome) -> Result<pb::DeliverResponse, Status> {
    match outcome.outcome {
        Some(pb::deliver_outcome::Outcome::Accepted(response)) => Ok(response),
        Some(pb::deliver_outcome::Outcome::Refused(refusal)) => {
            // A refusal that claims success is no answer at all.
            let code = match Code::from_i32(refusal.code) {
                Code::Ok => Code::Unknown,
                code => code,
            };
            Err(Status::new(code, refusal.message))
        }
        None => Err(Status::unknown("the member's outcome is empty")),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Courier, MAX_BATCH_ENVELOPES, NotDelivered, PER_ENVELOPE_OVERHEAD, Pending, take_batch,
        verdict,
    };
    use corridor_proto::v1 as pb;
    use corridor_proto::v1::federation_client::FederationClient;
    use corridor_proto::v1::federation_server::{Federation, FederationServer};
    use prost::Message as _;
    use prost::bytes::Bytes;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::transport::{Channel, Endpoint, Server};
    use tonic::{Code, Request, Response, Status};

    /// A member from before batches: it answers `Deliver` and knows no `DeliverBatch`.
    #[derive(Clone, Default)]
    struct MemberWithoutBatches {
        batches: Arc<AtomicUsize>,
        singles: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl Federation for MemberWithoutBatches {
        async fn deliver(
            &self,
            _: Request<pb::Envelope>,
        ) -> Result<Response<pb::DeliverResponse>, Status> {
            self.singles.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(pb::DeliverResponse::default()))
        }

        async fn deliver_batch(
            &self,
            _: Request<pb::DeliverBatchRequest>,
        ) -> Result<Response<pb::DeliverBatchResponse>, Status> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            Err(Status::unimplemented("unknown method"))
        }
    }

    /// A federation client over plain TCP to `service`, served on a loopback port.
    async fn serve<S: Federation>(service: FederationServer<S>) -> FederationClient<Channel> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        FederationClient::new(channel)
    }

    /// A member that answers batches slowly, each envelope with a receipt naming it, and
    /// counts its requests.
    #[derive(Clone, Default)]
    struct SlowMember {
        in_flight: Arc<AtomicUsize>,
        most_in_flight: Arc<AtomicUsize>,
        batches: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    #[tonic::async_trait]
    impl Federation for SlowMember {
        async fn deliver(
            &self,
            _: Request<pb::Envelope>,
        ) -> Result<Response<pb::DeliverResponse>, Status> {
            Err(Status::internal("batches only"))
        }

        async fn deliver_batch(
            &self,
            request: Request<pb::DeliverBatchRequest>,
        ) -> Result<Response<pb::DeliverBatchResponse>, Status> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            let envelopes = request.into_inner().envelopes;
            self.batches.lock().unwrap().push(envelopes.len());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let outcomes = envelopes
                .into_iter()
                .map(|envelope| pb::DeliverOutcome {
                    outcome: Some(pb::deliver_outcome::Outcome::Accepted(
                        pb::DeliverResponse {
                            receipt: Some(pb::Receipt {
                                message_id: envelope.to_vec(),
                                ..Default::default()
                            }),
                            purge_receipt: None,
                        },
                    )),
                })
                .collect();
            Ok(Response::new(pb::DeliverBatchResponse { outcomes }))
        }
    }

    /// Envelopes that arrive while every request is taken wait and leave together;
    /// each attempt gets the answer about its own envelope.
    #[tokio::test]
    async fn envelopes_queued_behind_busy_requests_leave_together() {
        let member = SlowMember::default();
        let client = serve(FederationServer::new(member.clone())).await;
        let courier = Courier::new(client, 300_000, Arc::default());
        let attempts: Vec<_> = (0..40)
            .map(|n| {
                let courier = courier.clone();
                tokio::spawn(async move {
                    let envelope = Bytes::from(format!("envelope {n}"));
                    let answer = courier
                        .deliver(envelope.clone(), 0)
                        .await
                        .expect("delivered");
                    assert_eq!(answer.receipt.unwrap().message_id, envelope.to_vec());
                })
            })
            .collect();
        for attempt in attempts {
            attempt.await.expect("each attempt gets its own answer");
        }
        let batches = member.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 40, "{batches:?}");
        assert!(
            batches.len() < 40,
            "some envelopes travelled together: {batches:?}"
        );
        let most = member.most_in_flight.load(Ordering::SeqCst);
        assert!(
            most <= super::REQUESTS_PER_MEMBER,
            "{most} requests at once"
        );
    }

    #[tokio::test]
    async fn a_member_without_batches_gets_envelopes_one_by_one() {
        let member = MemberWithoutBatches::default();
        let client = serve(FederationServer::new(member.clone())).await;
        let revocations = Arc::new(super::Revocations::default());
        let courier = Courier::new(client, 300_000, revocations.clone());
        let envelope = Bytes::from(pb::Envelope::default().encode_to_vec());
        let counts = || {
            (
                member.batches.load(Ordering::SeqCst),
                member.singles.load(Ordering::SeqCst),
            )
        };

        courier
            .deliver(envelope.clone(), 0)
            .await
            .expect("delivered alone");
        assert_eq!(counts(), (1, 1), "asked for a batch once, then sent alone");
        courier
            .deliver(envelope.clone(), 0)
            .await
            .expect("delivered alone");
        assert_eq!(counts(), (1, 2), "not asked for a batch again");

        // An envelope whose attempt has not seen the latest narrowing or withdrawal
        // does not leave.
        revocations.revoked();
        let stale = courier.deliver(envelope.clone(), 0).await;
        assert!(matches!(stale, Err(NotDelivered::Revoked)), "{stale:?}");
        assert_eq!(counts(), (1, 2), "nothing was sent");
        courier.deliver(envelope, 1).await.expect("delivered");
        assert_eq!(counts(), (1, 3));
    }

    fn queue(sizes: &[usize]) -> VecDeque<Pending> {
        sizes
            .iter()
            .map(|&size| Pending {
                envelope: Bytes::from(vec![0u8; size]),
                revocations: 0,
                answer: tokio::sync::oneshot::channel().0,
            })
            .collect()
    }

    #[test]
    fn a_batch_stays_within_the_message_limit_and_the_envelope_count() {
        let size = 1000;
        let each = size + PER_ENVELOPE_OVERHEAD;
        let mut q = queue(&[size; 10]);
        assert_eq!(take_batch(&mut q, 3 * each).len(), 3);
        assert_eq!(take_batch(&mut q, 3 * each - 1).len(), 2);
        assert_eq!(q.len(), 5);
        // An envelope larger than the limit still goes, alone: the member judges it.
        let mut q = queue(&[50_000, 10]);
        assert_eq!(take_batch(&mut q, 4096).len(), 1);
        assert_eq!(take_batch(&mut q, 4096).len(), 1);
        assert!(take_batch(&mut q, 4096).is_empty());
        let mut q = queue(&[10; MAX_BATCH_ENVELOPES + 5]);
        assert_eq!(take_batch(&mut q, usize::MAX).len(), MAX_BATCH_ENVELOPES);
        assert_eq!(take_batch(&mut q, usize::MAX).len(), 5);
    }

    #[test]
    fn an_outcome_becomes_the_answer_deliver_would_give() {
        let refused = |code: i32| pb::DeliverOutcome {
            outcome: Some(pb::deliver_outcome::Outcome::Refused(pb::DeliverRefusal {
                code,
                message: "no".into(),
            })),
        };
        let accepted = pb::DeliverOutcome {
            outcome: Some(pb::deliver_outcome::Outcome::Accepted(
                pb::DeliverResponse::default(),
            )),
        };
        assert!(verdict(accepted).is_ok());
        let status = verdict(refused(Code::PermissionDenied as i32)).unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::PermissionDenied, "no")
        );
        // Neither a refusal that says OK nor an empty outcome can pass for anything final.
        assert_eq!(verdict(refused(0)).unwrap_err().code(), Code::Unknown);
        assert_eq!(verdict(refused(999)).unwrap_err().code(), Code::Unknown);
        let empty = pb::DeliverOutcome { outcome: None };
        assert_eq!(verdict(empty).unwrap_err().code(), Code::Unknown);
    }
}
