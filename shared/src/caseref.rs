//! Pairwise references: each recipient sees a different, stable reference for the same
//! case, and for the same consent, so two recipients cannot link their records through
//! the identifiers we gave them.
//!
//! A reference is HMAC-SHA256 over a label, the local id and the recipient, keyed with a
//! node secret, truncated to 128 bits and hex-encoded. Case and consent references have
//! labels of their own, so the two never coincide.

use crate::canonical::Canonical;
use crate::org::OrgId;

const CASE_LABEL: &[u8] = b"corridor/v1/case-ref\0";
const CONSENT_LABEL: &[u8] = b"corridor/v1/consent-ref\0";
const REQUEST_LABEL: &[u8] = b"corridor/v1/request-digest\0";
const TERMS_KEY_LABEL: &[u8] = b"corridor/v1/terms-key\0";
const REQUEST_KEY_LABEL: &[u8] = b"corridor/v1/request-key\0";

/// Whether `text` has the form of a case reference: `ref-` and 32 lowercase hex digits.
///
/// A recipient accepts nothing else where a case reference belongs, so a peer cannot put
/// free text (a person's name, say) into the records and audit entries it keeps under it.
pub fn is_case_ref(text: &str) -> bool {
    text.strip_prefix("ref-")
        .is_some_and(|hex| crate::is_lower_hex(hex, 32))
}

/// Whether `text` has the form of a case id as a node gives them out: `case-` and 32
/// lowercase hex digits.
pub fn is_case_id(text: &str) -> bool {
    text.strip_prefix("case-")
        .is_some_and(|hex| crate::is_lower_hex(hex, 32))
}

/// Length of a pairwise secret, in bytes.
pub const PAIRWISE_SECRET_LEN: usize = 32;

/// Secret key for deriving pairwise references. A node keeps its secret for as long as
/// it keeps its records, whatever becomes of its other keys: every identifier derived
/// from it must stay the same for the same case, consent, recipient or request.
pub struct PairwiseKey(ring::hmac::Key);

impl PairwiseKey {
    /// A fresh random secret, for a node that has derived nothing yet.
    pub fn generate_secret() -> Result<[u8; PAIRWISE_SECRET_LEN], crate::at_rest::AtRestError> {
        use ring::rand::SecureRandom as _;
        let mut secret = [0u8; PAIRWISE_SECRET_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| crate::at_rest::AtRestError::Randomness)?;
        Ok(secret)
    }

