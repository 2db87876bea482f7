//! Audit-log entries: what a node records about everything that matters, and their
//! deterministic, versioned encoding (documented in `docs/audit-log.md`).
//!
//! Entries carry only ids, digests, keyed case pseudonyms, org ids, numeric local user ids,
//! event types, rule codes and times — never personal data. That is enforced by
//! construction: the only way to build an [`Entry`] is through the typed constructors of
//! [`Event`], none of which accepts free text from a caseworker or a peer.

use std::fmt;

use crate::canonical::Canonical;
use crate::envelope::MessageId;
use crate::org::OrgId;

/// Encoding version of entries produced by this crate.
pub const ENTRY_VERSION: u64 = 1;
const ENTRY_LABEL: &[u8] = b"corridor/v1/audit-entry\0";

/// Largest encoded entry accepted when decoding, in bytes.
pub const MAX_ENTRY_LEN: usize = 4096;

/// The origin line of `org`'s log checkpoints: a schema-less URL naming the federation
/// and the org.
/// Whether `name` can name a federation: it goes into every log's origin and every
/// witness's key name, C2SP note lines that a space or a `+` would break. 1 to 64
/// letters, digits, `.`, `_` or `-`.
pub fn is_federation_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn origin(federation: &str, org: &OrgId) -> String {
    format!("corridor.network/{federation}/log/{org}")
}

/// The key name under which `org` cosigns other logs' checkpoints as a witness.
pub fn witness_name(federation: &str, org: &OrgId) -> String {
    format!("corridor.network/{federation}/witness/{org}")
}

/// What happened. Each variant lists its attributes in encoding order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A referral passed the gate and was queued for delivery.
    ReferralSent {
        message_id: MessageId,
        recipient: OrgId,
        purpose: String,
        case: String,
        consent_id: String,
        user: i64,
    },
    /// The recipient's receipt verified; it names the recipient's log entry.
    ReferralDelivered {
        message_id: MessageId,
        recipient: OrgId,
        envelope_digest: [u8; 32],
        recipient_log_index: u64,
        recipient_leaf_hash: [u8; 32],
    },
    /// A referral from a peer passed every check and was stored.
    ReferralReceived {
        message_id: MessageId,
        sender: OrgId,
        envelope_digest: [u8; 32],
        case: String,
        purpose: String,
    },
    /// An envelope from a peer was refused; `rule` is a fixed rule code.
    EnvelopeRefused {
        message_id: Option<MessageId>,
        sender: OrgId,
        rule: String,
    },
    ConsentRecorded {
        consent_id: String,
        case: String,
        user: i64,
    },
    ConsentNarrowed {
        consent_id: String,
        case: String,
        user: i64,
    },
    /// Withdrawal sent to `recipients` organisations.
    ConsentWithdrawn {
        consent_id: String,
        case: String,
        user: i64,
        recipients: u64,
    },
    /// This node purged what it held under a peer's withdrawn consent.
    PurgeDone {
        message_id: MessageId,
        sender: OrgId,
        consent_id: String,
        case: String,
        purged: u64,
    },
    /// This node applied a peer's narrowing of a consent: it purged the referrals the
    /// narrowed consent no longer covers and removed from others the fields it no
    /// longer covers.
    NarrowingApplied {
        message_id: MessageId,
        sender: OrgId,
        consent_id: String,
        case: String,
        purged: u64,
        redacted: u64,
    },
    /// A peer's purge receipt verified.
    PurgeReceiptReceived {
        message_id: MessageId,
        purger: OrgId,
        consent_id: String,
        receipt_digest: [u8; 32],
    },
    /// A peer's receipt for a narrowing verified: what it purged and what it cut.
    NarrowingReceiptReceived {
        message_id: MessageId,
        purger: OrgId,
        consent_id: String,
        receipt_digest: [u8; 32],
    },
    /// A local user read personal data of a received case: the referral `sender` sent
    /// under `message_id` (ids are their senders').
    PersonalDataRead {
        message_id: MessageId,
        sender: OrgId,
        case: String,
        user: i64,
    },
    /// A local user read a consent's sealed details (who gave it on whose behalf, in what
    /// language).
    ConsentDetailsRead {
        consent_id: String,
        case: String,
        user: i64,
    },
    /// Received referrals past retention were deleted and their keys shredded.
    RetentionPurge {
        deleted: u64,
    },
    /// A token was issued for a local user, who holds `role`.
    TokenIssued {
        user: i64,
        role: crate::LocalRole,
    },
    TokenRevoked {
        user: i64,
    },
    /// A local user's role was changed to `role`.
    RoleChanged {
        user: i64,
        role: crate::LocalRole,
    },
    /// The node started with this configuration and these keys (fingerprints only).
    NodeStarted {
        config_sha256: [u8; 32],
        signing_key: String,
        sealing_key: String,
        cert_sha256: [u8; 32],
    },
}

