//! The federation directory: who the members are, what roles they hold, where they are
//! reached and which keys and certificate speak for them.
//!
//! The directory is a TOML file distributed out of band, with a serial number and an
//! expiry, and signed by k of the federation's n governance keys: the signatures travel
//! beside it, one line each, in `<directory>.sig`, over the file's exact bytes. A node
//! accepts a directory only with k valid signatures of distinct governance keys, before
//! its expiry, and (see the node) never one older than it accepted before. A peer is who
//! its certificate and this directory both say it is: the certificate's org URI must name
//! a member and its SHA-256 fingerprint must equal the one listed here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::canonical::Canonical;
use crate::org::OrgId;
use crate::seal::SealingPublicKey;
use crate::sign::{SigningKey, VerifyingKey};

/// Domain separation of governance signatures over a directory file.
const SIGNATURE_LABEL: &[u8] = b"corridor/v1/directory\0";

/// What an organisation does in the federation; roles gate actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Shelter,
    Ngo,
    Embassy,
    Government,
    Auditor,
    Witness,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Self::Shelter,
        Self::Ngo,
        Self::Embassy,
        Self::Government,
        Self::Auditor,
        Self::Witness,
    ];

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Shelters, NGOs, embassies and governments: members that receive referrals and so
    /// know the people behind them.
    pub fn works_cases(self) -> bool {
        matches!(
            self,
            Self::Shelter | Self::Ngo | Self::Embassy | Self::Government
        )
    }

    /// Embassies and governments: a consent reaches them only where it names them.
    pub fn is_state_authority(self) -> bool {
        matches!(self, Self::Embassy | Self::Government)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shelter => "shelter",
            Self::Ngo => "ngo",
            Self::Embassy => "embassy",
            Self::Government => "government",
            Self::Auditor => "auditor",
            Self::Witness => "witness",
        }
    }
}

/// One member organisation, validated.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: OrgId,
    pub name: String,
    /// ISO 3166-1 alpha-2 country code of where the member is.
    pub country: String,
    /// For a state authority: the state it acts for, where that is not `country` (the
    /// Cambodian embassy in Kuala Lumpur is in MY and represents KH). A consent that
    /// excludes a country excludes the authorities that represent it, wherever they are.
    pub represents: Option<String>,
    pub roles: Vec<Role>,
    /// `https://host:port` of the member's federation listener.
    pub endpoint: String,
    pub signing_key: VerifyingKey,
    pub sealing_key: SealingPublicKey,
    /// SHA-256 of the DER of the member's TLS certificate.
    pub cert_sha256: [u8; 32],
}

/// A member as written in the directory file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    pub id: String,
    pub name: String,
    pub country: String,
    /// For a state authority (embassy, government): the state it represents, if it is
    /// not `country`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub represents: Option<String>,
    pub roles: Vec<Role>,
    pub endpoint: String,
    /// Base64 Ed25519 public key.
    pub signing_key: String,
    /// Base64 X25519 public key.
    pub sealing_key: String,
    /// Hex SHA-256 of the TLS certificate's DER.
    pub cert_sha256: String,
}

/// The directory file's layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryFile {
    /// Name of the federation, e.g. `corridor-demo`.
    pub federation: String,
    /// Increases with every published change.
    pub serial: u64,
    /// After this (milliseconds since the Unix epoch) nodes refuse the directory and
    /// federation traffic stops until a newer one is installed: fail closed.
    pub expires_at_ms: i64,
    #[serde(rename = "member")]
    pub members: Vec<MemberEntry>,
}

