//! RFC 9162 Merkle trees: hashing, proof verification, and — for a log that keeps every
//! stored hash in a table — appending and proof generation with O(log n) hash reads.
//!
//! Proof generation and the stored-hash layout follow Go's `golang.org/x/mod/sumdb/tlog`
//! (stored-hash index numbering, `StoredHashesForRecordHash`, `TreeHash`, `ProveRecord`,
//! `ProveTree`). Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2 and rejects
//! malformed input (wrong lengths, indexes out of range) with an error, never a panic.
//!
//! Empty-tree rule: the root of the empty tree is SHA-256(""). [`verify_consistency`]
//! follows RFC 9162 and the transparency-dev vectors and refuses a proof *from* size 0;
//! the witness logic (c2sp.org/tlog-witness) treats size 0 with an empty proof as
//! consistent with anything and handles that case itself, before calling this module.

use crate::canonical::sha256;

pub type Hash = [u8; 32];

/// Largest tree the generation functions accept. Far beyond any real log, it keeps every
/// stored-hash index (about twice the tree size) and every shift within a `u64`.
pub const MAX_TREE_SIZE: u64 = 1 << 62;

/// Why a proof does not verify or a tree operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("index {index} is not in a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("size {old} is larger than size {new}")]
    SizesReversed { old: u64, new: u64 },
    #[error("a consistency proof from the empty tree is not defined")]
    FromEmptyTree,
    #[error("proof has the wrong number of hashes")]
    WrongProofLength,
    #[error("a hash is not 32 bytes")]
    MalformedHash,
    #[error("computed root does not match")]
    RootMismatch,
    #[error("stored hashes unavailable: {0}")]
    Read(#[from] ReadError),
    #[error("tree size {0} exceeds the supported maximum")]
    TooLarge(u64),
}

/// Why stored hashes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("stored hash {0} is missing")]
    Missing(u64),
    #[error("{0}")]
    Other(String),
}

/// Reads stored hashes by stored-hash index, in the order asked.
pub trait HashReader {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, ReadError>;
}

/// SHA-256 of the empty string: the root of the empty tree.
pub fn empty_root() -> Hash {
    sha256(b"")
}

/// RFC 9162 leaf hash: SHA-256(0x00 ‖ data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut input = Vec::with_capacity(data.len() + 1);
    input.push(0);
    input.extend_from_slice(data);
    sha256(&input)
}

/// RFC 9162 interior node hash: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut input = [0u8; 65];
    input[0] = 1;
    input[1..33].copy_from_slice(left);
    input[33..].copy_from_slice(right);
    sha256(&input)
}

/// The root of a tree with these leaf hashes, in O(n) time and O(log n) space.
pub fn root(leaves: &[Hash]) -> Hash {
    let mut edge = RightEdge::default();
    for leaf in leaves {
        edge.push(*leaf);
    }
    edge.root()
}

/// The complete subtrees on the right edge of a tree being built leaf by leaf: enough to
/// give the root at every size the tree passes through, in O(log n) space.
#[derive(Debug, Clone, Default)]
pub struct RightEdge {
    size: u64,
    /// (size, hash) of each complete subtree, sizes strictly decreasing.
    subtrees: Vec<(u64, Hash)>,
}

impl RightEdge {
    /// How many leaves the tree has.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut item = (1u64, leaf);
        while let Some(&(size, hash)) = self.subtrees.last() {
            if size != item.0 {
                break;
            }
            self.subtrees.pop();
            item = (size * 2, node_hash(&hash, &item.1));
        }
        self.subtrees.push(item);
        self.size += 1;
    }

    /// The root of the tree as it stands.
    pub fn root(&self) -> Hash {
        let Some(&(_, mut hash)) = self.subtrees.last() else {
            return empty_root();
        };
        for &(_, left) in self.subtrees.iter().rev().skip(1) {
            hash = node_hash(&left, &hash);
        }
        hash
    }
}