impl Event {
    /// The event type as written in the log.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ReferralSent { .. } => "referral-sent",
            Self::ReferralDelivered { .. } => "referral-delivered",
            Self::ReferralReceived { .. } => "referral-received",
            Self::EnvelopeRefused { .. } => "envelope-refused",
            Self::ConsentRecorded { .. } => "consent-recorded",
            Self::ConsentNarrowed { .. } => "consent-narrowed",
            Self::ConsentWithdrawn { .. } => "consent-withdrawn",
            Self::PurgeDone { .. } => "purge-done",
            Self::NarrowingApplied { .. } => "narrowing-applied",
            Self::PurgeReceiptReceived { .. } => "purge-receipt-received",
            Self::NarrowingReceiptReceived { .. } => "narrowing-receipt-received",
            Self::PersonalDataRead { .. } => "personal-data-read",
            Self::ConsentDetailsRead { .. } => "consent-details-read",
            Self::RetentionPurge { .. } => "retention-purge",
            Self::TokenIssued { .. } => "token-issued",
            Self::TokenRevoked { .. } => "token-revoked",
            Self::RoleChanged { .. } => "role-changed",
            Self::NodeStarted { .. } => "node-started",
        }
    }

    /// The attributes, in encoding order.
    pub fn attributes(&self) -> Vec<(&'static str, String)> {
        let h = hex::encode;
        match self {
            Self::ReferralSent {
                message_id,
                recipient,
                purpose,
                case,
                consent_id,
                user,
            } => vec![
                ("message_id", message_id.to_hex()),
                ("recipient", recipient.to_string()),
                ("purpose", purpose.clone()),
                ("case", case.clone()),
                ("consent_id", consent_id.clone()),
                ("user", user.to_string()),
            ],
            Self::ReferralDelivered {
                message_id,
                recipient,
                envelope_digest,
                recipient_log_index,
                recipient_leaf_hash,
            } => vec![
                ("message_id", message_id.to_hex()),
                ("recipient", recipient.to_string()),
                ("envelope_digest", h(envelope_digest)),
                ("recipient_log_index", recipient_log_index.to_string()),
                ("recipient_leaf_hash", h(recipient_leaf_hash)),
            ],
            Self::ReferralReceived {
                message_id,
                sender,
                envelope_digest,
                case,
                purpose,
            } => vec![
                ("message_id", message_id.to_hex()),
                ("sender", sender.to_string()),
                ("envelope_digest", h(envelope_digest)),
                ("case", case.clone()),
                ("purpose", purpose.clone()),
            ],
            Self::EnvelopeRefused {
                message_id,
                sender,
                rule,
            } => vec![
                (
                    "message_id",
                    message_id.map(|m| m.to_hex()).unwrap_or_default(),
                ),
                ("sender", sender.to_string()),
                ("rule", rule.clone()),
            ],
            Self::ConsentRecorded {
                consent_id,
                case,
                user,
            }
            | Self::ConsentNarrowed {
                consent_id,
                case,
                user,
            } => vec![
                ("consent_id", consent_id.clone()),
                ("case", case.clone()),
                ("user", user.to_string()),
            ],
            Self::ConsentWithdrawn {
                consent_id,
                case,
                user,
                recipients,
            } => vec![
                ("consent_id", consent_id.clone()),
                ("case", case.clone()),
                ("user", user.to_string()),
                ("recipients", recipients.to_string()),
            ],
            Self::PurgeDone {
                message_id,
                sender,
                consent_id,
                case,
                purged,
            } => vec![
                ("message_id", message_id.to_hex()),
                ("sender", sender.to_string()),
                ("consent_id", consent_id.clone()),
                ("case", case.clone()),
                ("purged", purged.to_string()),
            ],
            Self::NarrowingApplied {
                message_id,
                sender,
                consent_id,
                case,
                purged,
                redacted,
            } => vec![
                ("message_id", message_id.to_hex()),
                ("sender", sender.to_string()),
                ("consent_id", consent_id.clone()),
                ("case", case.clone()),
                ("purged", purged.to_string()),
                ("redacted", redacted.to_string()),
            ],
            Self::PurgeReceiptReceived {
                message_id,
                purger,
                consent_id,
                receipt_digest,
            }
            | Self::NarrowingReceiptReceived {
                message_id,
                purger,
                consent_id,
                receipt_digest,
            } => vec![
                ("message_id", message_id.to_hex()),
                ("purger", purger.to_string()),
                ("consent_id", consent_id.clone()),
                ("receipt_digest", h(receipt_digest)),
            ],
            Self::PersonalDataRead {
                message_id,
                sender,
                case,
                user,
            } => vec![
                ("message_id", message_id.to_hex()),
                ("sender", sender.to_string()),
                ("case", case.clone()),
                ("user", user.to_string()),
            ],
            Self::ConsentDetailsRead {
                consent_id,
                case,
                user,
            } => vec![
                ("consent_id", consent_id.clone()),
                ("case", case.clone()),
                ("user", user.to_string()),
            ],
            Self::RetentionPurge { deleted } => vec![("deleted", deleted.to_string())],
            Self::TokenIssued { user, role } => vec![
                ("user", user.to_string()),
                ("role", role.as_str().to_owned()),
            ],
            Self::TokenRevoked { user } => vec![("user", user.to_string())],
            Self::RoleChanged { user, role } => vec![
                ("user", user.to_string()),
                ("role", role.as_str().to_owned()),
            ],
            Self::NodeStarted {
                config_sha256,
                signing_key,
                sealing_key,
                cert_sha256,
            } => vec![
                ("config_sha256", h(config_sha256)),
                ("signing_key", signing_key.clone()),
                ("sealing_key", sealing_key.clone()),
                ("cert_sha256", h(cert_sha256)),
            ],
        }
    }
}

