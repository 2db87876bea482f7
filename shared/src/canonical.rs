//! Canonical byte encodings of everything that is signed or used as associated data.
//!
//! Protobuf encodings are not canonical (field order, unknown fields, default values), so
//! signatures never cover them. Instead each signed structure is encoded here as a fixed
//! sequence of length-prefixed fields behind a distinct domain-separation label, so that a
//! signature over one kind of thing can never be replayed as a signature over another.

/// Domain-separation labels, one per signed thing. Each ends in a NUL byte so that no
/// label is a prefix of another.
pub mod label {
    /// The signed part of an envelope (header and ciphertext digest).
    pub const ENVELOPE: &[u8] = b"corridor/v1/envelope\0";
    /// A delivery receipt.
    pub const RECEIPT: &[u8] = b"corridor/v1/receipt\0";
    /// The envelope header as HPKE associated data.
    pub const HEADER_AAD: &[u8] = b"corridor/v1/header-aad\0";
    /// A consent receipt travelling inside a referral.
    pub const CONSENT_RECEIPT: &[u8] = b"corridor/v1/consent-receipt\0";
    /// A purge receipt answering a consent withdrawal.
    pub const PURGE_RECEIPT: &[u8] = b"corridor/v1/purge-receipt\0";
    /// A purge receipt answering a consent narrowing: what was purged and what was cut.
    pub const NARROWING_RECEIPT: &[u8] = b"corridor/v1/narrowing-receipt\0";
    /// A recipient's confirmation of a consent's terms, keyed with what the narrowing
    /// that stated them gave it.
    pub const TERMS_CONFIRMATION: &[u8] = b"corridor/v1/terms-confirmation\0";
    /// HPKE `info` for sealing envelope payloads.
    pub const SEAL_INFO: &[u8] = b"corridor/v1/seal";
}

/// Builder for a canonical encoding: a label, then fields in a fixed order.
#[derive(Debug, Clone)]
pub struct Canonical {
    bytes: Vec<u8>,
}

impl Canonical {
    /// Starts an encoding with the given domain-separation label.
    pub fn new(label: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(label);
        Self { bytes }
    }

    /// Appends a byte string, prefixed by its length as a big-endian u32.
    pub fn bytes(mut self, value: &[u8]) -> Self {
        // Every input is bounded far below 4 GiB by the message size limits.
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(value);
        self
    }

    /// Appends a UTF-8 string as a length-prefixed byte string.
    pub fn str(self, value: &str) -> Self {
        self.bytes(value.as_bytes())
    }

    /// Appends an unsigned integer as 8 big-endian bytes.
    pub fn u64(mut self, value: u64) -> Self {
        self.bytes.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Appends a signed integer as 8 big-endian bytes (two's complement).
    pub fn i64(mut self, value: i64) -> Self {
        self.bytes.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Appends a list of strings: the count, then each string.
    pub fn strs<S: AsRef<str>>(mut self, values: &[S]) -> Self {
        self = self.u64(values.len() as u64);
        for value in values {
            self = self.str(value.as_ref());
        }
        self
    }

    /// The finished encoding.
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_length_prefixed_so_boundaries_cannot_shift() {
        let a = Canonical::new(b"x\0").str("ab").str("c").finish();
        let b = Canonical::new(b"x\0").str("a").str("bc").finish();
        assert_ne!(a, b);
    }

    #[test]
    fn labels_are_distinct_and_prefix_free() {
        let labels = [
            label::ENVELOPE,
            label::RECEIPT,
            label::HEADER_AAD,
            label::CONSENT_RECEIPT,
            label::PURGE_RECEIPT,
        ];
        for (i, a) in labels.iter().enumerate() {
            for (j, b) in labels.iter().enumerate() {
                if i != j {
                    assert!(!b.starts_with(a), "{a:?} is a prefix of {b:?}");
                }
            }
        }
    }

    #[test]
    fn sha256_matches_fips_180_vector() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
