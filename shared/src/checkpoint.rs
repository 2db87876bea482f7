//! C2SP signed notes (c2sp.org/signed-note@v1.0.0) with Ed25519, checkpoints
//! (c2sp.org/tlog-checkpoint@v1.0.0) and Ed25519 cosignatures
//! (c2sp.org/tlog-cosignature@v1.0.1), byte for byte, so that any conforming
//! implementation verifies what a Corridor node signs and witnesses.
//!
//! A note is its text (ending in a newline), a blank line, and signature lines
//! `— <name> <base64(key id ‖ signature)>`. The key id is the first four bytes of
//! SHA-256(name ‖ "\n" ‖ type ‖ public key), type 0x01 for Ed25519 note signatures and
//! 0x04 for cosignatures. Signatures by unknown keys are ignored, as the spec requires.
//! Ed25519 is ring's, through [`crate::sign`]; our note texts never contain a NUL byte,
//! which every other message this key signs starts with a label containing, so the
//! signatures cannot be confused.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::canonical::sha256;
use crate::merkle::Hash;
use crate::sign::{SIGNATURE_LEN, SigningKey, VerifyingKey};

const ED25519: u8 = 0x01;
const COSIGNATURE_V1: u8 = 0x04;
/// Largest note accepted, in bytes, and most signature lines.
pub const MAX_NOTE_LEN: usize = 1 << 20;
pub const MAX_SIGNATURES: usize = 100;

/// Why a note, checkpoint or cosignature was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error(
        "note is larger than {MAX_NOTE_LEN} bytes or has more than {MAX_SIGNATURES} signatures"
    )]
    TooLarge,
    #[error("note is malformed: {0}")]
    Malformed(&'static str),
    #[error("verifier key is malformed: {0}")]
    BadVerifierKey(&'static str),
    #[error("note carries no signature by {0}")]
    NotSigned(String),
    #[error("signature by {0} does not verify")]
    BadSignature(String),
    #[error("checkpoint is malformed: {0}")]
    BadCheckpoint(&'static str),
    #[error("checkpoint origin {found:?} is not {expected:?}")]
    WrongOrigin { found: String, expected: String },
}

fn key_id(name: &str, kind: u8, key: &VerifyingKey) -> [u8; 4] {
    let mut input = Vec::with_capacity(name.len() + 34);
    input.extend_from_slice(name.as_bytes());
    input.push(b'\n');
    input.push(kind);
    input.extend_from_slice(key.as_bytes());
    let h = sha256(&input);
    [h[0], h[1], h[2], h[3]]
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('+')
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// An Ed25519 note verifier (and the name under which its key signs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: [u8; 4],
    key: VerifyingKey,
}

impl NoteVerifier {
    pub fn new(name: &str, key: VerifyingKey) -> Self {
        Self {
            name: name.to_owned(),
            id: key_id(name, ED25519, &key),
            key,
        }
    }

    /// Parses a verifier key string `name+<8 hex>+<base64(0x01 ‖ key)>`.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::BadVerifierKey("expected name+id+key"));
        };
        if !valid_name(name) {
            return Err(NoteError::BadVerifierKey("invalid name"));
        }
        let id: [u8; 4] = hex::decode(id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(NoteError::BadVerifierKey("key id must be 8 hex digits"))?;
        let raw = B64
            .decode(key)
            .map_err(|_| NoteError::BadVerifierKey("key is not base64"))?;
        let (&kind, key) = raw
            .split_first()
            .ok_or(NoteError::BadVerifierKey("empty key"))?;
        if kind != ED25519 {
            return Err(NoteError::BadVerifierKey("not an Ed25519 key"));
        }
        let key = VerifyingKey::from_bytes(key)
            .map_err(|_| NoteError::BadVerifierKey("bad Ed25519 key"))?;
        let verifier = Self::new(name, key);
        if verifier.id != id {
            return Err(NoteError::BadVerifierKey("key id does not match the key"));
        }
        Ok(verifier)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut key = vec![ED25519];
        key.extend_from_slice(self.key.as_bytes());
        write!(
            f,
            "{}+{}+{}",
            self.name,
            hex::encode(self.id),
            B64.encode(key)
        )
    }
}

/// A signature line of a note.
struct SignatureLine<'a> {
    name: &'a str,
    id: [u8; 4],
    signature: Vec<u8>,
}

