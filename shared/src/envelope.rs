//! Envelopes: a clear routing header plus a payload sealed to the recipient and signed by
//! the sender.
//!
//! * The header's canonical bytes (behind [`label::HEADER_AAD`]) are the HPKE associated
//!   data, so a ciphertext cannot be moved under another header.
//! * The sender signs [`label::ENVELOPE`] ‖ header fields ‖ SHA-256(encapsulated key ‖
//!   ciphertext). Every header field and every ciphertext byte is covered.
//! * The envelope digest — SHA-256 of those signed bytes — identifies an envelope in
//!   receipts and replay checks.
//!
//! [`Envelope::verify`] applies every acceptance rule a recipient has before it may store
//! anything; [`VerifiedEnvelope::open`] then removes the seal.

use std::fmt;

use crate::canonical::{Canonical, label, sha256};
use crate::org::OrgId;
use crate::seal::{SealError, SealingKey, SealingPublicKey};
use crate::sign::{KeyError, SigningKey, VerifyingKey};

/// The envelope format version this crate produces and accepts.
pub const ENVELOPE_VERSION: u32 = 1;

/// Longest lifetime (expiry minus creation) an envelope may claim: 30 days.
pub const MAX_LIFETIME_MS: i64 = 30 * 24 * 3600 * 1000;

/// How far in the future a peer's clock may be before its envelope is refused: 5 minutes.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// The time a sender stamps an envelope with at `now_ms` (its `created_at_ms`) when the
/// envelope must not be dated before `not_before_ms`: a referral after its consent's last
/// narrowing, a narrowing's own envelope at the narrowing's time. Recipients refuse a
/// referral stamped at or before a narrowing they carried out, and date a narrowing no
/// later than its envelope's stamp, so a clock stepped back since the narrowing would
/// otherwise let a referral the narrowing cancelled on its way be stored whole. The time
/// asked for if the clock is behind it by at most half the skew recipients allow, the
/// clock's own otherwise (an envelope from further in the future would be refused).
/// Beyond that, recipients also refuse on arrival every referral a narrowing named that
/// they did not hold yet, whatever its stamp.
pub fn stamp(now_ms: i64, not_before_ms: Option<i64>) -> i64 {
    match not_before_ms {
        Some(at) if at > now_ms && at - now_ms <= MAX_CLOCK_SKEW_MS / 2 => at,
        _ => now_ms,
    }
}

/// Longest route (number of relays) an envelope may carry.
pub const MAX_ROUTE_LEN: usize = 8;

/// Most envelopes one batch (`DeliverBatch`) may carry; the recipient's limit on a
/// message's size bounds the batch's bytes as well.
pub const MAX_BATCH_ENVELOPES: usize = 256;

/// A 16-byte message id chosen by the sender: its creation time, then random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| EnvelopeError::BadMessageId)
    }

    /// Parses the 32-character lowercase hex form.
    pub fn from_hex(text: &str) -> Result<Self, EnvelopeError> {
        let bytes = hex::decode(text).map_err(|_| EnvelopeError::BadMessageId)?;
        Self::from_bytes(&bytes)
    }

    /// A fresh id for a message created at `now_ms`: the time in milliseconds (48 bits,
    /// big-endian), then 80 random bits.
    ///
    /// Ids made one after another therefore sort together, so the B-tree indexes keyed by
    /// message id (outbox, receipts, seen messages, inbox) take each new row on the page
    /// that took the last one, rather than dirtying a random page per row and writing it
    /// to the WAL at every commit. The time says nothing the envelope header does not
    /// already say (`created_at_ms`), and 80 random bits keep ids unguessable and
    /// distinct.
    pub fn new(now_ms: i64) -> Result<Self, EnvelopeError> {
        use ring::rand::SecureRandom as _;
        let mut id = [0u8; 16];
        let millis = u64::try_from(now_ms).unwrap_or(0).to_be_bytes();
        id[..6].copy_from_slice(&millis[2..]);
        ring::rand::SystemRandom::new()
            .fill(&mut id[6..])
            .map_err(|_| EnvelopeError::Randomness)?;
        Ok(Self(id))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The smallest id a message created at `at_ms` can have: ids sort by creation time,
    /// so every id below it was made earlier.
    pub fn first_at(at_ms: i64) -> Self {
        let mut id = [0u8; 16];
        let millis = u64::try_from(at_ms).unwrap_or(0).to_be_bytes();
        id[..6].copy_from_slice(&millis[2..]);
        Self(id)
    }

    /// The creation time an id made by [`MessageId::new`] begins with, in milliseconds.
    pub fn created_at_ms(&self) -> i64 {
        let mut millis = [0u8; 8];
        millis[2..].copy_from_slice(&self.0[..6]);
        i64::from_be_bytes(millis)
    }

    /// Below this id, at `now_ms`, no envelope a sender made with [`MessageId::new`] can
    /// still be accepted: its id dates from its creation (the sender's clock, as its
    /// expiry does), and it expired at most [`MAX_LIFETIME_MS`] later, allowing for
    /// [`MAX_CLOCK_SKEW_MS`] between the clocks.
    pub fn oldest_deliverable(now_ms: i64) -> Self {
        Self::first_at(
            now_ms
                .saturating_sub(MAX_LIFETIME_MS)
                .saturating_sub(MAX_CLOCK_SKEW_MS),
        )
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.to_hex())
    }
}

