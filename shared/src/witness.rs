//! The witness rule of c2sp.org/tlog-witness@v1.0.0 as pure logic: given what a witness
//! stored for a log, a new signed checkpoint, the size the log believes the witness has,
//! and a consistency proof, decide whether to cosign.
//!
//! A log at size 0 (nothing stored yet, or an empty checkpoint cosigned) is consistent
//! with any later checkpoint, given an empty proof: the witness convention for the empty
//! tree, applied here rather than in [`merkle::verify_consistency`], which refuses proofs
//! from size 0. The caller stores the new state atomically (compare-and-swap on the old
//! size) and only then returns the cosignature.

use crate::checkpoint::{self, Checkpoint, NoteError, NoteVerifier};
use crate::merkle::{self, Hash};

/// What a witness stores per log: the last checkpoint it cosigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessState {
    pub size: u64,
    pub root: Hash,
}

/// Why a witness refuses to cosign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessError {
    #[error("checkpoint is not validly signed by the log: {0}")]
    BadSignature(NoteError),
    #[error("the witness's size is {witness_size}, not the old size given")]
    Conflict { witness_size: u64 },
    #[error("checkpoint size {new} is smaller than the old size {old}")]
    Shrinks { old: u64, new: u64 },
    #[error("checkpoint of size {size} has a different root than the one already cosigned: a fork")]
    Fork { size: u64 },
    #[error("checkpoint has extension lines, which this witness does not cosign")]
    ExtensionLines,
    #[error("checkpoint of size 0 does not carry the empty tree's root")]
    EmptyTreeRoot,
    #[error("checkpoint is not consistent with the one cosigned at size {old}: {reason}")]
    Inconsistent {
        old: u64,
        reason: crate::merkle::MerkleError,
    },
}