/// Splits a note into its text (with final newline) and its signature lines.
fn split(note: &str) -> Result<(&str, Vec<SignatureLine<'_>>), NoteError> {
    if note.len() > MAX_NOTE_LEN {
        return Err(NoteError::TooLarge);
    }
    // signed-note: no ASCII control character other than newline, anywhere.
    if note.bytes().any(|b| b < 0x20 && b != b'\n') {
        return Err(NoteError::Malformed("control characters"));
    }
    let at = note
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
    let (text, sigs) = (&note[..=at], &note[at + 2..]);
    if !sigs.ends_with('\n') {
        return Err(NoteError::Malformed(
            "signature block must end with a newline",
        ));
    }
    let mut lines = Vec::new();
    for line in sigs[..sigs.len() - 1].split('\n') {
        if lines.len() >= MAX_SIGNATURES {
            return Err(NoteError::TooLarge);
        }
        let rest = line.strip_prefix("\u{2014} ").ok_or(NoteError::Malformed(
            "signature line must start with an em dash",
        ))?;
        let (name, sig) = rest.split_once(' ').ok_or(NoteError::Malformed(
            "signature line needs a name and a signature",
        ))?;
        if !valid_name(name) {
            return Err(NoteError::Malformed("invalid signer name"));
        }
        let raw = B64
            .decode(sig)
            .map_err(|_| NoteError::Malformed("signature is not base64"))?;
        if raw.len() < 5 {
            return Err(NoteError::Malformed("signature too short"));
        }
        lines.push(SignatureLine {
            name,
            id: [raw[0], raw[1], raw[2], raw[3]],
            signature: raw[4..].to_vec(),
        });
    }
    if lines.is_empty() {
        return Err(NoteError::Malformed("note has no signature"));
    }
    Ok((text, lines))
}

/// Signs `text` (which must end with a newline) as a note.
pub fn sign_note(text: &str, verifier: &NoteVerifier, key: &SigningKey) -> String {
    let signature = key.sign(text.as_bytes());
    let mut blob = verifier.id.to_vec();
    blob.extend_from_slice(&signature);
    format!("{text}\n\u{2014} {} {}\n", verifier.name, B64.encode(blob))
}

/// Verifies a note's signature by `verifier` and returns its text.
pub fn verify_note<'a>(note: &'a str, verifier: &NoteVerifier) -> Result<&'a str, NoteError> {
    let (text, lines) = split(note)?;
    let mut found = false;
    for line in lines
        .iter()
        .filter(|l| l.name == verifier.name && l.id == verifier.id)
    {
        found = true;
        if line.signature.len() != SIGNATURE_LEN
            || verifier
                .key
                .verify(text.as_bytes(), &line.signature)
                .is_err()
        {
            return Err(NoteError::BadSignature(verifier.name.clone()));
        }
    }
    if !found {
        return Err(NoteError::NotSigned(verifier.name.clone()));
    }
    Ok(text)
}

/// A tree head: the body of a checkpoint note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The tlog-checkpoint text: origin, size, base64 root, each ending in a newline.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// Parses a checkpoint text (extension lines are allowed and ignored, but must be
    /// non-empty; see [`Checkpoint::has_extensions`]).
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(NoteError::BadCheckpoint("text must end with a newline"))?;
        if body.split('\n').skip(3).any(str::is_empty) {
            return Err(NoteError::BadCheckpoint(
                "extension lines must be non-empty",
            ));
        }
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(NoteError::BadCheckpoint("missing origin"))?;
        let size = lines
            .next()
            .ok_or(NoteError::BadCheckpoint("missing size"))?;
        if size.is_empty()
            || (size.len() > 1 && size.starts_with('0'))
            || !size.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(NoteError::BadCheckpoint(
                "size must be a decimal without leading zeros",
            ));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| NoteError::BadCheckpoint("size out of range"))?;
        let root = lines
            .next()
            .and_then(|r| B64.decode(r).ok())
            .and_then(|r| Hash::try_from(r).ok())
            .ok_or(NoteError::BadCheckpoint(
                "root must be a base64 32-byte hash",
            ))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }

    /// Whether a checkpoint text carries extension lines, which [`Checkpoint`] drops:
    /// a cosignature made with [`cosign`] covers [`Checkpoint::body`] only, so it would
    /// not verify against such a text.
    pub fn has_extensions(text: &str) -> bool {
        text.split('\n').filter(|l| !l.is_empty()).count() > 3
    }
}

