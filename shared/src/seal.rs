//! Sealing payloads to a recipient with HPKE base mode (RFC 9180):
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, via the `hpke` crate.
//!
//! Plaintexts are padded to a fixed set of size buckets before sealing so that the
//! ciphertext length reveals only the bucket, not the size of what a referral discloses.
//! Padding is ISO/IEC 7816-4 style: the payload, one `0x80` byte, then zeros.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hpke::{Deserializable as _, Kem as _, OpModeR, OpModeS, Serializable as _};

use crate::canonical::label;

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Padded plaintext sizes, in bytes. A payload of `n` bytes is padded to the smallest
/// bucket of at least `n + 1` bytes.
pub const PADDING_BUCKETS: [usize; 6] = [1024, 4096, 16384, 65536, 131072, 262144];

/// Length of an X25519 key and of the encapsulated key, in bytes.
pub const KEY_LEN: usize = 32;

/// Why sealing or opening failed. Deliberately coarse on the opening side: the reason a
/// ciphertext does not open is not something to tell a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("payload of {0} bytes exceeds the largest padding bucket")]
    PayloadTooLarge(usize),
    #[error("key is not valid base64")]
    NotBase64,
    #[error("key or encapsulated key is malformed")]
    MalformedKey,
    #[error("sealing failed")]
    SealFailed,
    #[error("ciphertext does not open with this key and header")]
    OpenFailed,
    #[error("padding of the opened payload is malformed")]
    BadPadding,
}

/// An organisation's X25519 private key for opening sealed payloads.
pub struct SealingKey {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: SealingPublicKey,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl SealingKey {
    /// Derives a key pair from at least 32 bytes of secret input keying material
    /// (RFC 9180 DeriveKeyPair).
    pub fn derive(ikm: &[u8]) -> Self {
        let (secret, public) = Kem::derive_keypair(ikm);
        Self {
            secret,
            public: SealingPublicKey(public),
        }
    }

    /// Loads a private key from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let secret = <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map_err(|_| SealError::MalformedKey)?;
        let public = SealingPublicKey(Kem::sk_to_pk(&secret));
        Ok(Self { secret, public })
    }

    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        let bytes = B64.decode(text.trim()).map_err(|_| SealError::NotBase64)?;
        Self::from_bytes(&bytes)
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.secret.to_bytes())
    }

    pub fn public_key(&self) -> &SealingPublicKey {
        &self.public
    }

    /// Opens a ciphertext sealed to this key with the given associated data and removes
    /// the padding.
    pub fn open(
        &self,
        encapsulated_key: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let padded = self.open_raw(label::SEAL_INFO, encapsulated_key, ciphertext, aad)?;
        unpad(padded)
    }

    /// HPKE single-shot open with an explicit `info`, without unpadding.
    pub fn open_raw(
        &self,
        info: &[u8],
        encapsulated_key: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(encapsulated_key)
            .map_err(|_| SealError::MalformedKey)?;
        hpke::single_shot_open::<Aead, Kdf, Kem>(
            &OpModeR::Base,
            &self.secret,
            &enc,
            info,
            ciphertext,
            aad,
        )
        .map_err(|_| SealError::OpenFailed)
    }
}

/// An organisation's X25519 public key, to which payloads are sealed.
#[derive(Clone, PartialEq, Eq)]
pub struct SealingPublicKey(<Kem as hpke::Kem>::PublicKey);

impl std::fmt::Debug for SealingPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealingPublicKey({})", self.to_base64())
    }
}

impl SealingPublicKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        <Kem as hpke::Kem>::PublicKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| SealError::MalformedKey)
    }

    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        let bytes = B64.decode(text.trim()).map_err(|_| SealError::NotBase64)?;
        Self::from_bytes(&bytes)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes().to_vec()
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// Pads `payload` to its bucket and seals it with `aad` as associated data. Returns
    /// the encapsulated key and the ciphertext.
    pub fn seal(&self, payload: &[u8], aad: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SealError> {
        let padded = pad(payload)?;
        self.seal_raw(label::SEAL_INFO, &padded, aad)
    }

    /// HPKE single-shot seal with an explicit `info`, without padding.
    pub fn seal_raw(
        &self,
        info: &[u8],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), SealError> {
        let (enc, ciphertext) =
            hpke::single_shot_seal::<Aead, Kdf, Kem>(&OpModeS::Base, &self.0, info, plaintext, aad)
                .map_err(|_| SealError::SealFailed)?;
        Ok((enc.to_bytes().to_vec(), ciphertext))
    }
}

/// The padded length for a payload of `len` bytes.
pub fn bucket_for(len: usize) -> Result<usize, SealError> {
    PADDING_BUCKETS
        .iter()
        .copied()
        .find(|bucket| *bucket > len)
        .ok_or(SealError::PayloadTooLarge(len))
}

fn pad(payload: &[u8]) -> Result<Vec<u8>, SealError> {
    let bucket = bucket_for(payload.len())?;
    let mut padded = Vec::with_capacity(bucket);
    padded.extend_from_slice(payload);
    padded.push(0x80);
    padded.resize(bucket, 0);
    Ok(padded)
}