/// Where level `level`'s `n`-th hash is stored (sumdb/tlog numbering). Saturates rather
/// than overflowing for positions no tree up to [`MAX_TREE_SIZE`] has.
pub fn stored_hash_index(level: u32, n: u64) -> u64 {
    let mut n = n;
    for _ in 0..level {
        n = n.saturating_mul(2).saturating_add(1);
    }
    let mut i = 0u64;
    while n > 0 {
        i = i.saturating_add(n);
        n >>= 1;
    }
    i.saturating_add(u64::from(level))
}

fn check_size(size: u64) -> Result<(), MerkleError> {
    if size > MAX_TREE_SIZE {
        return Err(MerkleError::TooLarge(size));
    }
    Ok(())
}

/// How many hashes a tree of `n` leaves stores.
pub fn stored_hash_count(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let mut count = stored_hash_index(0, n - 1).saturating_add(1);
    let mut i = n - 1;
    while i & 1 != 0 {
        count = count.saturating_add(1);
        i >>= 1;
    }
    count
}

/// The hashes to store when appending leaf `n` with hash `leaf`: the leaf hash and every
/// subtree it completes, to be stored from `stored_hash_index(0, n)` on.
pub fn stored_hashes_for_record(
    n: u64,
    leaf: Hash,
    reader: &(impl HashReader + ?Sized),
) -> Result<Vec<Hash>, MerkleError> {
    check_size(n)?;
    let m = (n + 1).trailing_zeros();
    let indexes: Vec<u64> = (0..m)
        .rev()
        .map(|i| stored_hash_index(i, (n >> i) - 1))
        .collect();
    let old = reader.read_hashes(&indexes)?;
    if old.len() != indexes.len() {
        return Err(MerkleError::WrongProofLength);
    }
    let mut hashes = vec![leaf];
    let mut h = leaf;
    for i in 0..m as usize {
        h = node_hash(&old[m as usize - 1 - i], &h);
        hashes.push(h);
    }
    Ok(hashes)
}

/// The largest power of two smaller than `n` (n ≥ 2), and its log.
fn maxpow2(n: u64) -> (u64, u32) {
    let mut l = 0;
    while 1u64 << (l + 1) < n {
        l += 1;
    }
    (1 << l, l)
}

fn sub_tree_index(mut lo: u64, hi: u64, need: &mut Vec<u64>) {
    while lo < hi {
        let (k, level) = maxpow2(hi - lo + 1);
        need.push(stored_hash_index(level, lo >> level));
        lo += k;
    }
}

fn sub_tree_hash(mut lo: u64, hi: u64, hashes: &[Hash]) -> Result<(Hash, &[Hash]), MerkleError> {
    let mut num = 0;
    while lo < hi {
        let (k, _) = maxpow2(hi - lo + 1);
        num += 1;
        lo += k;
    }
    if num == 0 || hashes.len() < num {
        return Err(MerkleError::WrongProofLength);
    }
    let mut h = hashes[num - 1];
    for i in (0..num - 1).rev() {
        h = node_hash(&hashes[i], &h);
    }
    Ok((h, &hashes[num..]))
}

fn read(reader: &(impl HashReader + ?Sized), indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
    let hashes = reader.read_hashes(indexes)?;
    if hashes.len() != indexes.len() {
        return Err(MerkleError::WrongProofLength);
    }
    Ok(hashes)
}

/// The root of the first `n` leaves, from stored hashes.
pub fn tree_hash(n: u64, reader: &(impl HashReader + ?Sized)) -> Result<Hash, MerkleError> {
    check_size(n)?;
    if n == 0 {
        return Ok(empty_root());
    }
    let mut indexes = Vec::new();
    sub_tree_index(0, n, &mut indexes);
    let hashes = read(reader, &indexes)?;
    let (h, rest) = sub_tree_hash(0, n, &hashes)?;
    if !rest.is_empty() {
        return Err(MerkleError::WrongProofLength);
    }
    Ok(h)
}

