//! Encryption of personal data at rest: every case has its own random data key; the data
//! key is stored only wrapped (encrypted) under the node's key-encryption key; personal
//! data is stored only encrypted under the data key. Destroying the wrapped data key
//! destroys the data (crypto-shredding), wherever copies of the ciphertext linger.
//!
//! Both layers use ChaCha20-Poly1305 from ring with a random 96-bit nonce stored in front
//! of the ciphertext, and bind the ciphertext to where it belongs through the associated
//! data (case and record ids), so a ciphertext moved to another row does not decrypt.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::canonical::Canonical;

const WRAP_LABEL: &[u8] = b"corridor/v1/data-key-wrap\0";
const DATA_LABEL: &[u8] = b"corridor/v1/data-at-rest\0";
const NODE_SECRET_LABEL: &[u8] = b"corridor/v1/node-secret\0";

/// Why a key could not be made or a value not decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtRestError {
    #[error("key must be 32 bytes")]
    BadKey,
    #[error("system randomness unavailable")]
    Randomness,
    #[error("stored ciphertext does not decrypt (wrong key, wrong record, or tampered)")]
    Undecryptable,
}

fn key(bytes: &[u8]) -> Result<LessSafeKey, AtRestError> {
    UnboundKey::new(&CHACHA20_POLY1305, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| AtRestError::BadKey)
}

fn seal(key: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, AtRestError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| AtRestError::Randomness)?;
    let mut buffer = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buffer,
    )
    .map_err(|_| AtRestError::Randomness)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buffer);
    Ok(out)
}

fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AtRestError> {
    if sealed.len() < NONCE_LEN {
        return Err(AtRestError::Undecryptable);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AtRestError::Undecryptable)?;
    let mut buffer = ciphertext.to_vec();
    let plaintext = key
        .open_in_place(nonce, Aad::from(aad), &mut buffer)
        .map_err(|_| AtRestError::Undecryptable)?;
    Ok(plaintext.to_vec())
}

/// The node's key-encryption key.
pub struct KeyEncryptionKey(LessSafeKey);

/// A case's data key, unwrapped (in memory only while in use).
pub struct DataKey(LessSafeKey);

impl KeyEncryptionKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AtRestError> {
        key(bytes).map(Self)
    }

    /// A fresh random data key for `case`, and its wrapped form to store.
    pub fn new_data_key(&self, case: &str) -> Result<(DataKey, Vec<u8>), AtRestError> {
        let mut raw = [0u8; 32];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| AtRestError::Randomness)?;
        let wrapped = seal(
            &self.0,
            &Canonical::new(WRAP_LABEL).str(case).finish(),
            &raw,
        )?;
        Ok((DataKey(key(&raw)?), wrapped))
    }

    pub fn unwrap_data_key(&self, case: &str, wrapped: &[u8]) -> Result<DataKey, AtRestError> {
        let raw = open(
            &self.0,
            &Canonical::new(WRAP_LABEL).str(case).finish(),
            wrapped,
        )?;
        key(&raw).map(DataKey)
    }
}

impl KeyEncryptionKey {
    /// Encrypts one of the node's own secrets (not a case's), bound to its `name`, for
    /// storing beside the data it keys.
    pub fn seal_node_secret(&self, name: &str, secret: &[u8]) -> Result<Vec<u8>, AtRestError> {
        seal(
            &self.0,
            &Canonical::new(NODE_SECRET_LABEL).str(name).finish(),
            secret,
        )
    }

    pub fn open_node_secret(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, AtRestError> {
        open(
            &self.0,
            &Canonical::new(NODE_SECRET_LABEL).str(name).finish(),
            sealed,
        )
    }
}

impl DataKey {
    /// Encrypts one value of `case`, bound to `record` (for example a referral id).
    pub fn encrypt(
        &self,
        case: &str,
        record: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, AtRestError> {
        seal(
            &self.0,
            &Canonical::new(DATA_LABEL).str(case).str(record).finish(),
            plaintext,
        )
    }

    pub fn decrypt(&self, case: &str, record: &str, sealed: &[u8]) -> Result<Vec<u8>, AtRestError> {
        open(
            &self.0,
            &Canonical::new(DATA_LABEL).str(case).str(record).finish(),
            sealed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_secret_opens_only_under_its_name_and_key() {
        let kek = KeyEncryptionKey::from_bytes(&[7; 32]).unwrap();
        let sealed = kek.seal_node_secret("pairwise", b"marker-secret").unwrap();
        assert!(!sealed.windows(13).any(|w| w == b"marker-secret"));
        assert_eq!(
            kek.open_node_secret("pairwise", &sealed).unwrap(),
            b"marker-secret"
        );
        assert_eq!(
            kek.open_node_secret("other", &sealed),
            Err(AtRestError::Undecryptable)
        );
        let other = KeyEncryptionKey::from_bytes(&[8; 32]).unwrap();
        assert_eq!(
            other.open_node_secret("pairwise", &sealed),
            Err(AtRestError::Undecryptable)
        );
        // Not a wrapped data key either: the two uses cannot stand in for each other.
        assert!(kek.unwrap_data_key("pairwise", &sealed).is_err());
    }

    #[test]
    fn round_trip_and_binding() {
        let kek = KeyEncryptionKey::from_bytes(&[7; 32]).unwrap();
        let (dk, wrapped) = kek.new_data_key("case-1").unwrap();
        let sealed = dk.encrypt("case-1", "rec-1", b"marker-secret").unwrap();
        assert!(!sealed.windows(13).any(|w| w == b"marker-secret"));
        let again = kek.unwrap_data_key("case-1", &wrapped).unwrap();
        assert_eq!(
            again.decrypt("case-1", "rec-1", &sealed).unwrap(),
            b"marker-secret"
        );
        // Bound to case and record.
        assert_eq!(
            again.decrypt("case-2", "rec-1", &sealed),
            Err(AtRestError::Undecryptable)
        );
        assert_eq!(
            again.decrypt("case-1", "rec-2", &sealed),
            Err(AtRestError::Undecryptable)
        );
        assert!(kek.unwrap_data_key("case-2", &wrapped).is_err());
        // Another node's key cannot unwrap.
        let other = KeyEncryptionKey::from_bytes(&[8; 32]).unwrap();
        assert!(other.unwrap_data_key("case-1", &wrapped).is_err());
        // Garbage is an error, not a panic.
        assert!(kek.unwrap_data_key("case-1", &[1, 2, 3]).is_err());
        assert!(KeyEncryptionKey::from_bytes(&[1; 31]).is_err());
    }
}