/// Signs a checkpoint as a note by the log's key; the verifier's name must be the origin.
pub fn sign(checkpoint: &Checkpoint, verifier: &NoteVerifier, key: &SigningKey) -> String {
    sign_note(&checkpoint.body(), verifier, key)
}

/// Verifies a checkpoint note by the log's key and parses it; its origin must be the
/// verifier's name.
pub fn open(note: &str, verifier: &NoteVerifier) -> Result<Checkpoint, NoteError> {
    let text = verify_note(note, verifier)?;
    let checkpoint = Checkpoint::parse(text)?;
    if checkpoint.origin != verifier.name {
        return Err(NoteError::WrongOrigin {
            found: checkpoint.origin,
            expected: verifier.name.clone(),
        });
    }
    Ok(checkpoint)
}

fn cosigned_message(text: &str, timestamp: u64) -> Vec<u8> {
    format!("cosignature/v1\ntime {timestamp}\n{text}").into_bytes()
}

/// A witness's cosignature line (without the final newline) over a checkpoint, at
/// `timestamp` (seconds since the epoch).
pub fn cosign(checkpoint: &Checkpoint, witness: &str, key: &SigningKey, timestamp: u64) -> String {
    let verifier = CosignatureVerifier::new(witness, key.verifying_key());
    let signature = key.sign(&cosigned_message(&checkpoint.body(), timestamp));
    let mut blob = verifier.id.to_vec();
    blob.extend_from_slice(&timestamp.to_be_bytes());
    blob.extend_from_slice(&signature);
    format!("\u{2014} {} {}", witness, B64.encode(blob))
}

/// Verifies Ed25519 cosignatures (tlog-cosignature v1) of one witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignatureVerifier {
    name: String,
    id: [u8; 4],
    key: VerifyingKey,
}

impl CosignatureVerifier {
    pub fn new(name: &str, key: VerifyingKey) -> Self {
        Self {
            name: name.to_owned(),
            id: key_id(name, COSIGNATURE_V1, &key),
            key,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, text: &str, line: &SignatureLine<'_>) -> Result<u64, NoteError> {
        if line.signature.len() != 8 + SIGNATURE_LEN {
            return Err(NoteError::BadSignature(self.name.clone()));
        }
        let (ts, sig) = line.signature.split_at(8);
        let timestamp = u64::from_be_bytes(
            ts.try_into()
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?,
        );
        // tlog-cosignature: the timestamp MUST NOT exceed 2^63 - 1.
        if i64::try_from(timestamp).is_err() {
            return Err(NoteError::BadSignature(self.name.clone()));
        }
        self.key
            .verify(&cosigned_message(text, timestamp), sig)
            .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
        Ok(timestamp)
    }

    /// Verifies this witness's cosignature in a note; returns its timestamp.
    pub fn verify_note(&self, note: &str) -> Result<u64, NoteError> {
        let (text, lines) = split(note)?;
        let line = lines
            .iter()
            .find(|l| l.name == self.name && l.id == self.id)
            .ok_or_else(|| NoteError::NotSigned(self.name.clone()))?;
        self.check(text, line)
    }

    /// Verifies one cosignature line (as a witness returns it) against a note's text.
    ///
    /// Exactly one line of this witness's: the line is appended to the note the log
    /// serves, so anything more (a second line claiming the log's own name, say) would let
    /// a witness make the log's checkpoint fail for every verifier.
    pub fn verify_line(&self, note: &str, line: &str) -> Result<u64, NoteError> {
        let (text, _) = split(note)?;
        // A line break anywhere (a blank line before it, say) would reshape the note the
        // line is appended to, whatever the line parses as on its own.
        if line.contains(['\n', '\r']) {
            return Err(NoteError::Malformed(
                "a cosignature must be exactly one line",
            ));
        }
        let wrapped = format!("x\n\n{line}\n");
        let (_, lines) = split(&wrapped)?;
        let [line] = lines.as_slice() else {
            return Err(NoteError::Malformed(
                "a cosignature must be exactly one line",
            ));
        };
        if line.name != self.name || line.id != self.id {
            return Err(NoteError::NotSigned(self.name.clone()));
        }
        self.check(text, line)
    }
}

/// The distinct `witnesses` that validly cosigned `note`, each with its cosignature's
/// timestamp, in the order given. A witness listed twice counts once.
pub fn cosigners<'w>(
    note: &str,
    witnesses: &'w [CosignatureVerifier],
) -> Vec<(&'w CosignatureVerifier, u64)> {
    let mut counted: Vec<(&CosignatureVerifier, u64)> = Vec::new();
    for w in witnesses {
        if counted.iter().any(|(c, _)| *c == w) {
            continue;
        }
        if let Ok(timestamp) = w.verify_note(note) {
            counted.push((w, timestamp));
        }
    }
    counted
}