/// A decoded entry: what an auditor reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub version: u64,
    pub time_ms: i64,
    pub kind: String,
    pub attributes: Vec<(String, String)>,
}

/// Why bytes are not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry is longer than {MAX_ENTRY_LEN} bytes")]
    TooLong,
    #[error("entry does not start with the audit-entry label")]
    BadLabel,
    #[error("entry is truncated")]
    Truncated,
    #[error("entry has trailing bytes")]
    Trailing,
    #[error("entry text is not UTF-8")]
    NotUtf8,
    #[error("unsupported entry version {0}")]
    UnsupportedVersion(u64),
}

/// Encodes an event at `time_ms` as entry bytes (the Merkle leaf data).
pub fn encode(event: &Event, time_ms: i64) -> Vec<u8> {
    let attrs = event.attributes();
    let mut c = Canonical::new(ENTRY_LABEL)
        .u64(ENTRY_VERSION)
        .i64(time_ms)
        .str(event.kind())
        .u64(attrs.len() as u64);
    for (k, v) in &attrs {
        c = c.str(k).str(v);
    }
    c.finish()
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], EntryError> {
        if self.0.len() < n {
            return Err(EntryError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u64(&mut self) -> Result<u64, EntryError> {
        let b: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| EntryError::Truncated)?;
        Ok(u64::from_be_bytes(b))
    }
    fn str(&mut self) -> Result<String, EntryError> {
        let b: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| EntryError::Truncated)?;
        let len = u32::from_be_bytes(b) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| EntryError::NotUtf8)
    }
}

/// Decodes entry bytes.
pub fn decode(bytes: &[u8]) -> Result<Entry, EntryError> {
    if bytes.len() > MAX_ENTRY_LEN {
        return Err(EntryError::TooLong);
    }
    let rest = bytes
        .strip_prefix(ENTRY_LABEL)
        .ok_or(EntryError::BadLabel)?;
    let mut r = Reader(rest);
    let version = r.u64()?;
    if version != ENTRY_VERSION {
        return Err(EntryError::UnsupportedVersion(version));
    }
    let time_ms = r.u64()? as i64;
    let kind = r.str()?;
    let count = r.u64()?;
    if count > 64 {
        return Err(EntryError::TooLong);
    }
    let mut attributes = Vec::new();
    for _ in 0..count {
        attributes.push((r.str()?, r.str()?));
    }
    if !r.0.is_empty() {
        return Err(EntryError::Trailing);
    }
    Ok(Entry {
        version,
        time_ms,
        kind,
        attributes,
    })
}

impl Entry {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.time_ms, self.kind)?;
        for (k, v) in &self.attributes {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federation_names_fit_note_lines() {
        for good in ["corridor-demo", "asean.corridor", "a", "fed_2"] {
            assert!(is_federation_name(good), "{good}");
        }
        for bad in ["", "my fed", "a+b", "fed\n", "é", &"x".repeat(65)] {
            assert!(!is_federation_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn round_trip_and_determinism() {
        let e = Event::ReferralReceived {
            message_id: MessageId([1; 16]),
            sender: OrgId::new("shelter-my").unwrap(),
            envelope_digest: [2; 32],
            case: "ref-abc".into(),
            purpose: "reintegration".into(),
        };
        let a = encode(&e, 42);
        assert_eq!(a, encode(&e, 42));
        let d = decode(&a).unwrap();
        assert_eq!(d.kind, "referral-received");
        assert_eq!(d.time_ms, 42);
        assert_eq!(d.get("sender"), Some("shelter-my"));
        assert_eq!(
            d.get("message_id"),
            Some(MessageId([1; 16]).to_hex().as_str())
        );
    }

    #[test]
    fn malformed_entries_are_errors() {
        let e = encode(
            &Event::TokenIssued {
                user: 1,
                role: crate::LocalRole::Auditor,
            },
            1,
        );
        assert_eq!(decode(&e).map(|d| d.attributes.len()), Ok(2));
        assert_eq!(decode(&e[..e.len() - 1]), Err(EntryError::Truncated));
        let mut t = e.clone();
        t.push(0);
        assert_eq!(decode(&t), Err(EntryError::Trailing));
        assert_eq!(decode(b"garbage"), Err(EntryError::BadLabel));
        assert_eq!(
            decode(&vec![0; MAX_ENTRY_LEN + 1]),
            Err(EntryError::TooLong)
        );
    }
}