    /// The secret derived from other node secret material (the signing key's encoding)
    /// under a label of its own, one-way. Nodes derived their pairwise key this way
    /// before they kept a secret for it; a node upgrading keeps this one, so that what
    /// it derived before stays the same.
    pub fn secret_derived_from(node_secret: &[u8]) -> [u8; PAIRWISE_SECRET_LEN] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"corridor/v1/case-ref-key");
        let mut secret = [0u8; PAIRWISE_SECRET_LEN];
        secret.copy_from_slice(ring::hmac::sign(&key, node_secret).as_ref());
        secret
    }

    /// The key for a stored secret.
    pub fn from_secret(secret: &[u8; PAIRWISE_SECRET_LEN]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// The key derived from other node secret material ([`Self::secret_derived_from`]).
    pub fn derive(node_secret: &[u8]) -> Self {
        Self::from_secret(&Self::secret_derived_from(node_secret))
    }

    /// The reference under which `recipient` knows case `case_id`: `ref-` and 32 hex
    /// digits.
    pub fn case_ref(&self, case_id: &str, recipient: &OrgId) -> String {
        format!("ref-{}", self.tag(CASE_LABEL, case_id, recipient))
    }

    /// The id under which `recipient` knows consent `consent_id`: `consent-` and 32 hex
    /// digits, the form of a consent id. Without it every recipient of referrals under one
    /// consent would hold the same id, which links their records as a shared case
    /// reference would.
    pub fn consent_ref(&self, consent_id: &str, recipient: &OrgId) -> String {
        format!("consent-{}", self.tag(CONSENT_LABEL, consent_id, recipient))
    }

    /// A keyed digest of what a caseworker asked to send (case, recipient, purpose,
    /// consent chosen, fields and their values), kept with the request id so that a
    /// retry asking for something else is recognised. Keyed, so that the digest of a few
    /// guessable values cannot be matched against guesses by whoever reads it.
    pub fn request_digest<'a>(
        &self,
        case_id: &str,
        recipient: &OrgId,
        purpose: &str,
        consent_id: &str,
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> [u8; 32] {
        let mut fields: Vec<_> = fields.into_iter().collect();
        fields.sort_unstable();
        let mut input = Canonical::new(REQUEST_LABEL)
            .str(case_id)
            .str(recipient.as_str())
            .str(purpose)
            .str(consent_id)
            .u64(fields.len() as u64);
        for (name, value) in fields {
            input = input.str(name).str(value);
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ring::hmac::sign(&self.0, &input.finish()).as_ref());
        digest
    }

    /// The key under which a node stores a caller's request id (`user` and the id it
    /// gave): `user:` and 64 hex digits. Keyed, so that an id a caseworker made up (a
    /// name, a date of birth) is never stored, nor can be matched against guesses.
    pub fn request_key(&self, user: i64, request_id: &str) -> String {
        let input = Canonical::new(REQUEST_KEY_LABEL)
            .i64(user)
            .str(request_id)
            .finish();
        format!(
            "{user}:{}",
            hex::encode(ring::hmac::sign(&self.0, &input).as_ref())
        )
    }

    /// Whether `stored` has the form of [`PairwiseKey::request_key`]; a key stored
    /// before request ids were keyed holds the id itself.
    pub fn is_request_key(stored: &str) -> bool {
        stored.split_once(':').is_some_and(|(user, digest)| {
            user.parse::<i64>().is_ok() && crate::is_lower_hex(digest, 64)
        })
    }

    /// The key a narrowing gives `recipient` to confirm the consent's terms with
    /// ([`crate::ConsentTerms::confirmation_digest`]): one per recipient, consent as the
    /// recipient knows it (`consent_ref`) and narrowing (`narrowed_at_ms`), so that a
    /// renewed envelope carries the same. Derived, so the sender stores nothing to check
    /// an answer; secret, so that the confirmation a recipient keeps in its answer says
    /// nothing of the terms to whoever reads it once the data is purged.
    pub fn terms_key(&self, consent_ref: &str, recipient: &OrgId, narrowed_at_ms: i64) -> [u8; 32] {
        let input = Canonical::new(TERMS_KEY_LABEL)
            .str(consent_ref)
            .str(recipient.as_str())
            .i64(narrowed_at_ms)
            .finish();
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::hmac::sign(&self.0, &input).as_ref());
        key
    }

    fn tag(&self, label: &[u8], id: &str, recipient: &OrgId) -> String {
        let input = Canonical::new(label)
            .str(id)
            .str(recipient.as_str())
            .finish();
        hex::encode(&ring::hmac::sign(&self.0, &input).as_ref()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_form_of_a_reference_is_a_case_reference() {
        let key = PairwiseKey::derive(&[1; 32]);
        let made = key.case_ref("case-1", &OrgId::new("a").unwrap());
        assert!(is_case_ref(&made), "{made}");
        let consent = key.consent_ref("consent-1", &OrgId::new("a").unwrap());
        assert!(crate::consent::is_consent_id(&consent), "{consent}");
        assert!(!is_case_ref(&consent), "{consent}");
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
        assert!(is_case_id("case-0123456789abcdef0123456789abcdef"));
        for bad in [
            "case-",
            "ref-0123456789abcdef0123456789abcdef",
            "../case-1",
            "case-1",
        ] {
            assert!(!is_case_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_stored_secret_derives_what_the_material_it_came_from_derived() {
        let a = OrgId::new("a").unwrap();
        let material = b"signing key encoding";
        let secret = PairwiseKey::secret_derived_from(material);
        assert_ne!(&secret[..], &material[..]);
        assert_eq!(
            PairwiseKey::from_secret(&secret).case_ref("case-1", &a),
            PairwiseKey::derive(material).case_ref("case-1", &a)
        );
        // Pinned, so that an upgrade cannot silently change every reference a node gave.
        assert_eq!(
            PairwiseKey::derive(&[1; 32]).case_ref("case-1", &a),
            "ref-".to_owned() + PINNED_CASE_REF
        );
        let (x, y) = (
            PairwiseKey::generate_secret().unwrap(),
            PairwiseKey::generate_secret().unwrap(),
        );
        assert_ne!(x, y);
    }

    const PINNED_CASE_REF: &str = "976c131a3b390f7b72b6d341a1d0de78";

    #[test]
    fn stable_per_recipient_and_different_across_recipients() {
        let key = PairwiseKey::derive(&[1; 32]);
        let other_node = PairwiseKey::derive(&[2; 32]);
        let a = OrgId::new("a").unwrap();
        let b = OrgId::new("b").unwrap();
        for derive in [PairwiseKey::case_ref, PairwiseKey::consent_ref] {
            assert_eq!(derive(&key, "id-1", &a), derive(&key, "id-1", &a));
            assert_ne!(derive(&key, "id-1", &a), derive(&key, "id-1", &b));
            assert_ne!(derive(&key, "id-1", &a), derive(&key, "id-2", &a));
            assert_ne!(derive(&key, "id-1", &a), derive(&other_node, "id-1", &a));
        }
        // The two kinds are separate: the same id gives unrelated digits.
        let (case, consent) = (key.case_ref("id-1", &a), key.consent_ref("id-1", &a));
        assert_ne!(case.strip_prefix("ref-"), consent.strip_prefix("consent-"));
    }

    #[test]
    fn a_request_digest_covers_every_part_of_the_request_and_not_field_order() {
        let key = PairwiseKey::derive(&[1; 32]);
        let a = OrgId::new("a").unwrap();
        let fields = [("age_band", "25-29"), ("preferred_name", "Srey")];
        let digest = |case, to: &OrgId, purpose, consent, fields: &[(&str, &str)]| {
            key.request_digest(case, to, purpose, consent, fields.iter().copied())
        };
        let base = digest("case-1", &a, "reintegration", "", &fields);
        let reversed = [fields[1], fields[0]];
        assert_eq!(base, digest("case-1", &a, "reintegration", "", &reversed));
        for other in [
            digest("case-2", &a, "reintegration", "", &fields),
            digest(
                "case-1",
                &OrgId::new("b").unwrap(),
                "reintegration",
                "",
                &fields,
            ),
            digest("case-1", &a, "legal-aid", "", &fields),
            digest("case-1", &a, "reintegration", "consent-1", &fields),
            digest("case-1", &a, "reintegration", "", &fields[..1]),
            digest(
                "case-1",
                &a,
                "reintegration",
                "",
                &[fields[0], ("preferred_name", "Sre")],
            ),
            // Length prefixes: moving a byte from a name to its value changes the digest.
            digest(
                "case-1",
                &a,
                "reintegration",
                "",
                &[fields[0], ("preferred_nam", "eSrey")],
            ),
            PairwiseKey::derive(&[2; 32]).request_digest(
                "case-1",
                &a,
                "reintegration",
                "",
                fields.iter().copied(),
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn a_terms_key_is_one_per_recipient_consent_and_narrowing_and_secret_to_the_node() {
        let key = PairwiseKey::derive(&[1; 32]);
        let (a, b) = (OrgId::new("a").unwrap(), OrgId::new("b").unwrap());
        let base = key.terms_key("consent-1", &a, 5);
        assert_eq!(base, key.terms_key("consent-1", &a, 5));
        for other in [
            key.terms_key("consent-2", &a, 5),
            key.terms_key("consent-1", &b, 5),
            key.terms_key("consent-1", &a, 6),
            PairwiseKey::derive(&[2; 32]).terms_key("consent-1", &a, 5),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn a_request_key_keeps_nothing_of_the_request_id() {
        let key = PairwiseKey::derive(&[1; 32]);
        let stored = key.request_key(7, "REQ-Chan-Sokha-1990-04-17");
        assert!(
            stored.starts_with("7:") && !stored.contains("Sokha"),
            "{stored}"
        );
        assert!(PairwiseKey::is_request_key(&stored));
        assert!(!PairwiseKey::is_request_key("7:REQ-Chan-Sokha-1990-04-17"));
        assert_eq!(stored, key.request_key(7, "REQ-Chan-Sokha-1990-04-17"));
        assert_ne!(stored, key.request_key(8, "REQ-Chan-Sokha-1990-04-17"));
        assert_ne!(
            stored,
            PairwiseKey::derive(&[2; 32]).request_key(7, "REQ-Chan-Sokha-1990-04-17")
        );
    }
}