/// What an envelope carries. The numbering matches `corridor.v1.MessageKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Referral = 1,
    ConsentWithdrawal = 2,
    /// What a recipient may keep of what it got under a consent since narrowed.
    ConsentNarrowing = 3,
}

impl MessageKind {
    pub fn from_i32(value: i32) -> Result<Self, EnvelopeError> {
        match value {
            1 => Ok(Self::Referral),
            2 => Ok(Self::ConsentWithdrawal),
            3 => Ok(Self::ConsentNarrowing),
            other => Err(EnvelopeError::UnknownKind(other)),
        }
    }

    pub fn as_i32(self) -> i32 {
        self as i32
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Referral => "referral",
            Self::ConsentWithdrawal => "consent-withdrawal",
            Self::ConsentNarrowing => "consent-narrowing",
        }
    }
}

/// The clear, authenticated routing header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeHeader {
    pub version: u32,
    pub message_id: MessageId,
    pub kind: MessageKind,
    pub sender: OrgId,
    pub recipient: OrgId,
    /// Relays, in order; empty for direct delivery.
    pub route: Vec<OrgId>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

impl EnvelopeHeader {
    fn encode_fields(&self, out: Canonical) -> Canonical {
        out.u64(u64::from(self.version))
            .bytes(&self.message_id.0)
            .u64(self.kind.as_i32() as u64)
            .str(self.sender.as_str())
            .str(self.recipient.as_str())
            .strs(&self.route.iter().map(OrgId::as_str).collect::<Vec<_>>())
            .i64(self.created_at_ms)
            .i64(self.expires_at_ms)
    }

    /// The header as HPKE associated data.
    pub fn aad(&self) -> Vec<u8> {
        self.encode_fields(Canonical::new(label::HEADER_AAD))
            .finish()
    }
}

/// A sealed, signed envelope as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub header: EnvelopeHeader,
    pub encapsulated_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Why an envelope was refused or could not be built. Messages name the rule that failed
/// and never include payload content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u32),
    #[error("message id must be 16 bytes")]
    BadMessageId,
    #[error("unknown message kind {0}")]
    UnknownKind(i32),
    #[error("envelope header is missing")]
    MissingHeader,
    #[error("invalid org id in {field}: {source}")]
    BadOrgId {
        field: &'static str,
        source: crate::org::OrgIdError,
    },
    #[error(
        "envelope claims sender {claimed} but the connection is authenticated as {authenticated}"
    )]
    SenderMismatch {
        claimed: OrgId,
        authenticated: OrgId,
    },
    #[error("envelope is addressed to {recipient}, not to this node ({local})")]
    WrongRecipient { recipient: OrgId, local: OrgId },
    #[error("relayed envelopes are not accepted (route has {0} hops)")]
    RelayNotSupported(usize),
    #[error("envelope expired at {expires_at_ms} (now {now_ms})")]
    Expired { expires_at_ms: i64, now_ms: i64 },
    #[error(
        "envelope was created in the future ({created_at_ms}, now {now_ms}): the sender's clock or this node's is wrong"
    )]
    FromTheFuture { created_at_ms: i64, now_ms: i64 },
    #[error("envelope lifetime is invalid (expires before creation or after more than 30 days)")]
    BadLifetime,
    #[error("envelope signature does not verify with the sender's key")]
    BadSignature,
    #[error("signature must be 64 bytes")]
    MalformedSignature,
    #[error("sealed payload does not open: {0}")]
    Seal(#[from] SealError),
    #[error("system randomness unavailable")]
    Randomness,
}

