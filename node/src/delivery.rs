//! Durable delivery from the outbox: at-least-once, in order of due time, with capped
//! exponential backoff and jitter, surviving restarts (all state is in the outbox table).
//!
//! A freshly queued envelope is also handed to the loop in memory ([`Handoff`]), so its
//! first attempt starts without reading it back; the outbox table stays the record, and
//! whatever the hand-off cannot take (all slots busy, a restart) is found there.
//!
//! An item is delivered when the recipient's receipt verifies against the envelope we
//! sent; receipt and state change are committed together. A recipient's refusal of the
//! envelope itself (bad signature, wrong recipient, …) ends delivery with state
//! `refused`; an envelope that outlives its expiry ends with `expired`; anything else —
//! unreachable peer, timeout, overload — is retried.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corridor::{MessageId, MessageKind, OrgId, audit};
use corridor_proto::v1::federation_client::FederationClient;
use prost::Message as _;
use prost::bytes::Bytes;
use ring::rand::SecureRandom as _;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity};

use crate::convert;
use crate::courier::{Courier, NotDelivered};
use crate::node::{Node, now_ms};
use crate::storage::{DueItem, Renewal};

/// Delay before attempt `attempts + 1`: exponential from `initial_ms`, capped at
/// `max_ms`, with "equal jitter" (half fixed, half random) so that many senders retrying
/// a recovered peer do not arrive in lockstep.
pub fn backoff_ms(attempts: i64, initial_ms: u64, max_ms: u64, random: u32) -> u64 {
    let shift = u32::try_from(attempts.clamp(0, 30)).unwrap_or(30);
    let cap = initial_ms.saturating_mul(1u64 << shift).min(max_ms);
    cap / 2 + u64::from(random) % (cap / 2 + 1)
}

/// How long before its envelope expires a request to purge (withdrawal or narrowing) is
/// renewed rather than sent. One that reached its recipient expired (the recipient's
/// clock may run a little ahead) would only be refused.
const WITHDRAWAL_RENEWAL_MARGIN_MS: i64 = 60_000;

/// Attempts after which the backoff is at its longest ([`backoff_ms`] stops doubling).
const RETRIES_BEFORE_SLOWEST: i64 = 30;

/// How soon the loop looks in the outbox again when every item due is in flight already:
/// their attempts end at their own pace, and looking every few milliseconds would only
/// compete with them for the database.
const IN_FLIGHT_RESCAN_MS: i64 = 250;

/// Whether `item` asks its recipient to purge (a consent withdrawal or narrowing): such a
/// request is answered with a purge receipt, waits for a recipient that left the
/// federation, and is renewed rather than left to expire.
fn asks_to_purge(item: &DueItem) -> bool {
    item.kind == i64::from(MessageKind::ConsentWithdrawal.as_i32())
        || item.kind == i64::from(MessageKind::ConsentNarrowing.as_i32())
}

/// Whether `item`'s envelope is at the end of its life, or a withdrawal's near it.
fn expiring(item: &DueItem, now: i64) -> bool {
    let margin = if asks_to_purge(item) {
        WITHDRAWAL_RENEWAL_MARGIN_MS
    } else {
        0
    };
    now >= item.expires_at_ms.saturating_sub(margin)
}

/// How old a refused request to purge must be before it is sealed anew instead of sent
/// again as it is: a refusal of the envelope itself (sealed to a key its recipient has
/// rotated out since, signed with one of this node's the directory no longer lists) is
/// mended by a new seal, and once a day bounds the envelopes a recipient that keeps
/// refusing costs.
const RENEW_REFUSED_AFTER_MS: i64 = 24 * 3600 * 1000;