/// How many distinct `witnesses` validly cosigned `note`; Err if fewer than `quorum`.
/// A witness listed twice counts once.
pub fn verify_quorum(
    note: &str,
    witnesses: &[CosignatureVerifier],
    quorum: usize,
) -> Result<usize, NoteError> {
    let count = cosigners(note, witnesses).len();
    if count < quorum {
        return Err(NoteError::NotSigned(format!(
            "{quorum} of {} witnesses (only {count})",
            witnesses.len()
        )));
    }
    Ok(count)
}

/// How far ahead of a verifier's clock a cosignature's timestamp may be, in seconds: as
/// far as envelopes may be ([`crate::envelope::MAX_CLOCK_SKEW_MS`]).
pub const MAX_COSIGNATURE_SKEW_S: u64 = crate::envelope::MAX_CLOCK_SKEW_MS as u64 / 1000;

/// Whether a cosignature dated `timestamp` (seconds) is dated in time at `now_s`, the
/// verifier's clock ([`quorum_time`] counts no other).
pub fn cosigned_in_time(timestamp: u64, now_s: u64) -> bool {
    timestamp <= now_s.saturating_add(MAX_COSIGNATURE_SKEW_S)
}

/// The latest time (seconds since the epoch) at which `quorum` of the witnesses, given by
/// their cosignatures' timestamps, vouched for a checkpoint: the `quorum`-th newest.
///
/// A witness cosigns only a checkpoint consistent with every one it saw of the log, and
/// never one smaller than the newest it saw; so at that time a quorum of witnesses knew of
/// no newer checkpoint. A log that stops signing checkpoints while it keeps writing (one
/// whose stored tree no longer matches what it signed) shows this time falling behind.
/// None with fewer timestamps than `quorum`, or a quorum of 0 (no one vouches).
///
/// A timestamp more than [`MAX_COSIGNATURE_SKEW_S`] ahead of `now_s` (the verifier's
/// clock) does not count: a witness could otherwise date its cosignature years ahead and
/// make a log that stopped look vouched for until then.
pub fn quorum_time(
    timestamps: impl IntoIterator<Item = u64>,
    quorum: usize,
    now_s: u64,
) -> Option<u64> {
    let mut newest_first: Vec<u64> = timestamps
        .into_iter()
        .filter(|t| cosigned_in_time(*t, now_s))
        .collect();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    quorum
        .checked_sub(1)
        .and_then(|i| newest_first.get(i).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> serde_json::Value {
        let path = crate::testdata::dir().join("c2sp-examples.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn c2sp_signed_note_example_verifies() {
        let ex = &examples()["signed_note_v1_example"];
        let verifier = NoteVerifier::parse(ex["verifier_key"].as_str().unwrap()).unwrap();
        assert_eq!(verifier.to_string(), ex["verifier_key"].as_str().unwrap());
        let note = ex["note"].as_str().unwrap();
        assert_eq!(
            verify_note(note, &verifier).unwrap(),
            "This is an example message.\n"
        );
        let tampered = note.replace("example message", "exemplary message");
        assert_eq!(
            verify_note(&tampered, &verifier),
            Err(NoteError::BadSignature("example.com/foo".into()))
        );
    }

    #[test]
    fn c2sp_cosignature_example_parses() {
        let note = examples()["tlog_cosignature_v1_example"]["checkpoint"]
            .as_str()
            .unwrap()
            .to_owned();
        let (text, lines) = split(&note).unwrap();
        let cp = Checkpoint::parse(text).unwrap();
        assert_eq!(
            (cp.origin.as_str(), cp.size),
            ("example.com/behind-the-sofa", 20852163)
        );
        let witness = lines
            .iter()
            .find(|l| l.name == "witness.example.com/w1")
            .unwrap();
        assert_eq!(witness.signature.len(), 72);
        assert_eq!(
            u64::from_be_bytes(witness.signature[..8].try_into().unwrap()),
            1679315147
        );
    }

    fn fixture() -> (SigningKey, NoteVerifier, Checkpoint) {
        let key = SigningKey::from_seed(&[7; 32]).unwrap();
        let verifier = NoteVerifier::new("corridor.network/demo/log/a", key.verifying_key());
        let cp = Checkpoint {
            origin: verifier.name().into(),
            size: 42,
            root: [9; 32],
        };
        (key, verifier, cp)
    }

    #[test]
    fn checkpoints_round_trip_and_tampering_fails() {
        let (key, verifier, cp) = fixture();
        let note = sign(&cp, &verifier, &key);
        assert_eq!(open(&note, &verifier).unwrap(), cp);
        assert!(NoteVerifier::parse(&verifier.to_string()).is_ok());
        for (from, to) in [
            ("\n42\n", "\n43\n"),
            ("corridor.network", "corridor.networks"),
        ] {
            assert!(
                open(&note.replacen(from, to, 1), &verifier).is_err(),
                "{from}"
            );
        }
        let mut other = cp.clone();
        other.root[0] ^= 1;
        let forged = sign_note(
            &other.body(),
            &verifier,
            &SigningKey::from_seed(&[8; 32]).unwrap(),
        );
        assert!(open(&forged, &verifier).is_err());
        let stranger = NoteVerifier::new("someone.else", key.verifying_key());
        assert!(matches!(
            open(&note, &stranger),
            Err(NoteError::NotSigned(_))
        ));
    }

    #[test]
    fn cosignatures_round_trip_and_tampering_fails() {
        let (key, verifier, cp) = fixture();
        let note = sign(&cp, &verifier, &key);
        let wkey = SigningKey::from_seed(&[5; 32]).unwrap();
        let line = cosign(&cp, "corridor.network/demo/witness/b", &wkey, 1_700_000_000);
        let w = CosignatureVerifier::new("corridor.network/demo/witness/b", wkey.verifying_key());
        assert_eq!(w.verify_line(&note, &line).unwrap(), 1_700_000_000);
        let cosigned = format!("{note}{line}\n");
        assert_eq!(w.verify_note(&cosigned).unwrap(), 1_700_000_000);
        assert_eq!(verify_quorum(&cosigned, std::slice::from_ref(&w), 1), Ok(1));
        assert!(verify_quorum(&note, std::slice::from_ref(&w), 1).is_err());
        // The log signature still verifies with the cosignature appended.
        assert!(open(&cosigned, &verifier).is_ok());
        // A cosignature over another tree, or with another timestamp, fails.
        let mut other = cp.clone();
        other.size = 43;
        let other_note = sign(&other, &verifier, &key);
        assert!(w.verify_line(&other_note, &line).is_err());
        let mut blob = B64.decode(line.rsplit_once(' ').unwrap().1).unwrap();
        blob[11] ^= 1;
        let bad = format!(
            "\u{2014} corridor.network/demo/witness/b {}",
            B64.encode(blob)
        );
        assert!(w.verify_line(&note, &bad).is_err());
        // The same witness listed twice is one cosignature, not two.
        assert!(verify_quorum(&cosigned, &[w.clone(), w.clone()], 2).is_err());
        assert_eq!(verify_quorum(&cosigned, &[w.clone(), w.clone()], 1), Ok(1));
        // A timestamp above 2^63 - 1 is refused even when signed.
        let late = cosign(&cp, "corridor.network/demo/witness/b", &wkey, u64::MAX);
        assert!(w.verify_line(&note, &late).is_err());
        // A valid cosignature with a line smuggled after it, here a bad signature in the
        // log's own name that would break the log's note for every verifier, is refused.
        let log_line = note.lines().last().unwrap();
        let forged_log_line = format!("{}A", &log_line[..log_line.len() - 1]);
        let smuggled = format!("{line}\n{forged_log_line}");
        assert_eq!(
            w.verify_line(&note, &smuggled),
            Err(NoteError::Malformed(
                "a cosignature must be exactly one line"
            ))
        );
        // So is one with a blank line before it, which would move the log's own signature
        // into the note's text once appended.
        for before in ["\n", "\u{2014} x y\n\n", "\r\n"] {
            assert!(
                w.verify_line(&note, &format!("{before}{line}")).is_err(),
                "{before:?}"
            );
        }
        // A note signature (type 0x01) by the same key is not a cosignature (type 0x04).
        let as_note = NoteVerifier::new("corridor.network/demo/witness/b", wkey.verifying_key());
        assert!(as_note.id != w.id);
    }

    #[test]
    fn the_quorum_time_is_the_quorums_oldest_of_the_newest_cosignatures() {
        assert_eq!(quorum_time([5, 9, 7], 1, 10), Some(9));
        assert_eq!(quorum_time([5, 9, 7], 2, 10), Some(7));
        assert_eq!(quorum_time([5, 9, 7], 3, 10), Some(5));
        assert_eq!(quorum_time([5, 9, 7], 4, 10), None, "too few cosigned");
        assert_eq!(quorum_time([5, 9, 7], 0, 10), None, "no one vouches");
        assert_eq!(quorum_time([], 1, 10), None);
        // A cosignature dated further ahead than clocks may differ does not count.
        let ahead = 10 + MAX_COSIGNATURE_SKEW_S;
        assert_eq!(quorum_time([5, ahead], 1, 10), Some(ahead));
        assert_eq!(quorum_time([5, ahead + 1], 1, 10), Some(5));
        assert_eq!(quorum_time([u64::MAX, 9], 2, 10), None);
    }

    #[test]
    fn cosigners_carry_their_timestamps_and_count_once() {
        let (key, verifier, cp) = fixture();
        let note = sign(&cp, &verifier, &key);
        let wkey = SigningKey::from_seed(&[5; 32]).unwrap();
        let name = "corridor.network/demo/witness/b";
        let w = CosignatureVerifier::new(name, wkey.verifying_key());
        let cosigned = format!("{note}{}\n", cosign(&cp, name, &wkey, 1_700_000_000));
        let twice = [w.clone(), w.clone()];
        let found = cosigners(&cosigned, &twice);
        assert_eq!(found.len(), 1, "a witness listed twice counts once");
        assert_eq!(found[0].1, 1_700_000_000);
        assert!(cosigners(&note, std::slice::from_ref(&w)).is_empty());
    }

    #[test]
    fn malformed_notes_are_errors() {
        let (_, verifier, _) = fixture();
        for bad in [
            "",
            "text\n",
            "text\n\n",
            "text\n\n— x\n",
            "text\n\n- x AAAA\n",
            "text\n\n— x !!!\n",
            "t\0\n\n— x AAAAAAA=\n",
        ] {
            assert!(verify_note(bad, &verifier).is_err(), "{bad:?}");
        }
        assert!(NoteVerifier::parse("a+b").is_err());
        assert!(NoteVerifier::parse("a+00000000+AQ==").is_err());
        assert!(Checkpoint::parse("o\n01\nAAAA\n").is_err());
        let root = B64.encode([0u8; 32]);
        assert!(Checkpoint::parse(&format!("o\n1\n{root}\n")).is_ok());
        assert!(Checkpoint::parse(&format!("o\n1\n{root}")).is_err());
        assert!(Checkpoint::parse(&format!("o\n1\n{root}\n\next\n")).is_err());
        assert!(Checkpoint::has_extensions(&format!("o\n1\n{root}\next\n")));
        assert!(!Checkpoint::has_extensions(&format!("o\n1\n{root}\n")));
        // Any ASCII control character other than newline.
        for c in ['\t', '\r', '\u{1b}', '\0'] {
            let (key, verifier, _) = fixture();
            let note = sign_note(&format!("a{c}b\n"), &verifier, &key);
            assert_eq!(
                verify_note(&note, &verifier),
                Err(NoteError::Malformed("control characters")),
                "{c:?}"
            );
        }
        assert!(Checkpoint::parse("o\n1\nAAAA\n").is_err());
        assert_eq!(
            verify_note(&"x".repeat(MAX_NOTE_LEN + 1), &verifier),
            Err(NoteError::TooLarge)
        );
    }
}
