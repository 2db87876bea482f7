//! Delivery receipts: the recipient's signed statement that it durably accepted an
//! envelope. The sender verifies a receipt against the envelope it sent before it marks
//! the referral delivered.

use crate::canonical::{Canonical, label};
use crate::envelope::MessageId;
use crate::org::OrgId;
use crate::sign::{SigningKey, VerifyingKey};

/// The receipt format version this crate produces and accepts.
pub const RECEIPT_VERSION: u32 = 1;

/// A signed delivery receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub version: u32,
    pub message_id: MessageId,
    pub envelope_digest: [u8; 32],
    pub sender: OrgId,
    pub recipient: OrgId,
    pub received_at_ms: i64,
    /// Index of the recipient's audit-log entry for the envelope.
    pub log_index: u64,
    /// RFC 9162 leaf hash of that entry, so the sender can demand an inclusion proof.
    pub leaf_hash: [u8; 32],
    pub signature: Vec<u8>,
}

/// Why a receipt does not prove delivery of a given envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("unsupported receipt version {0}")]
    UnsupportedVersion(u32),
    #[error("receipt is for message {receipt}, expected {expected}")]
    WrongMessage {
        receipt: MessageId,
        expected: MessageId,
    },
    #[error("receipt names a different envelope digest")]
    WrongDigest,
    #[error("receipt names sender {receipt}, expected {expected}")]
    WrongSender { receipt: OrgId, expected: OrgId },
    #[error("receipt names recipient {receipt}, expected {expected}")]
    WrongRecipient { receipt: OrgId, expected: OrgId },
    #[error("receipt signature does not verify with the recipient's key")]
    BadSignature,
    #[error("receipt field is malformed: {0}")]
    Malformed(&'static str),
}

impl Receipt {
    /// Builds and signs a receipt for an accepted envelope.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        message_id: MessageId,
        envelope_digest: [u8; 32],
        sender: OrgId,
        recipient: OrgId,
        received_at_ms: i64,
        log_index: u64,
        leaf_hash: [u8; 32],
        key: &SigningKey,
    ) -> Self {
        let mut receipt = Self {
            version: RECEIPT_VERSION,
            message_id,
            envelope_digest,
            sender,
            recipient,
            received_at_ms,
            log_index,
            leaf_hash,
            signature: Vec::new(),
        };
        receipt.signature = key.sign(&receipt.signed_bytes()).to_vec();
        receipt
    }

    /// Signs the same receipt again with `key`: an answer given again after its signer's
    /// key changed must verify with the key the directory lists now.
    pub fn sign_again(&mut self, key: &SigningKey) {
        self.signature = key.sign(&self.signed_bytes()).to_vec();
    }

    /// The bytes the recipient's signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        Canonical::new(label::RECEIPT)
            .u64(u64::from(self.version))
            .bytes(&self.message_id.0)
            .bytes(&self.envelope_digest)
            .str(self.sender.as_str())
            .str(self.recipient.as_str())
            .i64(self.received_at_ms)
            .u64(self.log_index)
            .bytes(&self.leaf_hash)
            .finish()
    }

    /// Checks that this receipt is the recipient's signed acknowledgement of exactly the
    /// envelope identified by `message_id` and `envelope_digest`, sent by `sender` to
    /// `recipient`.
    pub fn verify(
        &self,
        message_id: MessageId,
        envelope_digest: &[u8; 32],
        sender: &OrgId,
        recipient: &OrgId,
        recipient_key: &VerifyingKey,
    ) -> Result<(), ReceiptError> {
        if self.version != RECEIPT_VERSION {
            return Err(ReceiptError::UnsupportedVersion(self.version));
        }
        if self.message_id != message_id {
            return Err(ReceiptError::WrongMessage {
                receipt: self.message_id,
                expected: message_id,
            });
        }
        if &self.envelope_digest != envelope_digest {
            return Err(ReceiptError::WrongDigest);
        }
        if &self.sender != sender {
            return Err(ReceiptError::WrongSender {
                receipt: self.sender.clone(),
                expected: sender.clone(),
            });
        }
        if &self.recipient != recipient {
            return Err(ReceiptError::WrongRecipient {
                receipt: self.recipient.clone(),
                expected: recipient.clone(),
            });
        }
        recipient_key
            .verify(&self.signed_bytes(), &self.signature)
            .map_err(|_| ReceiptError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    type Tamper<T> = Box<dyn Fn(&mut T)>;
    use super::*;

    fn receipt(key: &SigningKey) -> Receipt {
        Receipt::sign(
            MessageId([1; 16]),
            [2; 32],
            OrgId::new("shelter-my").unwrap(),
            OrgId::new("shelter-kh").unwrap(),
            1234,
            7,
            [8; 32],
            key,
        )
    }

    fn verify(r: &Receipt, key: &SigningKey) -> Result<(), ReceiptError> {
        r.verify(
            MessageId([1; 16]),
            &[2; 32],
            &OrgId::new("shelter-my").unwrap(),
            &OrgId::new("shelter-kh").unwrap(),
            &key.verifying_key(),
        )
    }

    #[test]
    fn signed_receipt_verifies() {
        let key = SigningKey::from_seed(&[5; 32]).unwrap();
        verify(&receipt(&key), &key).unwrap();
    }

    #[test]
    fn a_receipt_signed_again_verifies_with_the_new_key_alone() {
        let (old, new) = (
            SigningKey::from_seed(&[5; 32]).unwrap(),
            SigningKey::from_seed(&[6; 32]).unwrap(),
        );
        let mut r = receipt(&old);
        let statement = r.signed_bytes();
        r.sign_again(&new);
        assert_eq!(r.signed_bytes(), statement, "the same statement");
        verify(&r, &new).unwrap();
        assert_eq!(verify(&r, &old), Err(ReceiptError::BadSignature));
    }

    #[test]
    fn every_field_is_checked_or_signed() {
        let key = SigningKey::from_seed(&[5; 32]).unwrap();
        let other = OrgId::new("other").unwrap();
        let tampers: Vec<(&str, Tamper<Receipt>)> = vec![
            ("version", Box::new(|r| r.version = 2)),
            ("message_id", Box::new(|r| r.message_id.0[0] ^= 1)),
            ("digest", Box::new(|r| r.envelope_digest[0] ^= 1)),
            (
                "sender",
                Box::new({
                    let o = other.clone();
                    move |r| r.sender = o.clone()
                }),
            ),
            (
                "recipient",
                Box::new({
                    let o = other.clone();
                    move |r| r.recipient = o.clone()
                }),
            ),
            ("received_at_ms", Box::new(|r| r.received_at_ms += 1)),
            ("log_index", Box::new(|r| r.log_index += 1)),
            ("leaf_hash", Box::new(|r| r.leaf_hash[0] ^= 1)),
            ("signature", Box::new(|r| r.signature[0] ^= 1)),
        ];
        for (field, tamper) in tampers {
            let mut r = receipt(&key);
            tamper(&mut r);
            assert!(verify(&r, &key).is_err(), "tampered {field} verified");
        }
        let stranger = SigningKey::from_seed(&[6; 32]).unwrap();
        assert_eq!(
            receipt(&key).verify(
                MessageId([1; 16]),
                &[2; 32],
                &OrgId::new("shelter-my").unwrap(),
                &OrgId::new("shelter-kh").unwrap(),
                &stranger.verifying_key()
            ),
            Err(ReceiptError::BadSignature)
        );
    }
}