impl EnvelopeError {
    /// A fixed code naming the rule, for audit logs.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::UnsupportedVersion(_) => "unsupported-version",
            Self::BadMessageId => "bad-message-id",
            Self::UnknownKind(_) => "unknown-kind",
            Self::MissingHeader => "missing-header",
            Self::BadOrgId { .. } => "bad-org-id",
            Self::SenderMismatch { .. } => "sender-mismatch",
            Self::WrongRecipient { .. } => "wrong-recipient",
            Self::RelayNotSupported(_) => "relay-not-supported",
            Self::Expired { .. } => "expired",
            Self::FromTheFuture { .. } => "from-the-future",
            Self::BadLifetime => "bad-lifetime",
            Self::BadSignature => "bad-signature",
            Self::MalformedSignature => "malformed-signature",
            Self::Seal(_) => "does-not-open",
            Self::Randomness => "randomness",
        }
    }
}

impl Envelope {
    /// Seals `payload` to `recipient_key` under `header` and signs the result.
    pub fn seal(
        header: EnvelopeHeader,
        payload: &[u8],
        recipient_key: &SealingPublicKey,
        signer: &SigningKey,
    ) -> Result<Self, EnvelopeError> {
        let (encapsulated_key, ciphertext) = recipient_key.seal(payload, &header.aad())?;
        let mut envelope = Self {
            header,
            encapsulated_key,
            ciphertext,
            signature: Vec::new(),
        };
        envelope.signature = signer.sign(&envelope.signed_bytes()).to_vec();
        Ok(envelope)
    }

    /// The bytes the sender's signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let sealed_digest = sha256(
            &Canonical::new(b"")
                .bytes(&self.encapsulated_key)
                .bytes(&self.ciphertext)
                .finish(),
        );
        self.header
            .encode_fields(Canonical::new(label::ENVELOPE))
            .bytes(&sealed_digest)
            .finish()
    }

    /// SHA-256 of the signed bytes: the envelope's identity in receipts.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.signed_bytes())
    }

    /// Applies every acceptance rule of a recipient node:
    /// version, claimed sender equals the authenticated peer, addressed to this node,
    /// direct delivery, sane lifetime, not expired, not from the future, valid signature.
    pub fn verify(
        self,
        local: &OrgId,
        authenticated_peer: &OrgId,
        sender_key: &VerifyingKey,
        now_ms: i64,
    ) -> Result<VerifiedEnvelope, EnvelopeError> {
        self.verify_or_return(local, authenticated_peer, sender_key, now_ms)
            .map_err(|(error, _)| error)
    }

    /// As [`Envelope::verify`], but a refused envelope comes back with the error, for a
    /// caller that still needs it (to recognise a replay of one it accepted before).
    pub fn verify_or_return(
        self,
        local: &OrgId,
        authenticated_peer: &OrgId,
        sender_key: &VerifyingKey,
        now_ms: i64,
    ) -> Result<VerifiedEnvelope, (EnvelopeError, Box<Envelope>)> {
        match self.check(local, authenticated_peer, sender_key, now_ms) {
            Ok(digest) => Ok(VerifiedEnvelope {
                digest,
                envelope: self,
            }),
            Err(error) => Err((error, Box::new(self))),
        }
    }

    /// Every acceptance rule; the digest if the envelope passes them.
    fn check(
        &self,
        local: &OrgId,
        authenticated_peer: &OrgId,
        sender_key: &VerifyingKey,
        now_ms: i64,
    ) -> Result<[u8; 32], EnvelopeError> {
        let h = &self.header;
        if h.version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(h.version));
        }
        if &h.sender != authenticated_peer {
            return Err(EnvelopeError::SenderMismatch {
                claimed: h.sender.clone(),
                authenticated: authenticated_peer.clone(),
            });
        }
        if &h.recipient != local {
            return Err(EnvelopeError::WrongRecipient {
                recipient: h.recipient.clone(),
                local: local.clone(),
            });
        }
        if !h.route.is_empty() {
            return Err(EnvelopeError::RelayNotSupported(h.route.len()));
        }
        let lifetime = h.expires_at_ms.saturating_sub(h.created_at_ms);
        if lifetime <= 0 || lifetime > MAX_LIFETIME_MS {
            return Err(EnvelopeError::BadLifetime);
        }
        if h.expires_at_ms <= now_ms {
            return Err(EnvelopeError::Expired {
                expires_at_ms: h.expires_at_ms,
                now_ms,
            });
        }
        if self.signature.len() != crate::sign::SIGNATURE_LEN {
            return Err(EnvelopeError::MalformedSignature);
        }
        let signed = self.signed_bytes();
        sender_key
            .verify(&signed, &self.signature)
            .map_err(|_: KeyError| EnvelopeError::BadSignature)?;
        // After the signature: an envelope from the future is the sender's own, refused
        // for now only (a recipient takes it once its clock catches up, and need not
        // count it against the sender), not one anybody could make up.
        if h.created_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(EnvelopeError::FromTheFuture {
                created_at_ms: h.created_at_ms,
                now_ms,
            });
        }
        Ok(sha256(&signed))
    }
}