fn leaf_proof_index(lo: u64, hi: u64, n: u64, need: &mut Vec<u64>) {
    if lo + 1 == hi {
        return;
    }
    let (k, _) = maxpow2(hi - lo);
    if n < lo + k {
        leaf_proof_index(lo, lo + k, n, need);
        sub_tree_index(lo + k, hi, need);
    } else {
        sub_tree_index(lo, lo + k, need);
        leaf_proof_index(lo + k, hi, n, need);
    }
}

fn leaf_proof(
    lo: u64,
    hi: u64,
    n: u64,
    hashes: &[Hash],
) -> Result<(Vec<Hash>, &[Hash]), MerkleError> {
    if lo + 1 == hi {
        return Ok((Vec::new(), hashes));
    }
    let (k, _) = maxpow2(hi - lo);
    let (mut p, th, rest) = if n < lo + k {
        let (p, rest) = leaf_proof(lo, lo + k, n, hashes)?;
        let (th, rest) = sub_tree_hash(lo + k, hi, rest)?;
        (p, th, rest)
    } else {
        let (th, rest) = sub_tree_hash(lo, lo + k, hashes)?;
        let (p, rest) = leaf_proof(lo + k, hi, n, rest)?;
        (p, th, rest)
    };
    p.push(th);
    Ok((p, rest))
}

/// The inclusion proof of leaf `n` in the tree of size `t`.
pub fn prove_record(
    t: u64,
    n: u64,
    reader: &(impl HashReader + ?Sized),
) -> Result<Vec<Hash>, MerkleError> {
    check_size(t)?;
    if n >= t {
        return Err(MerkleError::IndexOutOfRange { index: n, size: t });
    }
    let mut indexes = Vec::new();
    leaf_proof_index(0, t, n, &mut indexes);
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    let hashes = read(reader, &indexes)?;
    let (p, rest) = leaf_proof(0, t, n, &hashes)?;
    if !rest.is_empty() {
        return Err(MerkleError::WrongProofLength);
    }
    Ok(p)
}

fn tree_proof_index(lo: u64, hi: u64, n: u64, need: &mut Vec<u64>) {
    if n == hi {
        if lo != 0 {
            sub_tree_index(lo, hi, need);
        }
        return;
    }
    let (k, _) = maxpow2(hi - lo);
    if n <= lo + k {
        tree_proof_index(lo, lo + k, n, need);
        sub_tree_index(lo + k, hi, need);
    } else {
        sub_tree_index(lo, lo + k, need);
        tree_proof_index(lo + k, hi, n, need);
    }
}

fn tree_proof(
    lo: u64,
    hi: u64,
    n: u64,
    hashes: &[Hash],
) -> Result<(Vec<Hash>, &[Hash]), MerkleError> {
    if n == hi {
        if lo == 0 {
            return Ok((Vec::new(), hashes));
        }
        let (th, rest) = sub_tree_hash(lo, hi, hashes)?;
        return Ok((vec![th], rest));
    }
    let (k, _) = maxpow2(hi - lo);
    let (mut p, th, rest) = if n <= lo + k {
        let (p, rest) = tree_proof(lo, lo + k, n, hashes)?;
        let (th, rest) = sub_tree_hash(lo + k, hi, rest)?;
        (p, th, rest)
    } else {
        let (th, rest) = sub_tree_hash(lo, lo + k, hashes)?;
        let (p, rest) = tree_proof(lo + k, hi, n, rest)?;
        (p, th, rest)
    };
    p.push(th);
    Ok((p, rest))
}