/// Why a directory file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("directory is not valid TOML: {0}")]
    Syntax(String),
    #[error(
        "federation name {0:?} must be 1-64 letters, digits, '.', '_' or '-' (it names every audit log and witness key)"
    )]
    FederationName(String),
    #[error("member #{index}: {problem}")]
    Member { index: usize, problem: String },
    #[error("org {0} is listed twice")]
    Duplicate(OrgId),
    /// Two members with one key would be one party counted twice (as two witnesses, say)
    /// or one able to pass for the other.
    #[error("orgs {first} and {second} have the same {what}: each member needs its own")]
    SharedKey {
        what: &'static str,
        first: OrgId,
        second: OrgId,
    },
    #[error("directory has no members")]
    Empty,
    #[error(
        "directory is signed by {valid} governance key(s) of the {needed} it needs (checked against the configured governance keys)"
    )]
    NotSigned { valid: usize, needed: usize },
    #[error("directory signatures line {line} is not `<public key> <signature>` in base64")]
    SignatureLine { line: usize },
    #[error("directory serial {serial} expired at {}", crate::utc::format(*expires_at_ms))]
    Expired { serial: u64, expires_at_ms: i64 },
    #[error("governance: {0}")]
    Governance(String),
}

/// The federation's governance keys and how many of them must sign a directory.
#[derive(Debug, Clone)]
pub struct Governance {
    keys: Vec<VerifyingKey>,
    threshold: usize,
}

impl Governance {
    /// `threshold` of `keys` must sign; the keys must be distinct.
    pub fn new(keys: Vec<VerifyingKey>, threshold: usize) -> Result<Self, DirectoryError> {
        if threshold == 0 || threshold > keys.len() {
            return Err(DirectoryError::Governance(format!(
                "threshold {threshold} must be between 1 and the number of keys ({})",
                keys.len()
            )));
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].contains(key) {
                return Err(DirectoryError::Governance(
                    "a governance key is listed twice".into(),
                ));
            }
        }
        Ok(Self { keys, threshold })
    }
}

/// What a governance key signs: the directory file's exact bytes, domain-separated.
fn signed_message(body: &[u8]) -> Vec<u8> {
    Canonical::new(SIGNATURE_LABEL).bytes(body).finish()
}

/// Where the governance signatures of the directory file at `directory` are: beside it,
/// with `.sig` appended to its name.
pub fn signatures_path(directory: &std::path::Path) -> std::path::PathBuf {
    let mut path = directory.as_os_str().to_owned();
    path.push(".sig");
    path.into()
}

/// A line of a directory's signatures file read: the key it names and whether its
/// signature is over `body`. `None` if the line is not `<public key> <signature>`.
pub fn read_signature_line(body: &[u8], line: &str) -> Option<(VerifyingKey, bool)> {
    use base64::Engine as _;
    let (key, signature) = line.trim().split_once(' ')?;
    let key = VerifyingKey::from_base64(key.trim()).ok()?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .ok()?;
    let valid = key.verify(&signed_message(body), &signature).is_ok();
    Some((key, valid))
}

/// One line of a directory's signatures file: `key`'s signature over `body`.
pub fn signature_line(body: &[u8], key: &SigningKey) -> String {
    use base64::Engine as _;
    format!(
        "{} {}",
        key.verifying_key().to_base64(),
        base64::engine::general_purpose::STANDARD.encode(key.sign(&signed_message(body)))
    )
}

/// The validated federation directory.
#[derive(Debug, Clone)]
pub struct Directory {
    pub federation: String,
    pub serial: u64,
    pub expires_at_ms: i64,
    /// SHA-256 of the file's exact bytes, which its governance signed: two directories
    /// of one serial must be the same directory.
    pub digest: [u8; 32],
    members: BTreeMap<OrgId, Member>,
}

