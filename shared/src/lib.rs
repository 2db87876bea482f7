//! # corridor — the protocol core
//!
//! Everything Corridor nodes must agree on, without any I/O: organisation ids and the
//! federation directory, Ed25519 signatures over domain-separated canonical bytes, HPKE
//! sealing of payloads (RFC 9180), envelopes and receipts. The node daemon and the CLI call
//! this crate; neither re-implements a rule that lives here.
//!
//! Time is always passed in by the caller (milliseconds since the Unix epoch) so that every
//! rule can be tested deterministically.

pub mod access;
pub mod at_rest;
pub mod audit;
pub mod canonical;
pub mod caseref;
pub mod checkpoint;
pub mod consent;
pub mod country;
pub mod directory;
pub mod envelope;
pub mod fields;
pub mod merkle;
pub mod org;
pub mod profile;
pub mod purge;
pub mod purpose;
pub mod receipt;
pub mod seal;
pub mod sign;
pub mod utc;
pub mod witness;

pub use access::{LocalAction, LocalRole};
pub use caseref::PairwiseKey;
pub use consent::{
    AfterNarrowing, ConsentReceipt, ConsentScope, ConsentTerms, GateRefusal, Reason,
    TermsConfirmation,
};
pub use directory::{Directory, DirectoryError, Member, Role};
pub use envelope::{
    Envelope, EnvelopeError, EnvelopeHeader, MessageId, MessageKind, OpenedEnvelope,
    VerifiedEnvelope,
};
pub use fields::{Field, FieldValueError, Sensitivity};
pub use org::{OrgId, OrgIdError};
pub use purge::PurgeReceipt;
pub use purpose::{Purpose, UnknownPurpose};
pub use receipt::{Receipt, ReceiptError};
pub use seal::{SealError, SealingKey, SealingPublicKey};
pub use sign::{KeyError, SigningKey, VerifyingKey};

/// Largest plaintext payload an envelope may carry, in bytes.
pub const MAX_PAYLOAD_LEN: usize = seal::PADDING_BUCKETS[seal::PADDING_BUCKETS.len() - 1] - 1;

/// Largest encoded envelope a node accepts on the wire, in bytes: the largest sealed
/// bucket plus generous room for the header, key and signature.
pub const MAX_ENVELOPE_WIRE_LEN: usize = MAX_PAYLOAD_LEN + 1 + 16 + 4096;

/// Whether `text` is exactly `len` lowercase hex digits: the form of the random part of
/// the opaque identifiers peers exchange.
pub(crate) fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where the published test vectors live: `$CORRIDOR_TESTDATA` if set, else
/// `../shared/testdata` beside the project's root.
#[cfg(test)]
pub(crate) mod testdata {
    use std::path::{Path, PathBuf};

    pub fn dir() -> PathBuf {
        let dir = std::env::var_os("CORRIDOR_TESTDATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata"));
        assert!(
            dir.is_dir(),
            "test vectors not found at {}: set CORRIDOR_TESTDATA to the shared testdata directory",
            dir.display()
        );
        dir
    }
}