/// An envelope that passed [`Envelope::verify`]; only these can be opened.
#[derive(Debug, Clone)]
pub struct VerifiedEnvelope {
    envelope: Envelope,
    digest: [u8; 32],
}

/// The plaintext of a verified envelope.
pub struct OpenedEnvelope {
    pub header: EnvelopeHeader,
    pub digest: [u8; 32],
    pub payload: Vec<u8>,
}

impl VerifiedEnvelope {
    pub fn header(&self) -> &EnvelopeHeader {
        &self.envelope.header
    }

    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Opens the sealed payload with the recipient's key.
    pub fn open(self, key: &SealingKey) -> Result<OpenedEnvelope, EnvelopeError> {
        self.open_with_any([key])
    }

    /// Opens the payload with the first of `keys` it was sealed to: the current sealing
    /// key, then keys a recipient rotated out, for what was sealed before the rotation.
    /// If none opens it, the error is the first key's.
    pub fn open_with_any<'k>(
        self,
        keys: impl IntoIterator<Item = &'k SealingKey>,
    ) -> Result<OpenedEnvelope, EnvelopeError> {
        let e = self.envelope;
        let aad = e.header.aad();
        let mut first_error = None;
        for key in keys {
            match key.open(&e.encapsulated_key, &e.ciphertext, &aad) {
                Ok(payload) => {
                    return Ok(OpenedEnvelope {
                        header: e.header,
                        digest: self.digest,
                        payload,
                    });
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        Err(first_error.unwrap_or(SealError::OpenFailed).into())
    }
}

#[cfg(test)]
mod tests {
    type Tamper<T> = Box<dyn Fn(&mut T)>;
    use super::*;

    pub(crate) struct Fixture {
        pub sender_key: SigningKey,
        pub recipient_seal: SealingKey,
        pub header: EnvelopeHeader,
    }

    pub(crate) fn fixture() -> Fixture {
        Fixture {
            sender_key: SigningKey::from_seed(&[1u8; 32]).unwrap(),
            recipient_seal: SealingKey::derive(&[2u8; 32]),
            header: EnvelopeHeader {
                version: ENVELOPE_VERSION,
                message_id: MessageId([3u8; 16]),
                kind: MessageKind::Referral,
                sender: OrgId::new("shelter-my").unwrap(),
                recipient: OrgId::new("shelter-kh").unwrap(),
                route: vec![],
                created_at_ms: 1_000_000,
                expires_at_ms: 2_000_000,
            },
        }
    }

    fn sealed(f: &Fixture) -> Envelope {
        Envelope::seal(
            f.header.clone(),
            b"referral payload",
            f.recipient_seal.public_key(),
            &f.sender_key,
        )
        .unwrap()
    }

    fn check(f: &Fixture, e: Envelope) -> Result<VerifiedEnvelope, EnvelopeError> {
        e.verify(
            &f.header.recipient,
            &f.header.sender,
            &f.sender_key.verifying_key(),
            1_500_000,
        )
    }

    #[test]
    fn an_envelope_is_stamped_no_earlier_than_it_must_be_within_the_skew_allowed() {
        assert_eq!(stamp(1_000, None), 1_000);
        assert_eq!(stamp(1_000, Some(500)), 1_000);
        assert_eq!(stamp(1_000, Some(1_500)), 1_500, "clock stepped back");
        let far = 1_000 + MAX_CLOCK_SKEW_MS / 2 + 1;
        assert_eq!(
            stamp(1_000, Some(far)),
            1_000,
            "it would be refused as from the future"
        );
    }

    #[test]
    fn an_envelope_opens_with_a_key_rotated_out_and_with_no_other() {
        let f = fixture();
        let rotated_in = SealingKey::derive(&[9u8; 32]);
        let opened = check(&f, sealed(&f))
            .unwrap()
            .open_with_any([&rotated_in, &f.recipient_seal])
            .expect("opens with the previous key");
        assert_eq!(opened.payload, b"referral payload");
        let refused = check(&f, sealed(&f)).unwrap().open_with_any([&rotated_in]);
        assert_eq!(
            refused.err(),
            Some(EnvelopeError::Seal(SealError::OpenFailed))
        );
    }

    #[test]
    fn round_trip() {
        let f = fixture();
        let e = sealed(&f);
        let digest = e.digest();
        let opened = check(&f, e).unwrap().open(&f.recipient_seal).unwrap();
        assert_eq!(opened.payload, b"referral payload");
        assert_eq!(opened.digest, digest);
        assert_eq!(opened.header, f.header);
    }

    /// Re-signing after a header change proves the refusal comes from the rule itself.
    fn resign(f: &Fixture, mut e: Envelope) -> Envelope {
        e.signature = f.sender_key.sign(&e.signed_bytes()).to_vec();
        e
    }

    #[test]
    fn every_header_field_is_covered_by_the_signature() {
        let f = fixture();
        let other = OrgId::new("someone-else").unwrap();
        let tampers: Vec<(&str, Tamper<EnvelopeHeader>)> = vec![
            ("version", Box::new(|h| h.version = 2)),
            ("message_id", Box::new(|h| h.message_id.0[0] ^= 1)),
            (
                "sender",
                Box::new({
                    let o = other.clone();
                    move |h| h.sender = o.clone()
                }),
            ),
            (
                "recipient",
                Box::new({
                    let o = other.clone();
                    move |h| h.recipient = o.clone()
                }),
            ),
            (
                "route",
                Box::new({
                    let o = other.clone();
                    move |h| h.route.push(o.clone())
                }),
            ),
            ("created_at_ms", Box::new(|h| h.created_at_ms += 1)),
            ("expires_at_ms", Box::new(|h| h.expires_at_ms += 1)),
        ];
        for (field, tamper) in tampers {
            let mut e = sealed(&f);
            tamper(&mut e.header);
            // Verify against the original authenticated peer and key: whatever the rule
            // that catches it, a tampered header must never verify.
            let result = e.clone().verify(
                &f.header.recipient,
                &f.header.sender,
                &f.sender_key.verifying_key(),
                1_500_000,
            );
            assert!(result.is_err(), "tampered {field} verified");
            // And when only the signature could catch it, it is the signature that does.
            if matches!(field, "message_id" | "created_at_ms" | "expires_at_ms") {
                assert_eq!(result.unwrap_err(), EnvelopeError::BadSignature, "{field}");
            }
            // Even a sender who re-signs a tampered header cannot move the sealed payload
            // under it: the header is the HPKE associated data.
            if matches!(field, "message_id" | "created_at_ms" | "expires_at_ms") {
                let e = resign(&f, e);
                let verified = check(&f, e).unwrap();
                assert!(matches!(
                    verified.open(&f.recipient_seal),
                    Err(EnvelopeError::Seal(SealError::OpenFailed))
                ));
            }
        }
    }

    #[test]
    fn tampered_ciphertext_key_or_signature_is_refused() {
        let f = fixture();
        let mut e = sealed(&f);
        e.ciphertext[0] ^= 1;
        assert_eq!(check(&f, e).unwrap_err(), EnvelopeError::BadSignature);
        let mut e = sealed(&f);
        e.encapsulated_key[0] ^= 1;
        assert_eq!(check(&f, e).unwrap_err(), EnvelopeError::BadSignature);
        let mut e = sealed(&f);
        e.signature[10] ^= 1;
        assert_eq!(check(&f, e).unwrap_err(), EnvelopeError::BadSignature);
        let mut e = sealed(&f);
        e.signature.pop();
        assert_eq!(check(&f, e).unwrap_err(), EnvelopeError::MalformedSignature);
    }

    #[test]
    fn acceptance_rules() {
        let f = fixture();
        let other = OrgId::new("someone-else").unwrap();
        let key = f.sender_key.verifying_key();
        // Sender differs from the authenticated peer.
        assert!(matches!(
            sealed(&f).verify(&f.header.recipient, &other, &key, 1_500_000),
            Err(EnvelopeError::SenderMismatch { .. })
        ));
        // Addressed to someone else.
        assert!(matches!(
            sealed(&f).verify(&other, &f.header.sender, &key, 1_500_000),
            Err(EnvelopeError::WrongRecipient { .. })
        ));
        // Expired, exactly at and after expiry.
        for now in [2_000_000, 2_000_001] {
            assert!(matches!(
                sealed(&f).verify(&f.header.recipient, &f.header.sender, &key, now),
                Err(EnvelopeError::Expired { .. })
            ));
        }
        // From the future beyond the allowed skew.
        let now = 1_000_000 - MAX_CLOCK_SKEW_MS - 1;
        assert!(matches!(
            sealed(&f).verify(&f.header.recipient, &f.header.sender, &key, now),
            Err(EnvelopeError::FromTheFuture { .. })
        ));
        // Wrong key, also from the future: only its sender's own envelope is "from the
        // future" (which recipients do not count against it).
        let stranger = SigningKey::from_seed(&[9u8; 32]).unwrap().verifying_key();
        for now in [1_500_000, 1_000_000 - MAX_CLOCK_SKEW_MS - 1] {
            assert_eq!(
                sealed(&f)
                    .verify(&f.header.recipient, &f.header.sender, &stranger, now)
                    .unwrap_err(),
                EnvelopeError::BadSignature
            );
        }
        // Absurd lifetimes.
        for (created, expires) in [(2_000_000, 1_000_000), (0, MAX_LIFETIME_MS + 1)] {
            let mut h = f.header.clone();
            h.created_at_ms = created;
            h.expires_at_ms = expires;
            let e = Envelope::seal(h, b"x", f.recipient_seal.public_key(), &f.sender_key).unwrap();
            assert_eq!(check(&f, e).unwrap_err(), EnvelopeError::BadLifetime);
        }
    }

    #[test]
    fn wrong_recipient_key_cannot_open() {
        let f = fixture();
        let verified = check(&f, sealed(&f)).unwrap();
        let stranger = SealingKey::derive(&[8u8; 32]);
        assert!(verified.open(&stranger).is_err());
    }

    #[test]
    fn message_id_parsing() {
        let id = MessageId([0xab; 16]);
        assert_eq!(MessageId::from_hex(&id.to_hex()), Ok(id));
        assert_eq!(
            MessageId::from_hex("abcd"),
            Err(EnvelopeError::BadMessageId)
        );
        assert_eq!(MessageId::from_hex("zz"), Err(EnvelopeError::BadMessageId));
    }

    #[test]
    fn message_ids_are_distinct_and_sort_by_creation_time() {
        let ms = 1_764_000_000_000;
        let (a, b) = (MessageId::new(ms).unwrap(), MessageId::new(ms).unwrap());
        assert_ne!(
            a, b,
            "80 random bits tell ids of the same millisecond apart"
        );
        assert_eq!(a.0[..6], b.0[..6]);
        assert_eq!(a.0[..6], ms.to_be_bytes()[2..]);
        for later in [ms + 1, ms + 1_000, ms + 86_400_000] {
            let c = MessageId::new(later).unwrap();
            assert!(a < c && b < c, "an id made later sorts after");
        }
        assert!(MessageId::first_at(ms) <= a && MessageId::first_at(ms + 1) > a);
        assert_eq!(a.created_at_ms(), ms);
        // An id made as late as an envelope still deliverable now may be is not below
        // the bound; one a millisecond earlier is.
        let now = ms + MAX_LIFETIME_MS + MAX_CLOCK_SKEW_MS;
        assert!(a >= MessageId::oldest_deliverable(now));
        assert!(a < MessageId::oldest_deliverable(now + 1));
    }
}