impl Directory {
    /// Verifies a directory file's governance signatures (`signatures`: the lines of its
    /// `.sig` file) and expiry, then parses and validates it. Each governance key counts
    /// once; lines by other keys are ignored, so a file may carry signatures for several
    /// governance sets.
    pub fn from_signed(
        body: &str,
        signatures: &str,
        governance: &Governance,
        now_ms: i64,
    ) -> Result<Self, DirectoryError> {
        let mut signed_by: Vec<&VerifyingKey> = Vec::new();
        for (index, line) in signatures.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, valid) = read_signature_line(body.as_bytes(), line)
                .ok_or(DirectoryError::SignatureLine { line: index + 1 })?;
            let Some(governing) = governance.keys.iter().find(|k| **k == key) else {
                continue;
            };
            if valid && !signed_by.contains(&governing) {
                signed_by.push(governing);
            }
        }
        if signed_by.len() < governance.threshold {
            return Err(DirectoryError::NotSigned {
                valid: signed_by.len(),
                needed: governance.threshold,
            });
        }
        let directory = Self::from_toml(body)?;
        if !directory.is_current(now_ms) {
            return Err(DirectoryError::Expired {
                serial: directory.serial,
                expires_at_ms: directory.expires_at_ms,
            });
        }
        Ok(directory)
    }

    /// Whether the directory is still in force at `now_ms`.
    pub fn is_current(&self, now_ms: i64) -> bool {
        now_ms < self.expires_at_ms
    }

    /// Parses and validates a directory file, without checking its signatures: for
    /// tools that only read it. A node loads its directory with [`Directory::from_signed`].
    pub fn from_toml(text: &str) -> Result<Self, DirectoryError> {
        let file: DirectoryFile =
            toml::from_str(text).map_err(|e| DirectoryError::Syntax(e.message().to_owned()))?;
        Self::validated(file, crate::canonical::sha256(text.as_bytes()))
    }

    /// Validates a directory not read from a file (one about to be written): its digest
    /// is that of the file it would be written as.
    pub fn from_file(file: DirectoryFile) -> Result<Self, DirectoryError> {
        let text = toml::to_string(&file).map_err(|e| DirectoryError::Syntax(e.to_string()))?;
        Self::validated(file, crate::canonical::sha256(text.as_bytes()))
    }

    fn validated(file: DirectoryFile, digest: [u8; 32]) -> Result<Self, DirectoryError> {
        if file.members.is_empty() {
            return Err(DirectoryError::Empty);
        }
        if !crate::audit::is_federation_name(&file.federation) {
            return Err(DirectoryError::FederationName(file.federation));
        }
        // Nodes store the serial as a signed 64-bit integer.
        if i64::try_from(file.serial).is_err() {
            return Err(DirectoryError::Syntax("serial must be below 2^63".into()));
        }
        let mut members = BTreeMap::new();
        let mut keys: BTreeMap<(&'static str, Vec<u8>), OrgId> = BTreeMap::new();
        for (index, entry) in file.members.into_iter().enumerate() {
            let member = validate(entry).map_err(|problem| DirectoryError::Member {
                index: index + 1,
                problem,
            })?;
            if members.contains_key(&member.id) {
                return Err(DirectoryError::Duplicate(member.id));
            }
            for key in [
                ("signing key", member.signing_key.to_base64().into_bytes()),
                ("sealing key", member.sealing_key.to_base64().into_bytes()),
                ("certificate", member.cert_sha256.to_vec()),
            ] {
                if let Some(first) = keys.insert(key.clone(), member.id.clone()) {
                    return Err(DirectoryError::SharedKey {
                        what: key.0,
                        first,
                        second: member.id,
                    });
                }
            }
            members.insert(member.id.clone(), member);
        }
        Ok(Self {
            federation: file.federation,
            serial: file.serial,
            expires_at_ms: file.expires_at_ms,
            digest,
            members,
        })
    }

    pub fn get(&self, id: &OrgId) -> Option<&Member> {
        self.members.get(id)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }
}

impl Member {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether this member may read other members' audit entries: an auditor that works
    /// no cases. The entries name no one, but their case pseudonyms, recipients, purposes
    /// and times link the events of one person's case; a member that received a referral
    /// could follow that person through every other log it reads.
    pub fn reads_audit_entries(&self) -> bool {
        self.has_role(Role::Auditor) && !self.roles.iter().any(|r| r.works_cases())
    }

