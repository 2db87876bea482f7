//! Ed25519 signing keys (ring) and domain-separated signatures.
//!
//! A signing key is stored as its 32-byte RFC 8032 seed; a verifying key is the 32-byte
//! public key. Every signature in Corridor is made over bytes that start with a
//! domain-separation label from [`crate::canonical::label`], so a signature over one kind
//! of message can never be presented as a signature over another.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// Length of an Ed25519 seed, public key and signature, in bytes.
pub const SEED_LEN: usize = 32;
pub const PUBLIC_KEY_LEN: usize = 32;
pub const SIGNATURE_LEN: usize = 64;

/// Why a key could not be loaded or a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64")]
    NotBase64,
    #[error("key has {actual} bytes, expected {expected}")]
    BadLength { expected: usize, actual: usize },
    #[error("key is not a valid Ed25519 key")]
    Invalid,
    #[error("signature does not verify")]
    BadSignature,
}

/// An Ed25519 signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    seed: [u8; SEED_LEN],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the seed.
        f.debug_struct("SigningKey")
            .field("public", &self.verifying_key())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Builds a key from its RFC 8032 seed.
    pub fn from_seed(seed: &[u8]) -> Result<Self, KeyError> {
        let seed: [u8; SEED_LEN] = seed.try_into().map_err(|_| KeyError::BadLength {
            expected: SEED_LEN,
            actual: seed.len(),
        })?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| KeyError::Invalid)?;
        Ok(Self { pair, seed })
    }

    /// Parses a base64-encoded seed (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = B64.decode(text.trim()).map_err(|_| KeyError::NotBase64)?;
        Self::from_seed(&bytes)
    }

    /// The seed, base64-encoded, for writing to a key file.
    pub fn to_base64(&self) -> String {
        B64.encode(self.seed)
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        let mut public = [0u8; PUBLIC_KEY_LEN];
        public.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(public)
    }

    /// Signs `message`, which must already start with a domain-separation label.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyingKey([u8; PUBLIC_KEY_LEN]);

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", self.to_base64())
    }
}

impl VerifyingKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let key: [u8; PUBLIC_KEY_LEN] = bytes.try_into().map_err(|_| KeyError::BadLength {
            expected: PUBLIC_KEY_LEN,
            actual: bytes.len(),
        })?;
        Ok(Self(key))
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = B64.decode(text.trim()).map_err(|_| KeyError::NotBase64)?;
        Self::from_bytes(&bytes)
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// Verifies an Ed25519 signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .map_err(|_| KeyError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rfc8032Vector {
        secret: &'static str,
        public: &'static str,
        message: &'static str,
        signature: &'static str,
    }

    /// RFC 8032 section 7.1, TEST 1, TEST 2, TEST 3 and TEST SHA(abc).
    const VECTORS: &[Rfc8032Vector] = &[
        Rfc8032Vector {
            secret: "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            public: "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            message: "",
            signature: "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        },
        Rfc8032Vector {
            secret: "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            public: "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            message: "72",
            signature: "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        },
        Rfc8032Vector {
            secret: "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            public: "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            message: "af82",
            signature: "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        },
        Rfc8032Vector {
            secret: "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
            public: "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
            message: "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
            signature: "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
        },
    ];

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).expect("test vector hex")
    }

    #[test]
    fn rfc8032_vectors_sign_and_verify() {
        for v in VECTORS {
            let key = SigningKey::from_seed(&unhex(v.secret)).unwrap();
            assert_eq!(key.verifying_key().as_bytes().as_slice(), unhex(v.public));
            let sig = key.sign(&unhex(v.message));
            assert_eq!(sig.as_slice(), unhex(v.signature));
            let public = VerifyingKey::from_bytes(&unhex(v.public)).unwrap();
            public.verify(&unhex(v.message), &sig).unwrap();
        }
    }

    #[test]
    fn rfc8032_signature_rejected_on_other_message_or_flipped_bit() {
        for v in VECTORS {
            let public = VerifyingKey::from_bytes(&unhex(v.public)).unwrap();
            let mut message = unhex(v.message);
            message.push(0);
            assert_eq!(
                public.verify(&message, &unhex(v.signature)),
                Err(KeyError::BadSignature)
            );
            let mut sig = unhex(v.signature);
            sig[0] ^= 1;
            assert_eq!(
                public.verify(&unhex(v.message), &sig),
                Err(KeyError::BadSignature)
            );
        }
    }

    #[test]
    fn base64_round_trip_and_bad_input() {
        let key = SigningKey::from_seed(&[7u8; 32]).unwrap();
        let again = SigningKey::from_base64(&format!("{}\n", key.to_base64())).unwrap();
        assert_eq!(key.verifying_key(), again.verifying_key());
        assert_eq!(
            SigningKey::from_base64("not base64!").unwrap_err(),
            KeyError::NotBase64
        );
        assert_eq!(
            SigningKey::from_seed(&[1u8; 31]).unwrap_err(),
            KeyError::BadLength {
                expected: 32,
                actual: 31
            }
        );
        assert!(!format!("{key:?}").contains(&key.to_base64()));
    }
}