/// Decides whether to cosign `note` for the log `origin` signed by `log_key`.
pub fn add_checkpoint(
    origin: &str,
    log_key: &NoteVerifier,
    stored: Option<&WitnessState>,
    old_size: u64,
    proof: &[Hash],
    note: &str,
) -> Result<Checkpoint, WitnessError> {
    let text = checkpoint::verify_note(note, log_key).map_err(WitnessError::BadSignature)?;
    let checkpoint = Checkpoint::parse(text).map_err(WitnessError::BadSignature)?;
    // The cosignature covers `checkpoint.body()`; for a text with extension lines it
    // would not verify against the note the log holds.
    if checkpoint.body() != text {
        return Err(WitnessError::ExtensionLines);
    }
    if checkpoint.origin != origin || log_key.name() != origin {
        return Err(WitnessError::BadSignature(NoteError::WrongOrigin {
            found: checkpoint.origin,
            expected: origin.to_owned(),
        }));
    }
    let witness_size = stored.map_or(0, |s| s.size);
    if old_size != witness_size {
        return Err(WitnessError::Conflict { witness_size });
    }
    // Every size-0 checkpoint of a log names the same tree; any other root would be a
    // fork that no consistency proof can reveal.
    if checkpoint.size == 0 && checkpoint.root != merkle::root(&[]) {
        return Err(WitnessError::EmptyTreeRoot);
    }
    if checkpoint.size < old_size {
        return Err(WitnessError::Shrinks {
            old: old_size,
            new: checkpoint.size,
        });
    }
    match stored {
        // The empty tree is a prefix of every tree; tlog-witness: the proof MUST be empty.
        _ if old_size == 0 && !proof.is_empty() => {
            return Err(WitnessError::Inconsistent {
                old: 0,
                reason: merkle::MerkleError::WrongProofLength,
            });
        }
        _ if old_size == 0 => {}
        None => {}
        Some(state) if state.size == checkpoint.size && state.root != checkpoint.root => {
            return Err(WitnessError::Fork {
                size: checkpoint.size,
            });
        }
        Some(state) if state.size == checkpoint.size => {}
        Some(state) => merkle::verify_consistency(
            state.size,
            checkpoint.size,
            proof,
            &state.root,
            &checkpoint.root,
        )
        .map_err(|reason| WitnessError::Inconsistent {
            old: state.size,
            reason,
        })?,
    }
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{leaf_hash, root};
    use crate::sign::SigningKey;

    const ORIGIN: &str = "corridor.network/demo/log/a";

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    fn note(key: &SigningKey, size: u64, root: Hash) -> String {
        let v = NoteVerifier::new(ORIGIN, key.verifying_key());
        checkpoint::sign(
            &Checkpoint {
                origin: ORIGIN.into(),
                size,
                root,
            },
            &v,
            key,
        )
    }

    /// A consistency proof computed from scratch (RFC 9162 2.1.4.1) for the tests.
    fn proof(m: usize, all: &[Hash]) -> Vec<Hash> {
        fn sub(m: usize, d: &[Hash], complete: bool) -> Vec<Hash> {
            let n = d.len();
            if m == n {
                return if complete { vec![] } else { vec![root(d)] };
            }
            let k = (n - 1).next_power_of_two() / if (n - 1).is_power_of_two() { 1 } else { 2 };
            let k = if k >= n { k / 2 } else { k };
            if m <= k {
                let mut p = sub(m, &d[..k], complete);
                p.push(root(&d[k..]));
                p
            } else {
                let mut p = sub(m - k, &d[k..], false);
                p.push(root(&d[..k]));
                p
            }
        }
        sub(m, all, true)
    }

    /// The empty tree is the same tree for everyone: a size-0 checkpoint with another
    /// root is refused, with or without anything cosigned before.
    #[test]
    fn an_empty_tree_has_one_root() {
        let key = SigningKey::from_seed(&[1; 32]).unwrap();
        let log = NoteVerifier::new(ORIGIN, key.verifying_key());
        let empty = add_checkpoint(ORIGIN, &log, None, 0, &[], &note(&key, 0, root(&[])));
        assert_eq!(empty.map(|c| c.size), Ok(0));
        let state = WitnessState {
            size: 0,
            root: root(&[]),
        };
        for stored in [None, Some(&state)] {
            assert_eq!(
                add_checkpoint(ORIGIN, &log, stored, 0, &[], &note(&key, 0, [7; 32])),
                Err(WitnessError::EmptyTreeRoot)
            );
        }
    }

    #[test]
    fn cosigns_first_and_consistent_checkpoints_refuses_the_rest() {
        let key = SigningKey::from_seed(&[1; 32]).unwrap();
        let log = NoteVerifier::new(ORIGIN, key.verifying_key());
        let l = leaves(10);
        // First checkpoint: nothing stored, old size 0.
        let first =
            add_checkpoint(ORIGIN, &log, None, 0, &[], &note(&key, 4, root(&l[..4]))).unwrap();
        let state = WitnessState {
            size: first.size,
            root: first.root,
        };
        // Consistent growth.
        let p = proof(4, &l);
        let next =
            add_checkpoint(ORIGIN, &log, Some(&state), 4, &p, &note(&key, 10, root(&l))).unwrap();
        assert_eq!(next.size, 10);
        // Wrong old size: conflict, telling the witness's size.
        assert_eq!(
            add_checkpoint(ORIGIN, &log, Some(&state), 2, &p, &note(&key, 10, root(&l))),
            Err(WitnessError::Conflict { witness_size: 4 })
        );
        // A tree that is not an extension.
        let mut forked = l.clone();
        forked[1] = leaf_hash(b"rewritten");
        assert!(matches!(
            add_checkpoint(
                ORIGIN,
                &log,
                Some(&state),
                4,
                &proof(4, &forked),
                &note(&key, 10, root(&forked))
            ),
            Err(WitnessError::Inconsistent { .. })
        ));
        // Same size, other root.
        assert_eq!(
            add_checkpoint(
                ORIGIN,
                &log,
                Some(&state),
                4,
                &[],
                &note(&key, 4, root(&forked[..4]))
            ),
            Err(WitnessError::Fork { size: 4 })
        );
        // Smaller than what was cosigned.
        assert!(matches!(
            add_checkpoint(
                ORIGIN,
                &log,
                Some(&state),
                4,
                &[],
                &note(&key, 3, root(&l[..3]))
            ),
            Err(WitnessError::Shrinks { .. })
        ));
        // Signed by someone else, or for another origin.
        let other = SigningKey::from_seed(&[2; 32]).unwrap();
        assert!(matches!(
            add_checkpoint(
                ORIGIN,
                &log,
                Some(&state),
                4,
                &p,
                &note(&other, 10, root(&l))
            ),
            Err(WitnessError::BadSignature(_))
        ));
        assert!(matches!(
            add_checkpoint(
                "corridor.network/demo/log/b",
                &log,
                Some(&state),
                4,
                &p,
                &note(&key, 10, root(&l))
            ),
            Err(WitnessError::BadSignature(_))
        ));
    }

    #[test]
    fn the_empty_tree_needs_an_empty_proof_and_precedes_everything() {
        let key = SigningKey::from_seed(&[1; 32]).unwrap();
        let log = NoteVerifier::new(ORIGIN, key.verifying_key());
        let l = leaves(6);
        let six = note(&key, 6, root(&l));
        // Nothing stored: a proof from size 0 must be empty.
        assert!(matches!(
            add_checkpoint(ORIGIN, &log, None, 0, &[[0; 32]], &six),
            Err(WitnessError::Inconsistent { old: 0, .. })
        ));
        // An empty checkpoint cosigned before: growth from it needs no proof.
        let empty = WitnessState {
            size: 0,
            root: root(&[]),
        };
        assert_eq!(
            add_checkpoint(ORIGIN, &log, Some(&empty), 0, &[], &six).map(|c| c.size),
            Ok(6)
        );
    }

    #[test]
    fn checkpoints_with_extension_lines_are_refused() {
        let key = SigningKey::from_seed(&[1; 32]).unwrap();
        let log = NoteVerifier::new(ORIGIN, key.verifying_key());
        let cp = Checkpoint {
            origin: ORIGIN.into(),
            size: 1,
            root: leaf_hash(b"x"),
        };
        let text = format!("{}extension\n", cp.body());
        let note = checkpoint::sign_note(&text, &log, &key);
        assert_eq!(
            add_checkpoint(ORIGIN, &log, None, 0, &[], &note),
            Err(WitnessError::ExtensionLines)
        );
    }
}