    /// The file form of this member.
    pub fn to_entry(&self) -> MemberEntry {
        MemberEntry {
            id: self.id.to_string(),
            name: self.name.clone(),
            country: self.country.clone(),
            represents: self.represents.clone(),
            roles: self.roles.clone(),
            endpoint: self.endpoint.clone(),
            signing_key: self.signing_key.to_base64(),
            sealing_key: self.sealing_key.to_base64(),
            cert_sha256: hex::encode(self.cert_sha256),
        }
    }
}

fn validate(entry: MemberEntry) -> Result<Member, String> {
    let id = OrgId::new(&entry.id).map_err(|e| format!("id: {e}"))?;
    // By form: a directory its governance signed before codes were checked against
    // ISO's list must still load, and one naming a code ISO assigns later too.
    if !crate::country::has_country_code_form(&entry.country) {
        return Err(format!("{id}: country must be an ISO 3166-1 alpha-2 code"));
    }
    if let Some(state) = &entry.represents {
        if !crate::country::has_country_code_form(state) {
            return Err(format!(
                "{id}: represents must be an ISO 3166-1 alpha-2 code"
            ));
        }
        if !entry
            .roles
            .iter()
            .any(|r| matches!(r, Role::Embassy | Role::Government))
        {
            return Err(format!(
                "{id}: only a state authority (embassy, government) represents a state"
            ));
        }
    }
    if entry.roles.is_empty() {
        return Err(format!("{id}: at least one role is required"));
    }
    if !(entry.endpoint.starts_with("https://") && entry.endpoint.len() > "https://".len()) {
        return Err(format!("{id}: endpoint must be an https:// URL"));
    }
    let signing_key = VerifyingKey::from_base64(&entry.signing_key)
        .map_err(|e| format!("{id}: signing_key: {e}"))?;
    let sealing_key = SealingPublicKey::from_base64(&entry.sealing_key)
        .map_err(|e| format!("{id}: sealing_key: {e}"))?;
    let cert_sha256 = hex::decode(&entry.cert_sha256)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("{id}: cert_sha256 must be 64 hex digits"))?;
    Ok(Member {
        id,
        name: entry.name,
        country: entry.country,
        represents: entry.represents,
        roles: entry.roles,
        endpoint: entry.endpoint,
        signing_key,
        sealing_key,
        cert_sha256,
    })
}

#[cfg(test)]
mod tests {
    type Tamper<T> = Box<dyn Fn(&mut T)>;
    use super::*;
    use crate::seal::SealingKey;
    use crate::sign::SigningKey;

    /// A member whose keys and certificate are its own (derived from its id).
    fn entry(id: &str) -> MemberEntry {
        let seed = crate::canonical::sha256(id.as_bytes());
        MemberEntry {
            id: id.into(),
            name: "Shelter".into(),
            country: "MY".into(),
            represents: None,
            roles: vec![Role::Shelter],
            endpoint: "https://127.0.0.1:7000".into(),
            signing_key: SigningKey::from_seed(&seed)
                .unwrap()
                .verifying_key()
                .to_base64(),
            sealing_key: SealingKey::derive(&seed).public_key().to_base64(),
            cert_sha256: hex::encode(crate::canonical::sha256(&seed)),
        }
    }

    fn file(members: Vec<MemberEntry>) -> String {
        toml::to_string(&DirectoryFile {
            federation: "test".into(),
            serial: 1,
            expires_at_ms: 1_000,
            members,
        })
        .unwrap()
    }

