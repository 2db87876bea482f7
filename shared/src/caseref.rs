//! Pairwise case references: each recipient sees a different, stable reference for the
//! same case, so two recipients cannot link their records by reference.
//!
//! The reference is HMAC-SHA256 over the case id and recipient, keyed with a node secret,
//! truncated to 128 bits and hex-encoded.

use crate::canonical::Canonical;
use crate::org::OrgId;

const LABEL: &[u8] = b"corridor/v1/case-ref\0";

/// Whether `text` has the form of a case reference: `ref-` and 32 lowercase hex digits.
///
/// A recipient accepts nothing else where a case reference belongs, so a peer cannot put
/// free text (a person's name, say) into the records and audit entries it keeps under it.
pub fn is_case_ref(text: &str) -> bool {
    text.strip_prefix("ref-")
        .is_some_and(|hex| crate::is_lower_hex(hex, 32))
}

/// Secret key for deriving case references; derive it once per node from key material
/// that never leaves the node.
pub struct CaseRefKey(ring::hmac::Key);

impl CaseRefKey {
    /// Derives the key from node secret material (for example the signing seed) with a
    /// distinct label, so the reference key is independent of the secret's other uses.
    pub fn derive(node_secret: &[u8]) -> Self {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"corridor/v1/case-ref-key");
        let derived = ring::hmac::sign(&key, node_secret);
        Self(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            derived.as_ref(),
        ))
    }

    /// The reference under which `recipient` knows case `case_id`.
    pub fn reference(&self, case_id: &str, recipient: &OrgId) -> String {
        let input = Canonical::new(LABEL)
            .str(case_id)
            .str(recipient.as_str())
            .finish();
        let tag = ring::hmac::sign(&self.0, &input);
        format!("ref-{}", hex::encode(&tag.as_ref()[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_form_of_a_reference_is_a_case_reference() {
        let key = CaseRefKey::derive(&[1; 32]);
        let made = key.reference("case-1", &OrgId::new("a").unwrap());
        assert!(is_case_ref(&made), "{made}");
        for bad in [
            "",
            "ref-",
            "ref-test",
            "Ref-0123456789abcdef0123456789abcdef",
            "ref-0123456789ABCDEF0123456789abcdef",
            "ref-0123456789abcdef0123456789abcde",
            "ref-0123456789abcdef0123456789abcdef0",
            "ref-0123456789abcdef0123456789abcdeg",
            "Maria Santos",
        ] {
            assert!(!is_case_ref(bad), "{bad:?}");
        }
    }

    #[test]
    fn stable_per_recipient_and_different_across_recipients() {
        let key = CaseRefKey::derive(&[1; 32]);
        let a = OrgId::new("a").unwrap();
        let b = OrgId::new("b").unwrap();
        assert_eq!(key.reference("case-1", &a), key.reference("case-1", &a));
        assert_ne!(key.reference("case-1", &a), key.reference("case-1", &b));
        assert_ne!(key.reference("case-1", &a), key.reference("case-2", &a));
        let other_node = CaseRefKey::derive(&[2; 32]);
        assert_ne!(
            key.reference("case-1", &a),
            other_node.reference("case-1", &a)
        );
    }
}