/// Whether a request to purge was sealed at least [`RENEW_REFUSED_AFTER_MS`] ago. Such
/// requests are sealed to live as long as any envelope may, so their age follows from
/// their expiry.
fn sealed_long_ago(item: &DueItem, now: i64) -> bool {
    let sealed_at = item
        .expires_at_ms
        .saturating_sub(corridor::envelope::MAX_LIFETIME_MS);
    now.saturating_sub(sealed_at) >= RENEW_REFUSED_AFTER_MS
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // On failure fall back to no jitter rather than stop delivering.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u32::from_le_bytes(bytes)
}

/// Counts the changes that end queued referrals before they are sent: narrowings and
/// withdrawals of their consents.
///
/// An attempt notes the count from before it last knew its item to be queued (it queued
/// it, or read it as queued). If the count has moved when the attempt hands its envelope
/// to the courier, or when the courier forms the request that would carry it
/// ([`Courier`]), the attempt reads the item's state again and sends only if it is still
/// queued: once a narrowing or withdrawal is answered, nothing it ended leaves the node.
/// The count moves rarely, so the read is rare.
#[derive(Default)]
pub struct Revocations(AtomicU64);

impl Revocations {
    /// The count now: note it before confirming an item is queued.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Call once a change that ended queued referrals has committed, before answering it.
    pub fn revoked(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// An item due for an attempt, with the [`Revocations`] count from before it was last
/// known to be queued.
pub struct Noted {
    pub item: DueItem,
    pub revocations: u64,
}

/// Freshly queued envelopes on their way from the workflows to the delivery loop.
pub struct Handoff {
    sender: mpsc::Sender<Noted>,
    receiver: Mutex<Option<mpsc::Receiver<Noted>>>,
}

impl Handoff {
    pub fn new(capacity: usize) -> Self {
        let (sender, receiver) = mpsc::channel(capacity);
        Self {
            sender,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    /// Offers an item that is durably queued; if the hand-off is full the loop finds it
    /// in the outbox instead.
    pub fn offer(&self, item: Noted) -> bool {
        self.sender.try_send(item).is_ok()
    }

    fn take_receiver(&self) -> Option<mpsc::Receiver<Noted>> {
        self.receiver.lock().ok().and_then(|mut r| r.take())
    }
}

/// Callers waiting for the end of a delivery attempt of a given envelope.
#[derive(Default)]
pub struct Waiters(Mutex<HashMap<MessageId, Vec<oneshot::Sender<Option<Delivered>>>>>);

/// An attempt that ended with the envelope delivered and its verified answer committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Attempts made, this one included.
    pub attempts: i64,
    /// The recipient's signed receipt, as stored.
    pub receipt: Vec<u8>,
}

impl Waiters {
    /// Resolves when the next attempt to deliver `id` ends (or the waiter is dropped):
    /// with what was delivered if it succeeded, else `None` (look at the stored state).
    pub fn wait(&self, id: MessageId) -> oneshot::Receiver<Option<Delivered>> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.0.lock() {
            map.entry(id).or_default().push(tx);
        }
        rx
    }

    /// Forgets waiters of `id` that gave up.
    pub fn forget(&self, id: MessageId) {
        if let Ok(mut map) = self.0.lock()
            && let Some(list) = map.get_mut(&id)
        {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                map.remove(&id);
            }
        }
    }

    pub(crate) fn attempt_ended(&self, id: MessageId, delivered: Option<Delivered>) {
        let list = self.0.lock().ok().and_then(|mut map| map.remove(&id));
        for w in list.into_iter().flatten() {
            let _ = w.send(delivered.clone());
        }
    }
}

enum AttemptError {
    Retry(String),
    /// The recipient's answer, or the transport's, which may pass, in its words.
    RetryAnswered {
        code: Code,
        message: String,
    },
    Permanent(String),
    /// The recipient's final refusal, in its words.
    Refused {
        code: Code,
        message: String,
    },
    /// Not sent: the item is no longer queued (a narrowing or withdrawal ended it).
    NotQueued,
}

/// One courier per recipient, over a lazily connected channel, reused across deliveries.
#[derive(Default)]
struct Clients {
    couriers: Mutex<HashMap<OrgId, Arc<Courier>>>,
}

/// Whether a refusal with `code` ends an envelope's delivery: the recipient judged the
/// envelope itself, or cannot take it at all. Any other code may pass; the envelope is
/// sent again later.
pub(crate) fn refusal_is_final(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// A lazily connected mutual-TLS channel to a member's federation listener that accepts
/// only that member's certificate.
pub fn channel_to(node: &Node, org: &OrgId) -> Result<Channel, String> {
    let member = node
        .directory
        .get(org)
        .ok_or_else(|| format!("{org} is not a member"))?;
    let verifier = node
        .tls
        .server_verifier(node.directory.clone(), org.clone())
        .map_err(|e| e.to_string())?;
    let tls =
        ClientTlsConfig::new().identity(Identity::from_pem(&node.tls.cert_pem, &node.tls.key_pem));
    let d = &node.config.delivery;
    Ok(Endpoint::from_shared(member.endpoint.clone())
        .map_err(|e| format!("endpoint of {org} is invalid: {e}"))?
        .tls_config_with_verifier(tls, verifier)
        .map_err(|e| format!("TLS setup for {org} failed: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_millis(d.request_timeout_ms))
        .tcp_nodelay(true)
        .connect_lazy())
}

impl Clients {
    fn get(&self, node: &Node, org: &OrgId) -> Result<Arc<Courier>, AttemptError> {
        let mut couriers = self
            .couriers
            .lock()
            .map_err(|_| AttemptError::Retry("courier cache poisoned".into()))?;
        if let Some(courier) = couriers.get(org) {
            return Ok(courier.clone());
        }
        let channel = channel_to(node, org).map_err(AttemptError::Permanent)?;
        let max_bytes = node.config.federation.max_message_bytes;
        // A peer's answer is bounded as its requests are.
        let client = FederationClient::new(channel).max_decoding_message_size(max_bytes);
        let courier = Courier::new(client, max_bytes, node.revocations.clone());
        couriers.insert(org.clone(), courier.clone());
        Ok(courier)
    }
}

/// The verified answer to a delivered envelope, encoded for storage.
struct Answer {
    receipt: Vec<u8>,
    purge_receipt: Option<Vec<u8>>,
    /// The audit entry recording the verified answer.
    entry: Vec<u8>,
}

async fn deliver_once(
    node: &Node,
    clients: &Clients,
    item: &DueItem,
    revocations: u64,
) -> Result<Answer, AttemptError> {
    // Renewed before it expires, or, for a referral, ended as expired: the recipient
    // would only refuse it, and show the referral refused rather than expired.
    if expiring(item, now_ms()) {
        return Err(AttemptError::Retry(if asks_to_purge(item) {
            "its envelope is about to expire".into()
        } else {
            "its envelope has expired".into()
        }));
    }
    if !node.directory.is_current(now_ms()) {
        // Fail closed: who is a member is no longer known.
        return Err(AttemptError::Retry(
            "this node's federation directory has expired; install a newer one".into(),
        ));
    }
    let recipient = OrgId::new(&item.recipient)
        .map_err(|_| AttemptError::Permanent("stored recipient is invalid".into()))?;
    let member = node.directory.get(&recipient).ok_or_else(|| {
        let left = format!("{recipient} is no longer a member");
        if asks_to_purge(item) {
            // It still holds the data: ask again if it comes back (a newer directory).
            AttemptError::Retry(format!(
                "{left}; the request to purge waits for it to return"
            ))
        } else {
            // Not a refusal by the recipient: the sender's caseworker decides whether to
            // send it again should the member return.
            AttemptError::Permanent(format!(
                "not delivered: {left} of the federation; send it again if it returns"
            ))
        }
    })?;
    let digest: [u8; 32] = item
        .envelope_digest
        .as_slice()
        .try_into()
        .map_err(|_| AttemptError::Permanent("stored digest is corrupt".into()))?;
    let courier = clients.get(node, &recipient)?;
    let envelope = Bytes::from(item.envelope.clone());
    let mut revocations = revocations;
    let response = loop {
        let now = node.revocations.current();
        if now != revocations {
            let queued = node.store.due_item(item.message_id).await.map_err(|e| {
                AttemptError::Retry(format!("cannot read whether it is still queued: {e}"))
            })?;
            if queued.is_none() {
                return Err(AttemptError::NotQueued);
            }
            revocations = now;
        }
        match courier.deliver(envelope.clone(), revocations).await {
            Ok(response) => break response,
            Err(NotDelivered::Revoked) => continue,
            Err(NotDelivered::Failed(status)) => {
                let message = crate::workflows::peer_message(&status);
                return Err(if refusal_is_final(status.code()) {
                    AttemptError::Refused {
                        code: status.code(),
                        message,
                    }
                } else {
                    AttemptError::RetryAnswered {
                        code: status.code(),
                        message,
                    }
                });
            }
        }
    };
    let receipt = response
        .receipt
        .ok_or_else(|| AttemptError::Retry("answer carries no receipt".into()))?;
    let bytes = receipt.encode_to_vec();
    let receipt = convert::receipt_from_pb(receipt)
        .map_err(|e| AttemptError::Retry(format!("receipt is malformed: {e}")))?;
    receipt
        .verify(
            item.message_id,
            &digest,
            &node.org,
            &recipient,
            &member.signing_key,
        )
        .map_err(|e| AttemptError::Retry(format!("receipt does not verify: {e}")))?;
    let now = now_ms();
    let mut entry = audit::encode(
        &audit::Event::ReferralDelivered {
            message_id: item.message_id,
            recipient: recipient.clone(),
            envelope_digest: digest,
            recipient_log_index: receipt.log_index,
            recipient_leaf_hash: receipt.leaf_hash,
        },
        now,
    );
    let purge_receipt = if asks_to_purge(item) {
        // A request to purge is done only when the recipient proves it purged.
        let purge = response.purge_receipt.ok_or_else(|| {
            AttemptError::Retry("request to purge answered without a purge receipt".into())
        })?;
        let encoded = purge.encode_to_vec();
        let purge = convert::purge_receipt_from_pb(purge)
            .map_err(|e| AttemptError::Retry(format!("purge receipt is malformed: {e}")))?;
        let narrowing = item.kind == i64::from(MessageKind::ConsentNarrowing.as_i32());
        let (message_id, purger, consent_id, receipt_digest) = (
            item.message_id,
            recipient.clone(),
            item.consent_id.clone(),
            corridor::canonical::sha256(&purge.signed_bytes()),
        );
        let event = if narrowing {
            audit::Event::NarrowingReceiptReceived {
                message_id,
                purger,
                consent_id,
                receipt_digest,
            }
        } else {
            audit::Event::PurgeReceiptReceived {
                message_id,
                purger,
                consent_id,
                receipt_digest,
            }
        };
        entry = audit::encode(&event, now);
        purge
            .verify(
                item.message_id,
                narrowing,
                &item.consent_ref,
                &node.org,
                &recipient,
                &member.signing_key,
            )
            .map_err(|e| AttemptError::Retry(format!("purge receipt does not verify: {e}")))?;
        Some(encoded)
    } else {
        None
    };
    Ok(Answer {
        receipt: bytes,
        purge_receipt,
        entry,
    })
}

async fn attempt(node: &Node, clients: &Clients, Noted { item, revocations }: Noted) {
    let id = item.message_id;
    let result = deliver_once(node, clients, &item, revocations).await;
    // A recipient's words are kept for the caseworker (`last_error`) and logged by their
    // code only: a refusal may quote what the consent says of the person (a country she
    // excluded, say), and a member on another version may word any answer so.
    let logged = match &result {
        Err(AttemptError::Refused { code, .. }) => {
            Some(format!("refused by the recipient ({code:?})"))
        }
        // The transport's own failures come this way too: say no more than the code,
        // and where the words are.
        Err(AttemptError::RetryAnswered { code, .. }) => Some(format!(
            "{code:?} (the words are kept as the envelope's last error)"
        )),
        _ => None,
    };
    let now = now_ms();
    let mut delivered = None;
    let stored = match result {
        Ok(answer) => {
            let receipt = answer.receipt.clone();
            let r = node
                .store
                .mark_delivered(id, answer.receipt, answer.purge_receipt, now, answer.entry)
                .await;
            if r.is_ok() {
                delivered = Some(Delivered {
                    attempts: item.attempts + 1,
                    receipt,
                });
                if item.kind == i64::from(MessageKind::ConsentNarrowing.as_i32())
                    && let Err(failure) = crate::workflows::narrowing_done(node, id).await
                {
                    // A later narrowing then asks again for what this one did.
                    tracing::warn!(envelope = %id, error = %failure.message, "could not record what a narrowing cut");
                }
                if asks_to_purge(&item) {
                    tracing::info!(envelope = %id, recipient = %item.recipient, consent = %item.consent_id, "request to purge delivered, purge receipt verified");
                } else {
                    tracing::info!(referral = %id, recipient = %item.recipient, attempts = item.attempts + 1, "delivered, receipt verified");
                }
            }
            r
        }
        Err(AttemptError::NotQueued) => {
            tracing::info!(referral = %id, recipient = %item.recipient, "not sent: no longer queued");
            Ok(())
        }
        // A request to purge is not given up on: the recipient still holds the data. A
        // refusal (a member on an older version that does not know narrowings, say) is
        // asked again, as slowly as the longest backoff allows, and shows as pending;
        // once a day in a new envelope, in case it was the envelope that was refused.
        Err(
            AttemptError::Permanent(reason)
            | AttemptError::Refused {
                message: reason, ..
            },
        ) if asks_to_purge(&item) => {
            let logged = logged.as_deref().unwrap_or(&reason);
            tracing::warn!(envelope = %id, recipient = %item.recipient, reason = %logged, "request to purge refused by recipient; will ask again");
            let renewed = sealed_long_ago(&item, now)
                && match crate::workflows::renew_withdrawal(node, id, Renewal::Refused).await {
                    Ok(renewed) => {
                        tracing::info!(envelope = %id, recipient = %item.recipient, renewed = ?renewed.map(|r| r.to_hex()), "refused request to purge sealed anew");
                        true
                    }
                    Err(failure) => {
                        tracing::error!(envelope = %id, recipient = %item.recipient, error = %failure.message, "renewing a refused request to purge failed, will retry");
                        false
                    }
                };
            if renewed {
                Ok(())
            } else {
                let item = DueItem {
                    attempts: item.attempts.max(RETRIES_BEFORE_SLOWEST),
                    ..item.clone()
                };
                retry_later(node, &item, (&format!("refused: {reason}"), logged), now).await
            }
        }
        Err(
            AttemptError::Permanent(reason)
            | AttemptError::Refused {
                message: reason, ..
            },
        ) => {
            let logged = logged.as_deref().unwrap_or(&reason);
            tracing::warn!(referral = %id, recipient = %item.recipient, reason = %logged, "delivery refused by recipient");
            // An earlier attempt's answer may have been lost after the recipient stored
            // it: the recipient counts as holding it (see the storage's `may_be_held!`).
            let reason = if item.attempts > 0 {
                format!(
                    "{reason}; an earlier attempt may have reached it, so withdrawing the consent asks it to purge this too"
                )
            } else {
                reason
            };
            node.store.mark_final(id, "refused", &reason).await
        }
        Err(
            AttemptError::Retry(reason)
            | AttemptError::RetryAnswered {
                message: reason, ..
            },
        ) if expiring(&item, now) => {
            let expired = format!("expired undelivered; last error: {reason}");
            let logged = logged.as_deref().unwrap_or(&reason);
            if !asks_to_purge(&item) {
                tracing::warn!(referral = %id, recipient = %item.recipient, reason = %logged, "envelope expired before delivery");
                node.store.mark_final(id, "expired", &expired).await
            } else {
                // A request to purge is made until the recipient purges: in a new envelope.
                match crate::workflows::renew_withdrawal(node, id, Renewal::Expired).await {
                    Ok(renewed) => {
                        tracing::warn!(envelope = %id, recipient = %item.recipient, renewed = ?renewed.map(|r| r.to_hex()), reason = %logged, "request to purge expired before delivery; renewed");
                        Ok(())
                    }
                    // Anything (a recipient that left the federation and may come back
                    // with a newer directory, a busy database, a full disk) may pass:
                    // try again. A request to purge never gives up on data still held.
                    Err(failure) => {
                        tracing::error!(envelope = %id, recipient = %item.recipient, error = %failure.message, "request to purge expired before delivery; renewing it failed, will retry");
                        retry_later(node, &item, (&failure.message, &failure.message), now).await
                    }
                }
            }
        }
        Err(
            AttemptError::Retry(reason)
            | AttemptError::RetryAnswered {
                message: reason, ..
            },
        ) => {
            let logged = logged.as_deref().unwrap_or(&reason);
            retry_later(node, &item, (&reason, logged), now).await
        }
    };
    node.waiters.attempt_ended(id, delivered);
    if let Err(error) = stored {
        // The item stays queued and is retried; the receipt, if any, is asked for again.
        tracing::error!(referral = %id, %error, "could not record delivery attempt");
    }
}

/// Schedules the next attempt of `item` after a failed one, with backoff: why, as stored
/// for the caseworker and as logged.
async fn retry_later(
    node: &Node,
    item: &DueItem,
    (reason, logged): (&str, &str),
    now: i64,
) -> crate::storage::Result<()> {
    let d = &node.config.delivery;
    let delay = backoff_ms(
        item.attempts,
        d.initial_backoff_ms,
        d.max_backoff_ms,
        random_u32(),
    );
    tracing::info!(referral = %item.message_id, recipient = %item.recipient, attempts = item.attempts + 1, retry_in_ms = delay, reason = %logged, "delivery failed, will retry");
    let next = now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX));
    node.store.mark_retry(item.message_id, reason, next).await
}

/// Envelopes with an attempt running, and those whose attempt ended lately.
#[derive(Default)]
struct Attempts {
    running: HashSet<MessageId>,
    /// The last [`ENDED_REMEMBERED`] ids whose attempt ended, oldest first.
    ended: VecDeque<MessageId>,
    ended_set: HashSet<MessageId>,
}

/// How many ended attempts the dispatcher remembers: more than can end while a hand-off
/// copy waits in its channel, which holds 1024, with as many attempts in flight as the
/// configuration allows (10 000). Allocated as attempts end, not up front.
const ENDED_REMEMBERED: usize = 16_384;

impl Attempts {
    /// Whether an attempt for `id` ended lately.
    fn ended_lately(&self, id: &MessageId) -> bool {
        self.ended_set.contains(id)
    }

    fn end(&mut self, id: MessageId) {
        self.running.remove(&id);
        if self.ended_set.insert(id) {
            self.ended.push_back(id);
        }
        while self.ended.len() > ENDED_REMEMBERED {
            if let Some(oldest) = self.ended.pop_front() {
                self.ended_set.remove(&oldest);
            }
        }
    }
}

/// Starts attempts, at most `max_in_flight` at once and never two for one envelope.
struct Dispatcher {
    node: Arc<Node>,
    clients: Arc<Clients>,
    attempts: Arc<Mutex<Attempts>>,
    slots: Arc<Semaphore>,
    finished: Arc<Notify>,
}

enum Launch {
    Started,
    /// An attempt for it is running already, or (for a hand-off copy) has run: the
    /// outbox found the item first, and the copy is stale.
    InFlight,
    /// Every slot is taken; the item stays queued in the outbox.
    Busy,
}

impl Dispatcher {
    /// Starts an attempt for `id`; with `item` it is delivered as given, otherwise it is
    /// read from the outbox (and skipped if no longer queued).
    fn launch(&self, id: MessageId, item: Option<Noted>) -> Launch {
        let fresh = self
            .attempts
            .lock()
            .map(|mut a| !(item.is_some() && a.ended_lately(&id)) && a.running.insert(id))
            .unwrap_or(false);
        if !fresh {
            return Launch::InFlight;
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            if let Ok(mut a) = self.attempts.lock() {
                a.running.remove(&id);
            }
            return Launch::Busy;
        };
        let (node, clients, attempts, finished) = (
            self.node.clone(),
            self.clients.clone(),
            self.attempts.clone(),
            self.finished.clone(),
        );
        tokio::spawn(async move {
            let item = match item {
                Some(noted) => Ok(Some(noted)),
                None => {
                    let revocations = node.revocations.current();
                    node.store
                        .due_item(id)
                        .await
                        .map(|item| item.map(|item| Noted { item, revocations }))
                }
            };
            match item {
                Ok(Some(item)) => attempt(&node, &clients, item).await,
                Ok(None) => {}
                Err(error) => tracing::error!(%error, "cannot read an outbox item"),
            }
            if let Ok(mut a) = attempts.lock() {
                a.end(id);
            }
            drop(permit);
            finished.notify_one();
        });
        Launch::Started
    }
}

/// Runs the delivery loop until `shutdown` turns true.
///
/// Fresh items arrive through the hand-off and start at once. The loop looks in the
/// outbox when something was queued without the hand-off, when a retry falls due, or
/// when an attempt finishes while an item had to wait for a slot; it reads only ids, and
/// loads an envelope once, when its attempt starts.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let Some(mut handoff) = node.handoff.take_receiver() else {
        tracing::error!("the delivery loop is already running");
        return;
    };
    let max = node.config.delivery.max_in_flight;
    let dispatcher = Dispatcher {
        node: node.clone(),
        clients: Arc::new(Clients::default()),
        attempts: Default::default(),
        slots: Arc::new(Semaphore::new(max)),
        finished: Arc::new(Notify::new()),
    };
    loop {
        if *shutdown.borrow() {
            return;
        }
        let mut saturated = false;
        // Whether everything due is in flight already (its row stays queued until then).
        let mut all_in_flight = false;
        match node.store.due_ids(now_ms(), (max * 4) as i64).await {
            Ok(ids) => {
                all_in_flight = !ids.is_empty();
                for id in ids {
                    match dispatcher.launch(id, None) {
                        Launch::Busy => {
                            saturated = true;
                            break;
                        }
                        Launch::Started => all_in_flight = false,
                        Launch::InFlight => {}
                    }
                }
            }
            Err(error) => tracing::error!(%error, "cannot read the outbox"),
        }
        let wait_ms = match node.store.next_due_at().await {
            Ok(Some(at)) if all_in_flight => (at - now_ms()).clamp(IN_FLIGHT_RESCAN_MS, 1000),
            Ok(Some(at)) => (at - now_ms()).clamp(20, 1000),
            _ => 1000,
        };
        let sleep = tokio::time::sleep(Duration::from_millis(wait_ms.unsigned_abs()));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                Some(noted) = handoff.recv() => {
                    if let Launch::Busy = dispatcher.launch(noted.item.message_id, Some(noted)) {
                        saturated = true;
                    }
                }
                _ = node.outbox_ready.notified() => break,
                _ = dispatcher.finished.notified() => if saturated { break },
                _ = &mut sleep => break,
                _ = shutdown.changed() => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Attempts, Delivered, ENDED_REMEMBERED, Waiters, backoff_ms, expiring};
    use crate::storage::DueItem;
    use corridor::{MessageId, MessageKind};