    /// A directory counts only valid signatures of distinct governance keys, over its
    /// exact bytes, and only until it expires.
    #[test]
    fn a_directory_needs_k_of_n_governance_signatures_and_expires() {
        let gov: Vec<SigningKey> = (1..=3u8)
            .map(|i| SigningKey::from_seed(&[i; 32]).unwrap())
            .collect();
        let outsider = SigningKey::from_seed(&[9; 32]).unwrap();
        let governance =
            Governance::new(gov.iter().map(|k| k.verifying_key()).collect(), 2).unwrap();
        let body = file(vec![entry("a-my"), entry("b-my")]);
        let sign = |keys: &[&SigningKey]| {
            keys.iter()
                .map(|k| signature_line(body.as_bytes(), k))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let open = |sigs: &str, now| Directory::from_signed(&body, sigs, &governance, now);

        let directory = open(&sign(&[&gov[0], &gov[2]]), 999).expect("2 of 3 sign");
        assert_eq!((directory.serial, directory.expires_at_ms), (1, 1_000));
        assert!(directory.is_current(999) && !directory.is_current(1_000));
        // The same key twice, or a key outside the governance set, does not make two.
        for sigs in [sign(&[&gov[0], &gov[0]]), sign(&[&gov[1], &outsider])] {
            assert_eq!(
                open(&sigs, 0).unwrap_err(),
                DirectoryError::NotSigned {
                    valid: 1,
                    needed: 2
                }
            );
        }
        // A signature over other bytes (one changed member) does not count.
        let tampered = body.replacen("b-my", "c-my", 1);
        assert!(matches!(
            Directory::from_signed(&tampered, &sign(&[&gov[0], &gov[1]]), &governance, 0),
            Err(DirectoryError::NotSigned { valid: 0, .. })
        ));
        // Comments and blank lines are fine; anything else malformed is named.
        let commented = format!("# by the board\n\n{}", sign(&[&gov[0], &gov[1]]));
        assert!(open(&commented, 0).is_ok());
        assert_eq!(
            open("not-a-signature", 0).unwrap_err(),
            DirectoryError::SignatureLine { line: 1 }
        );
        // Expired: refused however well signed.
        assert_eq!(
            open(&sign(&[&gov[0], &gov[1], &gov[2]]), 1_000).unwrap_err(),
            DirectoryError::Expired {
                serial: 1,
                expires_at_ms: 1_000
            }
        );
        // A governance set must be able to sign at all, without counting a key twice.
        let keys = |n: usize| gov[..n].iter().map(|k| k.verifying_key()).collect();
        assert!(Governance::new(keys(3), 0).is_err());
        assert!(Governance::new(keys(2), 3).is_err());
        let twice = vec![gov[0].verifying_key(), gov[0].verifying_key()];
        assert!(Governance::new(twice, 1).is_err());
    }

    #[test]
    fn only_an_auditor_that_works_no_cases_reads_audit_entries() {
        let with = |roles: Vec<Role>| {
            let mut e = entry("a-my");
            e.roles = roles;
            let dir = Directory::from_toml(&file(vec![e])).unwrap();
            dir.get(&OrgId::new("a-my").unwrap())
                .unwrap()
                .reads_audit_entries()
        };
        assert!(with(vec![Role::Auditor]));
        assert!(with(vec![Role::Auditor, Role::Witness]));
        for working in [Role::Shelter, Role::Ngo, Role::Embassy, Role::Government] {
            assert!(!with(vec![Role::Auditor, working]), "{working:?}");
            assert!(!with(vec![working]), "{working:?}");
        }
        assert!(!with(vec![Role::Witness]));
    }

    #[test]
    fn parses_round_trip() {
        let dir = Directory::from_toml(&file(vec![entry("a-my"), entry("b-kh")])).unwrap();
        let a = dir.get(&OrgId::new("a-my").unwrap()).unwrap();
        assert!(a.has_role(Role::Shelter));
        assert!(!a.has_role(Role::Embassy));
        assert_eq!(dir.members().count(), 2);
        let again = Directory::from_toml(&file(vec![a.to_entry()])).unwrap();
        assert_eq!(again.members().count(), 1);
        // The state an authority acts for survives the file form; others have none.
        let mut embassy = entry("kh-embassy-kl");
        embassy.roles = vec![Role::Embassy];
        embassy.represents = Some("KH".into());
        let dir = Directory::from_toml(&file(vec![embassy])).unwrap();
        let e = dir.get(&OrgId::new("kh-embassy-kl").unwrap()).unwrap();
        assert_eq!(
            (e.country.as_str(), e.represents.as_deref()),
            ("MY", Some("KH"))
        );
        let again = Directory::from_toml(&file(vec![e.to_entry()])).unwrap();
        assert_eq!(
            again.members().next().unwrap().represents.as_deref(),
            Some("KH")
        );
        assert_eq!(a.represents, None);
    }

    #[test]
    fn a_federation_name_that_breaks_note_lines_is_refused() {
        let text = file(vec![entry("shelter-my")]).replace("\"test\"", "\"my fed\"");
        assert_eq!(
            Directory::from_toml(&text).err(),
            Some(DirectoryError::FederationName("my fed".into()))
        );
    }

    #[test]
    fn rejects_bad_members_with_a_reason() {
        let cases: Vec<(Tamper<MemberEntry>, &str)> = vec![
            (Box::new(|e| e.id = "Bad Id".into()), "id"),
            (Box::new(|e| e.country = "Malaysia".into()), "country"),
            (Box::new(|e| e.roles.clear()), "role"),
            (Box::new(|e| e.endpoint = "http://x".into()), "endpoint"),
            (Box::new(|e| e.signing_key = "AAAA".into()), "signing_key"),
            (Box::new(|e| e.sealing_key = "!!".into()), "sealing_key"),
            (Box::new(|e| e.cert_sha256 = "abc".into()), "cert_sha256"),
            (
                Box::new(|e| {
                    e.roles = vec![Role::Embassy];
                    e.represents = Some("Cambodia".into());
                }),
                "represents",
            ),
            (
                Box::new(|e| e.represents = Some("KH".into())),
                "only a state authority",
            ),
        ];
        for (tamper, word) in cases {
            let mut e = entry("a-my");
            tamper(&mut e);
            let err = Directory::from_toml(&file(vec![e]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(word), "{err} should mention {word}");
        }
        assert!(matches!(
            Directory::from_toml(&file(vec![entry("a-my"), entry("a-my")])),
            Err(DirectoryError::Duplicate(_))
        ));
        assert!(Directory::from_toml(&file(vec![entry("a-my"), entry("b-my")])).is_ok());
        type Share = fn(&mut MemberEntry, &MemberEntry);
        let sharing: [(&str, Share); 3] = [
            ("signing key", |b, a| {
                b.signing_key.clone_from(&a.signing_key)
            }),
            ("sealing key", |b, a| {
                b.sealing_key.clone_from(&a.sealing_key)
            }),
            ("certificate", |b, a| {
                b.cert_sha256.clone_from(&a.cert_sha256)
            }),
        ];
        for (what, share) in sharing {
            let (a, mut b) = (entry("a-my"), entry("b-my"));
            share(&mut b, &a);
            let err = Directory::from_toml(&file(vec![a, b])).unwrap_err();
            assert!(
                matches!(err, DirectoryError::SharedKey { what: w, .. } if w == what),
                "{err}"
            );
        }
        assert!(matches!(
            Directory::from_toml("federation = 1"),
            Err(DirectoryError::Syntax(_))
        ));
        let huge =
            file(vec![entry("a-my")]).replace("serial = 1", &format!("serial = {}", u64::MAX));
        assert!(matches!(
            Directory::from_toml(&huge),
            Err(DirectoryError::Syntax(m)) if m.contains("serial")
        ));
        assert!(matches!(
            Directory::from_toml(&file(vec![])),
            Err(DirectoryError::Empty)
        ));
    }
}