fn unpad(mut padded: Vec<u8>) -> Result<Vec<u8>, SealError> {
    if !PADDING_BUCKETS.contains(&padded.len()) {
        return Err(SealError::BadPadding);
    }
    let marker = padded
        .iter()
        .rposition(|b| *b != 0)
        .ok_or(SealError::BadPadding)?;
    if padded[marker] != 0x80 {
        return Err(SealError::BadPadding);
    }
    padded.truncate(marker);
    Ok(padded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpke::rand_core::{TryCryptoRng, TryRng};

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).expect("test vector hex")
    }

    // RFC 9180 appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
    // ChaCha20Poly1305, base mode, sequence number 0.
    const INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
    const IKM_E: &str = "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b";
    const IKM_R: &str = "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df";
    const PK_RM: &str = "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
    const SK_RM: &str = "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
    const ENC: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
    const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
    const AAD: &str = "436f756e742d30";
    const CT: &str = "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28";

    /// Hands out fixed bytes, so that the ephemeral key is the vector's ikmE.
    struct FixedRng(Vec<u8>);
    impl TryRng for FixedRng {
        type Error = core::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            unreachable!("only fill_bytes is used")
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            unreachable!("only fill_bytes is used")
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            let n = dst.len();
            dst.copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(())
        }
    }
    impl TryCryptoRng for FixedRng {}

    #[test]
    fn rfc9180_a21_derive_keypair() {
        let key = SealingKey::derive(&unhex(IKM_R));
        assert_eq!(key.public_key().to_bytes(), unhex(PK_RM));
        // x25519-dalek stores the scalar clamped (RFC 7748); the vector's skRm is not.
        let mut clamped = unhex(SK_RM);
        clamped[0] &= 248;
        clamped[31] = (clamped[31] & 127) | 64;
        assert_eq!(key.secret.to_bytes().as_slice(), clamped);
    }

    #[test]
    fn rfc9180_a21_seal_matches_vector() {
        let recipient = SealingPublicKey::from_bytes(&unhex(PK_RM)).unwrap();
        let (enc, ct) = hpke::single_shot_seal_with_rng::<Aead, Kdf, Kem>(
            &OpModeS::Base,
            &recipient.0,
            &unhex(INFO),
            &unhex(PT),
            &unhex(AAD),
            &mut FixedRng(unhex(IKM_E)),
        )
        .unwrap();
        assert_eq!(enc.to_bytes().as_slice(), unhex(ENC));
        assert_eq!(ct, unhex(CT));
    }

    #[test]
    fn rfc9180_a21_open_matches_vector() {
        let key = SealingKey::from_bytes(&unhex(SK_RM)).unwrap();
        let pt = key
            .open_raw(&unhex(INFO), &unhex(ENC), &unhex(CT), &unhex(AAD))
            .unwrap();
        assert_eq!(pt, unhex(PT));
        // Wrong associated data does not open.
        assert_eq!(
            key.open_raw(&unhex(INFO), &unhex(ENC), &unhex(CT), b"Count-1"),
            Err(SealError::OpenFailed)
        );
    }

    #[test]
    fn seal_open_round_trip_pads_to_bucket() {
        let key = SealingKey::derive(&[9u8; 32]);
        for len in [0usize, 1, 1023, 1024, 5000, MAX] {
            let payload = vec![0xAB; len];
            let (enc, ct) = key.public_key().seal(&payload, b"aad").unwrap();
            assert_eq!(ct.len(), bucket_for(len).unwrap() + 16, "len {len}");
            assert_eq!(key.open(&enc, &ct, b"aad").unwrap(), payload);
        }
        assert_eq!(
            key.public_key().seal(&vec![0; MAX + 1], b"aad"),
            Err(SealError::PayloadTooLarge(MAX + 1))
        );
    }
    const MAX: usize = crate::MAX_PAYLOAD_LEN;

    #[test]
    fn payloads_ending_in_zero_or_marker_bytes_survive_padding() {
        for payload in [vec![0u8; 10], vec![0x80; 10], vec![1, 0x80, 0]] {
            assert_eq!(unpad(pad(&payload).unwrap()).unwrap(), payload);
        }
        assert_eq!(unpad(vec![0; 1024]), Err(SealError::BadPadding));
        assert_eq!(unpad(vec![1; 1024]), Err(SealError::BadPadding));
        assert_eq!(unpad(vec![0x80; 1000]), Err(SealError::BadPadding));
    }

    #[test]
    fn malformed_keys_are_errors_not_panics() {
        let key = SealingKey::derive(&[9u8; 32]);
        assert_eq!(
            key.open(&[1, 2, 3], &[0; 64], b""),
            Err(SealError::MalformedKey)
        );
        assert!(SealingPublicKey::from_bytes(&[0; 7]).is_err());
        assert!(SealingKey::from_base64("???").is_err());
    }
}