    #[test]
    fn waiters_wake_for_their_own_envelope_and_leave_nothing_behind() {
        let waiters = Waiters::default();
        let (mine, other) = (MessageId([1; 16]), MessageId([2; 16]));
        let mut woken = waiters.wait(mine);
        let mut not_woken = waiters.wait(other);
        let delivered = Delivered {
            attempts: 1,
            receipt: vec![7],
        };
        waiters.attempt_ended(mine, Some(delivered.clone()));
        assert_eq!(woken.try_recv().ok(), Some(Some(delivered)));
        assert!(not_woken.try_recv().is_err());
        // A waiter that gave up is forgotten; one still waiting is kept.
        let gave_up = waiters.wait(other);
        drop(gave_up);
        waiters.forget(other);
        assert_eq!(waiters.0.lock().unwrap().get(&other).map(Vec::len), Some(1));
        drop(not_woken);
        waiters.forget(other);
        assert!(waiters.0.lock().unwrap().is_empty());
    }

    /// A hand-off copy of an envelope whose attempt ended is recognised as stale; the
    /// memory of ended attempts is bounded.
    #[test]
    fn ended_attempts_are_remembered_within_a_bound() {
        let mut attempts = Attempts::default();
        let id = |n: u32| {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            MessageId(bytes)
        };
        assert!(attempts.running.insert(id(0)));
        attempts.end(id(0));
        assert!(attempts.running.is_empty());
        assert!(attempts.ended_lately(&id(0)));
        for n in 1..=ENDED_REMEMBERED as u32 {
            attempts.end(id(n));
        }
        assert!(!attempts.ended_lately(&id(0)), "the oldest is forgotten");
        assert!(attempts.ended_lately(&id(ENDED_REMEMBERED as u32)));
        assert_eq!(attempts.ended.len(), ENDED_REMEMBERED);
        assert_eq!(attempts.ended_set.len(), ENDED_REMEMBERED);
    }

