//! Purge receipts: a recipient's signed statement that it destroyed the data it held
//! under a withdrawn consent, or, answering a narrowing, the referrals and the fields the
//! narrowed consent no longer covers. The org that withdrew or narrowed the consent keeps
//! asking until it holds one from every org it asked.

use crate::canonical::{Canonical, label};
use crate::envelope::MessageId;
use crate::org::OrgId;
use crate::sign::{SigningKey, VerifyingKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeReceipt {
    /// Id of the withdrawal envelope this answers.
    pub withdrawal_id: MessageId,
    pub consent_id: String,
    /// The case reference the purging org knew.
    pub case_ref: String,
    /// The org that withdrew (sender of the referrals).
    pub requester: OrgId,
    /// The org that purged.
    pub purger: OrgId,
    /// Referrals whose data was destroyed, sorted.
    pub purged_referrals: Vec<MessageId>,
    /// For a narrowing: the referrals of which fields were destroyed and the others
    /// kept, sorted. `None` answers a withdrawal.
    pub cut_referrals: Option<Vec<MessageId>>,
    /// For a narrowing: the purger's confirmation that it applies the consent's terms as
    /// the narrowing stated them ([`crate::ConsentTerms::confirmation_digest`], keyed with
    /// what the narrowing gave it). `None` from a purger on a version that does not
    /// confirm them, answering a narrowing that gave no key (whose sender would not know
    /// the field, and could not check the signature over it), and for a withdrawal.
    pub terms_confirmed: Option<[u8; 32]>,
    pub purged_at_ms: i64,
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PurgeReceiptError {
    #[error("purge receipt answers another withdrawal")]
    WrongWithdrawal,
    #[error("purge receipt answers a withdrawal where a narrowing was asked, or the reverse")]
    WrongKind,
    #[error("purge receipt names requester {found}, expected {expected}")]
    WrongRequester { found: OrgId, expected: OrgId },
    #[error("purge receipt names purger {found}, expected {expected}")]
    WrongPurger { found: OrgId, expected: OrgId },
    #[error("purge receipt is for consent {found}, expected {expected}")]
    WrongConsent { found: String, expected: String },
    #[error("purge receipt signature does not verify with the purger's key")]
    BadSignature,
    #[error("a withdrawal's purge receipt confirms consent terms")]
    TermsOnWithdrawal,
}

impl PurgeReceipt {
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        withdrawal_id: MessageId,
        consent_id: String,
        case_ref: String,
        requester: OrgId,
        purger: OrgId,
        mut purged_referrals: Vec<MessageId>,
        mut cut_referrals: Option<Vec<MessageId>>,
        terms_confirmed: Option<[u8; 32]>,
        purged_at_ms: i64,
        key: &SigningKey,
    ) -> Self {
        purged_referrals.sort();
        purged_referrals.dedup();
        if let Some(cut) = &mut cut_referrals {
            cut.sort();
            cut.dedup();
        }
        let mut receipt = Self {
            withdrawal_id,
            consent_id,
            case_ref,
            requester,
            purger,
            purged_referrals,
            cut_referrals,
            terms_confirmed,
            purged_at_ms,
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

    /// The bytes signed: a narrowing's receipt under a label of its own, so that it can
    /// never pass for a withdrawal's. A confirmation of terms comes last, and only where
    /// there is one, so that receipts without it are signed over the bytes that versions
    /// before confirmations sign and check; the encoding is length-prefixed, so no receipt
    /// can pass for one with a confirmation or the reverse.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let hex = |ids: &[MessageId]| ids.iter().map(MessageId::to_hex).collect::<Vec<_>>();
        let label = match self.cut_referrals {
            None => label::PURGE_RECEIPT,
            Some(_) => label::NARROWING_RECEIPT,
        };
        let fields = Canonical::new(label)
            .bytes(&self.withdrawal_id.0)
            .str(&self.consent_id)
            .str(&self.case_ref)
            .str(self.requester.as_str())
            .str(self.purger.as_str())
            .strs(&hex(&self.purged_referrals))
            .i64(self.purged_at_ms);
        match (&self.cut_referrals, &self.terms_confirmed) {
            (None, _) => fields.finish(),
            (Some(cut), None) => fields.strs(&hex(cut)).finish(),
            (Some(cut), Some(confirmed)) => fields.strs(&hex(cut)).bytes(confirmed).finish(),
        }
    }

    /// Checks that this receipt answers `withdrawal_id` (a narrowing if `narrowing`, else
    /// a withdrawal) for `consent_id`, was made by `purger` for `requester`, and is
    /// signed by the purger.
    pub fn verify(
        &self,
        withdrawal_id: MessageId,
        narrowing: bool,
        consent_id: &str,
        requester: &OrgId,
        purger: &OrgId,
        purger_key: &VerifyingKey,
    ) -> Result<(), PurgeReceiptError> {
        if self.withdrawal_id != withdrawal_id {
            return Err(PurgeReceiptError::WrongWithdrawal);
        }
        if self.cut_referrals.is_some() != narrowing {
            return Err(PurgeReceiptError::WrongKind);
        }
        if self.cut_referrals.is_none() && self.terms_confirmed.is_some() {
            return Err(PurgeReceiptError::TermsOnWithdrawal);
        }
        if self.consent_id != consent_id {
            return Err(PurgeReceiptError::WrongConsent {
                found: self.consent_id.clone(),
                expected: consent_id.to_owned(),
            });
        }
        if &self.requester != requester {
            return Err(PurgeReceiptError::WrongRequester {
                found: self.requester.clone(),
                expected: requester.clone(),
            });
        }
        if &self.purger != purger {
            return Err(PurgeReceiptError::WrongPurger {
                found: self.purger.clone(),
                expected: purger.clone(),
            });
        }
        purger_key
            .verify(&self.signed_bytes(), &self.signature)
            .map_err(|_| PurgeReceiptError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_purge_receipt_verifies_and_tampering_fails() {
        let key = SigningKey::from_seed(&[4; 32]).unwrap();
        let my = OrgId::new("shelter-my").unwrap();
        let kh = OrgId::new("shelter-kh").unwrap();
        let r = PurgeReceipt::sign(
            MessageId([1; 16]),
            "consent-1".into(),
            "ref-1".into(),
            my.clone(),
            kh.clone(),
            vec![MessageId([3; 16]), MessageId([2; 16]), MessageId([3; 16])],
            None,
            None,
            99,
            &key,
        );
        assert_eq!(
            r.purged_referrals,
            vec![MessageId([2; 16]), MessageId([3; 16])]
        );
        let vk = key.verifying_key();
        let id = MessageId([1; 16]);
        r.verify(id, false, "consent-1", &my, &kh, &vk).unwrap();
        assert!(
            r.verify(MessageId([9; 16]), false, "consent-1", &my, &kh, &vk)
                .is_err()
        );
        assert!(r.verify(id, false, "consent-2", &my, &kh, &vk).is_err());
        assert!(r.verify(id, false, "consent-1", &kh, &kh, &vk).is_err());
        assert_eq!(
            r.verify(id, true, "consent-1", &my, &kh, &vk),
            Err(PurgeReceiptError::WrongKind)
        );
        let mut t = r.clone();
        t.purged_referrals.pop();
        assert_eq!(
            t.verify(id, false, "consent-1", &my, &kh, &vk),
            Err(PurgeReceiptError::BadSignature)
        );
        let mut t = r.clone();
        t.case_ref = "ref-2".into();
        assert!(t.verify(id, false, "consent-1", &my, &kh, &vk).is_err());
        // Signed again with a new key, the same statement verifies with it alone.
        let new = SigningKey::from_seed(&[6; 32]).unwrap();
        let mut again = r.clone();
        again.sign_again(&new);
        assert_eq!(again.signed_bytes(), r.signed_bytes());
        again
            .verify(id, false, "consent-1", &my, &kh, &new.verifying_key())
            .unwrap();
        assert_eq!(
            again.verify(id, false, "consent-1", &my, &kh, &vk),
            Err(PurgeReceiptError::BadSignature)
        );
    }

    /// A narrowing's receipt names what it cut; it cannot pass for a withdrawal's, nor
    /// one withdrawal's receipt for a narrowing's, and what it cut is signed.
    #[test]
    fn a_narrowing_receipt_is_a_kind_of_its_own() {
        let key = SigningKey::from_seed(&[4; 32]).unwrap();
        let vk = key.verifying_key();
        let my = OrgId::new("shelter-my").unwrap();
        let kh = OrgId::new("shelter-kh").unwrap();
        let id = MessageId([1; 16]);
        let sign = |cut: Option<Vec<MessageId>>| {
            PurgeReceipt::sign(
                id,
                "consent-1".into(),
                "ref-1".into(),
                my.clone(),
                kh.clone(),
                vec![MessageId([2; 16])],
                cut,
                None,
                99,
                &key,
            )
        };
        let narrowing = sign(Some(vec![MessageId([5; 16]), MessageId([4; 16])]));
        assert_eq!(
            narrowing.cut_referrals,
            Some(vec![MessageId([4; 16]), MessageId([5; 16])])
        );
        narrowing
            .verify(id, true, "consent-1", &my, &kh, &vk)
            .unwrap();
        assert_ne!(narrowing.signed_bytes(), sign(None).signed_bytes());
        assert_ne!(
            sign(Some(Vec::new())).signed_bytes(),
            sign(None).signed_bytes()
        );
        let mut relabelled = narrowing.clone();
        relabelled.cut_referrals = None;
        assert_eq!(
            relabelled.verify(id, false, "consent-1", &my, &kh, &vk),
            Err(PurgeReceiptError::BadSignature)
        );
        let mut t = narrowing.clone();
        t.cut_referrals = Some(vec![MessageId([4; 16])]);
        assert_eq!(
            t.verify(id, true, "consent-1", &my, &kh, &vk),
            Err(PurgeReceiptError::BadSignature)
        );
    }

    /// A narrowing's receipt may confirm the consent's terms, under the signature; one
    /// without a confirmation is signed over the same bytes as before confirmations.
    #[test]
    fn a_confirmation_of_terms_is_signed_and_receipts_without_one_are_as_before() {
        let key = SigningKey::from_seed(&[4; 32]).unwrap();
        let vk = key.verifying_key();
        let my = OrgId::new("shelter-my").unwrap();
        let kh = OrgId::new("shelter-kh").unwrap();
        let id = MessageId([1; 16]);
        let sign = |cut: Option<Vec<MessageId>>, confirmed: Option<[u8; 32]>| {
            PurgeReceipt::sign(
                id,
                "consent-1".into(),
                "ref-1".into(),
                my.clone(),
                kh.clone(),
                Vec::new(),
                cut,
                confirmed,
                99,
                &key,
            )
        };
        let verify =
            |r: &PurgeReceipt, narrowing| r.verify(id, narrowing, "consent-1", &my, &kh, &vk);
        let confirmed = sign(Some(Vec::new()), Some([5; 32]));
        assert_eq!(verify(&confirmed, true), Ok(()));
        let without = sign(Some(Vec::new()), None);
        assert_eq!(verify(&without, true), Ok(()));
        let layout_before_confirmations = Canonical::new(label::NARROWING_RECEIPT)
            .bytes(&id.0)
            .str("consent-1")
            .str("ref-1")
            .str("shelter-my")
            .str("shelter-kh")
            .strs::<&str>(&[])
            .i64(99)
            .strs::<&str>(&[])
            .finish();
        assert_eq!(without.signed_bytes(), layout_before_confirmations);

        for tampered in [
            PurgeReceipt {
                terms_confirmed: None,
                ..confirmed.clone()
            },
            PurgeReceipt {
                terms_confirmed: Some([6; 32]),
                ..confirmed.clone()
            },
            PurgeReceipt {
                terms_confirmed: Some([5; 32]),
                ..without.clone()
            },
        ] {
            assert_eq!(
                verify(&tampered, true),
                Err(PurgeReceiptError::BadSignature)
            );
        }
        let withdrawal = PurgeReceipt {
            terms_confirmed: Some([5; 32]),
            ..sign(None, None)
        };
        assert_eq!(
            verify(&withdrawal, false),
            Err(PurgeReceiptError::TermsOnWithdrawal)
        );
    }
}