/// The consistency proof from the tree of size `n` to the tree of size `t` (0 < n ≤ t).
pub fn prove_tree(
    t: u64,
    n: u64,
    reader: &(impl HashReader + ?Sized),
) -> Result<Vec<Hash>, MerkleError> {
    check_size(t)?;
    if n == 0 {
        return Err(MerkleError::FromEmptyTree);
    }
    if n > t {
        return Err(MerkleError::SizesReversed { old: n, new: t });
    }
    let mut indexes = Vec::new();
    tree_proof_index(0, t, n, &mut indexes);
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    let hashes = read(reader, &indexes)?;
    let (p, rest) = tree_proof(0, t, n, &hashes)?;
    if !rest.is_empty() {
        return Err(MerkleError::WrongProofLength);
    }
    Ok(p)
}

/// RFC 9162 section 2.1.3.2: verifies that `leaf` is at `index` in the tree of `size`
/// with root `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &[u8],
    proof: &[Hash],
    root: &[u8],
) -> Result<(), MerkleError> {
    let leaf = Hash::try_from(leaf).map_err(|_| MerkleError::MalformedHash)?;
    let root = Hash::try_from(root).map_err(|_| MerkleError::MalformedHash)?;
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = leaf;
    for p in proof {
        if s == 0 {
            return Err(MerkleError::WrongProofLength);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(MerkleError::WrongProofLength);
    }
    if r != root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 section 2.1.4.2: verifies that the tree of `size1` with `root1` is a prefix
/// of the tree of `size2` with `root2`. A proof from size 0 is refused (see the module
/// documentation); equal sizes need an empty proof and equal roots (compared as given);
/// otherwise roots must be 32-byte hashes.
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &[u8],
    root2: &[u8],
) -> Result<(), MerkleError> {
    if size2 < size1 {
        return Err(MerkleError::SizesReversed {
            old: size1,
            new: size2,
        });
    }
    if size1 == 0 {
        return Err(MerkleError::FromEmptyTree);
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(MerkleError::WrongProofLength);
        }
        return if root1 == root2 {
            Ok(())
        } else {
            Err(MerkleError::RootMismatch)
        };
    }
    let root1 = &Hash::try_from(root1).map_err(|_| MerkleError::MalformedHash)?;
    let root2 = &Hash::try_from(root2).map_err(|_| MerkleError::MalformedHash)?;
    if proof.is_empty() {
        return Err(MerkleError::WrongProofLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if size1.is_power_of_two() {
        path.push(*root1);
    }
    path.extend_from_slice(proof);
    let (mut f, mut s) = (size1 - 1, size2 - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return Err(MerkleError::WrongProofLength);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(MerkleError::WrongProofLength);
    }
    if &fr != root1 || &sr != root2 {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// Parses proof hashes of unknown length, rejecting any that is not 32 bytes.
pub fn hashes_from_slices<T: AsRef<[u8]>>(items: &[T]) -> Result<Vec<Hash>, MerkleError> {
    items
        .iter()
        .map(|h| Hash::try_from(h.as_ref()).map_err(|_| MerkleError::MalformedHash))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    /// An in-memory log keeping every stored hash, as a node's table does.
    #[derive(Default)]
    struct MemLog {
        stored: HashMap<u64, Hash>,
        size: u64,
    }

    impl HashReader for MemLog {
        fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, ReadError> {
            indexes
                .iter()
                .map(|i| self.stored.get(i).copied().ok_or(ReadError::Missing(*i)))
                .collect()
        }
    }

    impl MemLog {
        fn append(&mut self, data: &[u8]) {
            let hashes = stored_hashes_for_record(self.size, leaf_hash(data), self).unwrap();
            let first = stored_hash_index(0, self.size);
            for (i, h) in hashes.into_iter().enumerate() {
                self.stored.insert(first + i as u64, h);
            }
            self.size += 1;
            assert_eq!(self.stored.len() as u64, stored_hash_count(self.size));
        }
    }

    fn testdata() -> PathBuf {
        crate::testdata::dir().join("merkle")
    }

    fn b64(v: &serde_json::Value) -> Vec<u8> {
        v.as_str()
            .map(|s| B64.decode(s).unwrap())
            .unwrap_or_default()
    }

    fn vectors(kind: &str) -> Vec<(PathBuf, serde_json::Value)> {
        let mut out = Vec::new();
        let mut dirs = vec![testdata().join(kind)];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "json") {
                    let v = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                    out.push((path, v));
                }
            }
        }
        assert!(!out.is_empty(), "no {kind} vectors found");
        out
    }

    fn as_hash(bytes: &[u8]) -> Result<Hash, MerkleError> {
        Hash::try_from(bytes).map_err(|_| MerkleError::MalformedHash)
    }

    #[test]
    fn reference_roots_for_sizes_0_to_8() {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(testdata().join("reference-tree.json")).unwrap())
                .unwrap();
        let inputs: Vec<Vec<u8>> = v["leaf_inputs_hex"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| hex::decode(h.as_str().unwrap()).unwrap())
            .collect();
        let roots: Vec<String> = v["root_hash_hex_by_tree_size"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_owned())
            .collect();
        let mut log = MemLog::default();
        for (size, expected) in roots.iter().enumerate() {
            let leaves: Vec<Hash> = inputs[..size].iter().map(|d| leaf_hash(d)).collect();
            assert_eq!(hex::encode(root(&leaves)), *expected, "size {size}");
            assert_eq!(
                hex::encode(tree_hash(size as u64, &log).unwrap()),
                *expected,
                "stored, size {size}"
            );
            if size < inputs.len() {
                log.append(&inputs[size]);
            }
        }
    }

    #[test]
    fn inclusion_vectors() {
        let mut good = 0;
        for (path, v) in vectors("inclusion") {
            let proof: Result<Vec<Hash>, _> = v["proof"]
                .as_array()
                .map(|a| a.iter().map(|h| as_hash(&b64(h))).collect())
                .unwrap_or(Ok(Vec::new()));
            let result = (|| {
                let proof = proof?;
                verify_inclusion(
                    v["leafIdx"].as_u64().ok_or(MerkleError::MalformedHash)?,
                    v["treeSize"].as_u64().ok_or(MerkleError::MalformedHash)?,
                    &b64(&v["leafHash"]),
                    &proof,
                    &b64(&v["root"]),
                )
            })();
            let want_err = v["wantErr"].as_bool().unwrap_or(false);
            assert_eq!(result.is_err(), want_err, "{}: {result:?}", path.display());
            good += usize::from(!want_err);
        }
        assert!(good > 0);
    }

    #[test]
    fn consistency_vectors() {
        let mut good = 0;
        for (path, v) in vectors("consistency") {
            let proof: Result<Vec<Hash>, _> = v["proof"]
                .as_array()
                .map(|a| a.iter().map(|h| as_hash(&b64(h))).collect())
                .unwrap_or(Ok(Vec::new()));
            let result = (|| {
                verify_consistency(
                    v["size1"].as_u64().ok_or(MerkleError::MalformedHash)?,
                    v["size2"].as_u64().ok_or(MerkleError::MalformedHash)?,
                    &proof?,
                    &b64(&v["root1"]),
                    &b64(&v["root2"]),
                )
            })();
            let want_err = v["wantErr"].as_bool().unwrap_or(false);
            assert_eq!(result.is_err(), want_err, "{}: {result:?}", path.display());
            good += usize::from(!want_err);
        }
        assert!(good > 0);
    }

    fn log_of(n: u64) -> (MemLog, Vec<Hash>) {
        let mut log = MemLog::default();
        let mut leaves = Vec::new();
        for i in 0..n {
            let data = i.to_be_bytes();
            leaves.push(leaf_hash(&data));
            log.append(&data);
        }
        (log, leaves)
    }

    #[test]
    fn generated_proofs_verify_exhaustively_for_small_trees() {
        let (log, leaves) = log_of(40);
        for t in 1..=40u64 {
            let r = root(&leaves[..t as usize]);
            assert_eq!(tree_hash(t, &log).unwrap(), r);
            for n in 0..t {
                let p = prove_record(t, n, &log).unwrap();
                verify_inclusion(n, t, &leaves[n as usize], &p, &r).unwrap();
            }
            for n in 1..=t {
                let p = prove_tree(t, n, &log).unwrap();
                verify_consistency(n, t, &p, &root(&leaves[..n as usize]), &r).unwrap();
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (log, _) = log_of(5);
        assert!(prove_record(5, 5, &log).is_err());
        assert!(prove_tree(5, 0, &log).is_err());
        assert!(prove_tree(5, 6, &log).is_err());
        assert!(verify_inclusion(5, 5, &[0; 32], &[], &[0; 32]).is_err());
        assert!(verify_consistency(6, 5, &[], &[0; 32], &[0; 32]).is_err());
        assert!(hashes_from_slices(&[vec![0u8; 31]]).is_err());
        let empty = MemLog::default();
        assert!(tree_hash(3, &empty).is_err());
        // Absurd sizes are errors, not arithmetic overflows.
        for size in [MAX_TREE_SIZE + 1, u64::MAX] {
            assert_eq!(tree_hash(size, &empty), Err(MerkleError::TooLarge(size)));
            assert_eq!(
                prove_record(size, 0, &empty),
                Err(MerkleError::TooLarge(size))
            );
            assert_eq!(
                prove_tree(size, 1, &empty),
                Err(MerkleError::TooLarge(size))
            );
            assert_eq!(
                stored_hashes_for_record(size, [0; 32], &empty),
                Err(MerkleError::TooLarge(size))
            );
        }
        let _ = stored_hash_index(u32::MAX, u64::MAX);
        let _ = stored_hash_count(u64::MAX);
    }

    proptest! {
        /// The right edge gives, at every size it passes through, the root the stored
        /// hashes give.
        #[test]
        fn right_edge_roots_match_stored_tree_hashes(t in 0u64..300) {
            let (log, leaves) = log_of(t);
            let mut edge = RightEdge::default();
            prop_assert_eq!(edge.root(), empty_root());
            for (i, leaf) in leaves.iter().enumerate() {
                edge.push(*leaf);
                prop_assert_eq!(edge.size(), i as u64 + 1);
                prop_assert_eq!(edge.root(), tree_hash(i as u64 + 1, &log).unwrap());
            }
        }

        #[test]
        fn proofs_verify_and_any_bit_flip_fails(t in 1u64..300, seed in any::<u64>(), bit in 0usize..256) {
            let (log, leaves) = log_of(t);
            let n = seed % t;
            let old = 1 + seed % t;
            let r = root(&leaves);
            let p = prove_record(t, n, &log).unwrap();
            prop_assert!(verify_inclusion(n, t, &leaves[n as usize], &p, &r).is_ok());
            let c = prove_tree(t, old, &log).unwrap();
            let r1 = root(&leaves[..old as usize]);
            prop_assert!(verify_consistency(old, t, &c, &r1, &r).is_ok());
            // Flip one bit of the root, or of a proof hash.
            let mut bad_root = r;
            bad_root[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(verify_inclusion(n, t, &leaves[n as usize], &p, &bad_root).is_err());
            prop_assert!(verify_consistency(old, t, &c, &r1, &bad_root).is_err());
            if !p.is_empty() {
                let mut bad = p.clone();
                let i = (seed as usize) % bad.len();
                bad[i][bit / 8] ^= 1 << (bit % 8);
                prop_assert!(verify_inclusion(n, t, &leaves[n as usize], &bad, &r).is_err());
            }
            if !c.is_empty() {
                let mut bad = c.clone();
                let i = (seed as usize) % bad.len();
                bad[i][bit / 8] ^= 1 << (bit % 8);
                prop_assert!(verify_consistency(old, t, &bad, &r1, &r).is_err());
            }
        }
    }
}