    /// A withdrawal that reached its recipient expired would be refused for good, so it
    /// is renewed a minute before its envelope expires; a referral lives to the end.
    #[test]
    fn a_withdrawal_is_renewed_before_its_envelope_expires() {
        let item = |kind: MessageKind| DueItem {
            message_id: MessageId([1; 16]),
            kind: kind.as_i32().into(),
            recipient: "shelter-kh".into(),
            consent_id: "consent-1".into(),
            consent_ref: "consent-1".into(),
            envelope: Vec::new(),
            envelope_digest: Vec::new(),
            attempts: 0,
            expires_at_ms: 100_000,
        };
        let (withdrawal, referral) = (
            item(MessageKind::ConsentWithdrawal),
            item(MessageKind::Referral),
        );
        assert!(!expiring(&withdrawal, 39_999));
        assert!(expiring(&withdrawal, 40_000));
        assert!(!expiring(&referral, 99_999));
        assert!(expiring(&referral, 100_000));
    }

    #[test]
    fn backoff_grows_exponentially_within_jittered_bounds_and_is_capped() {
        for attempts in 0..40 {
            let cap = (500u64 << attempts.min(30)).min(60_000);
            for random in [0, 1, 12345, u32::MAX] {
                let d = backoff_ms(attempts, 500, 60_000, random);
                assert!(
                    d >= cap / 2 && d <= cap,
                    "attempt {attempts}: {d} outside {cap}"
                );
            }
        }
        assert_eq!(backoff_ms(-5, 500, 60_000, 0), 250);
        assert!(backoff_ms(i64::MAX, u64::MAX, u64::MAX, 7) > 0);
    }
}
