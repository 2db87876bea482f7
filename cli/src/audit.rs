//! `corridor audit`: verifying nodes' audit logs without seeing personal data, with the
//! same `corridor` library code the nodes use.
//!
//! The auditor connects to a node's federation listener over mutual TLS with the
//! certificate of an org that has the auditor (or witness) role, checks the node's signed
//! checkpoint and its witnesses' cosignatures against a k-of-n policy, rebuilds the tree
//! from the entries, and keeps what it verified (checkpoints and leaf hashes) in a local
//! state directory, so that any later rewrite of history is caught and located.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use corridor::checkpoint::{self, Checkpoint, CosignatureVerifier, NoteVerifier};
use corridor::merkle::{self, Hash};
use corridor::{Directory, OrgId, Role};
use corridor_proto::v1 as pb;
use corridor_proto::v1::audit_client::AuditClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::commands::Output;
use crate::files::{self, MAX_AUDIT_FILE_BYTES, MAX_FILE_BYTES};
use crate::terminal::escape_controls;
use crate::{errln, out, outln};

/// A file naming the federation's governance keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GovernanceFile {
    governance: corridor_node::config::GovernanceConfig,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Directory with the auditor org's tls.pem and tls.key (an org with the auditor or
    /// witness role).
    #[arg(long, env = "CORRIDOR_AUDIT_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// Federation CA certificate (default: ../ca.pem next to the identity).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Federation directory (default: ../directory.toml next to the identity); its
    /// governance signatures are read from `<directory>.sig`.
    #[arg(long)]
    pub directory: Option<PathBuf>,
    /// The governance keys the directory must be signed by: a TOML file with a
    /// `[governance]` section as in a node's configuration (default: ../governance.toml
    /// next to the identity). The keys that verify the logs come from the directory, so
    /// the directory is trusted only as signed.
    #[arg(long)]
    pub governance: Option<PathBuf>,
    /// Where the auditor keeps what it verified.
    #[arg(long, env = "CORRIDOR_AUDIT_STATE", default_value = ".corridor-audit")]
    pub state: PathBuf,
    /// Most entries a log's checkpoint may claim before its entries are fetched: `verify`
    /// holds each entry's hash in memory (and in its state), `export` and `cross-check`
    /// the entries themselves (a few hundred bytes each), and the size is the audited
    /// node's word. Raise it to audit a larger log (up to about 15 000 000 entries, whose
    /// state `verify` can still read back).
    #[arg(long, default_value_t = DEFAULT_MAX_ENTRIES)]
    pub max_entries: u64,
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// Default of `--max-entries`: at most about 2 GB of memory, for the entries `export` and
/// `cross-check` hold and for the hashes `verify` and its state hold.
pub const DEFAULT_MAX_ENTRIES: u64 = 5_000_000;

#[derive(Debug, Clone, Args)]
pub struct Policy {
    /// A witness whose cosignature counts (repeat; default: every other member with the
    /// witness role).
    #[arg(long = "witness")]
    pub witnesses: Vec<String>,
    /// How many of the witnesses must have cosigned (default: a majority).
    #[arg(long)]
    pub quorum: Option<usize>,
}

/// How recently a live log's witnesses must have vouched for the checkpoint relied on.
#[derive(Debug, Clone, Args)]
pub struct Freshness {
    /// Fail unless a quorum of the witnesses cosigned the checkpoint within this long
    /// (`90m`, `24h`, `7d`; `off` for any age). A node asks its witnesses again every
    /// `audit.cosignature_refresh_s` (10 minutes unless set) while its log still matches
    /// what it signed, so an older quorum means the log stopped checkpointing, or its
    /// witnesses cannot be reached. With `--quorum 0` no one vouches, and no age is
    /// checked.
    #[arg(long, default_value = "24h", value_parser = parse_max_age)]
    pub max_age: MaxAge,
}

/// A longest age in seconds, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAge(pub Option<u64>);

/// Longest `--max-age` taken: beyond ten years it would be `off` in all but name.
const MAX_AGE_LIMIT_S: u64 = 3650 * 86_400;

fn parse_max_age(text: &str) -> Result<MaxAge, String> {
    if text == "off" {
        return Ok(MaxAge(None));
    }
    let unit = text.chars().last().unwrap_or(' ');
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => {
            return Err(
                "give a number and a unit, s, m, h or d (`30m`, `24h`, `7d`), or `off`".into(),
            );
        }
    };
    let secs = text[..text.len() - 1]
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|s| (1..=MAX_AGE_LIMIT_S).contains(s))
        .ok_or("give a whole number from 1 with its unit, at most ten years (`3650d`), or `off`")?;
    Ok(MaxAge(Some(secs)))
}

/// An age in the largest whole unit, for people: `45 s`, `12 min`, `5 h`, `3 d`.
fn describe_age(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7_200 => format!("{} min", secs / 60),
        7_200..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Fetch a node's latest checkpoint and check its signature and cosignatures.
    Checkpoint {
        org: String,
        #[command(flatten)]
        policy: Policy,
        #[command(flatten)]
        fresh: Freshness,
    },
    /// Rebuild a node's tree from its entries, check it against its checkpoint and
    /// against every checkpoint verified before, and remember what was verified; fails
    /// too unless the witness quorum cosigned the checkpoint (`--quorum 0` to check the
    /// entries alone).
    Verify {
        org: String,
        #[command(flatten)]
        policy: Policy,
        #[command(flatten)]
        fresh: Freshness,
    },
    /// Write a node's checkpoint and entries to a file for offline verification.
    Export {
        org: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify an exported log offline: its entries against its signed checkpoint, and
    /// the checkpoint's cosignatures against the witness quorum (`--quorum 0` to check
    /// the entries alone).
    VerifyExport {
        file: PathBuf,
        #[command(flatten)]
        policy: Policy,
    },
    /// Check that every referral each node says it delivered to the other is in the
    /// other's log, where its signed receipt says; fails too unless the witness quorum
    /// cosigned both checkpoints (a log can show a fork to one auditor alone).
    CrossCheck {
        a: String,
        b: String,
        #[command(flatten)]
        policy: Policy,
        #[command(flatten)]
        fresh: Freshness,
    },
    /// Write an offline proof (c2sp.org/tlog-proof) that entry N is in a node's log;
    /// refused unless the witness quorum cosigned the checkpoint it proves against.
    Prove {
        org: String,
        #[arg(long)]
        index: u64,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        policy: Policy,
        #[command(flatten)]
        fresh: Freshness,
    },
}

/// The auditor's view of the federation and its connection material.
struct Auditor {
    directory: Directory,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    state: PathBuf,
    max_entries: u64,
    output: Output,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    files::read_file(path, MAX_FILE_BYTES)
}

fn progress(output: Output, done: u64, total: u64) {
    if output == Output::Text && std::io::stderr().is_terminal() {
        crate::terminal::write_stderr(format_args!("\r  {done}/{total} entries"));
        if done == total {
            errln!();
        }
    }
}

/// A checkpoint the auditor verified, as kept in its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pinned {
    size: u64,
    root: String,
    note: String,
    verified_at_ms: i64,
    /// The log's verifier key (C2SP vkey) the note was verified with. A log's signing
    /// key may change later; the pin must still be its signed word. Absent in states
    /// written before pins named their key: those verify with the directory's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

impl Pinned {
    fn root_hash(&self) -> Option<Hash> {
        B64.decode(&self.root).ok()?.try_into().ok()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    checkpoints: Vec<Pinned>,
    /// Hex leaf hashes verified so far, by index.
    leaves: Vec<String>,
}

/// A log as fetched: its verified checkpoint and its entries.
struct Fetched {
    checkpoint: Checkpoint,
    note: String,
    verifier: NoteVerifier,
    entries: Vec<Vec<u8>>,
}

impl Auditor {
    fn new(args: &AuditArgs, output: Output) -> Result<Self, String> {
        let identity = args
            .identity
            .clone()
            .ok_or("no auditor identity: pass --identity DIR or set CORRIDOR_AUDIT_IDENTITY")?;
        let parent = identity.parent().unwrap_or(Path::new(".")).to_owned();
        let ca = read(&args.ca.clone().unwrap_or_else(|| parent.join("ca.pem")))?;
        let dir_path = args
            .directory
            .clone()
            .unwrap_or_else(|| parent.join("directory.toml"));
        let governance_path = args
            .governance
            .clone()
            .unwrap_or_else(|| parent.join("governance.toml"));
        let governance =
            toml::from_str::<GovernanceFile>(&String::from_utf8_lossy(&read(&governance_path)?))
                .map_err(|e| format!("{}: {}", governance_path.display(), e.message()))?
                .governance
                .governance()
                .map_err(|e| format!("{}: {e}", governance_path.display()))?;
        let directory = Directory::from_signed(
            &String::from_utf8_lossy(&read(&dir_path)?),
            &String::from_utf8_lossy(&read(&corridor::directory::signatures_path(&dir_path))?),
            &governance,
            corridor_node::node::now_ms(),
        )
        .map_err(|e| format!("{}: {e}", dir_path.display()))?;
        Ok(Self {
            directory,
            ca,
            cert: read(&identity.join("tls.pem"))?,
            // Readable by the auditor only, as a node requires of its own key.
            key: files::read_secret_file(&identity.join("tls.key"), MAX_FILE_BYTES)?,
            state: args.state.clone(),
            max_entries: args.max_entries,
            output,
        })
    }

    fn member(&self, org: &str) -> Result<&corridor::Member, String> {
        let id = OrgId::new(org).map_err(|e| format!("{org:?}: {e}"))?;
        self.directory
            .get(&id)
            .ok_or_else(|| format!("{org} is not a member of the federation"))
    }

    async fn client(&self, org: &str) -> Result<AuditClient<Channel>, String> {
        let member = self.member(org)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key));
        let channel = Endpoint::from_shared(member.endpoint.clone())
            .map_err(|e| format!("endpoint of {org}: {e}"))?
            .tls_config(tls)
            .map_err(|e| format!("TLS setup: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("cannot reach {org} at {}: {e}", member.endpoint))?;
        Ok(AuditClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }

    fn log_verifier(&self, org: &str) -> Result<NoteVerifier, String> {
        let member = self.member(org)?;
        Ok(NoteVerifier::new(
            &corridor::audit::origin(&self.directory.federation, &member.id),
            member.signing_key,
        ))
    }

    fn witnesses(
        &self,
        org: &str,
        policy: &Policy,
    ) -> Result<(Vec<CosignatureVerifier>, usize), String> {
        let mut ids: Vec<OrgId> = if policy.witnesses.is_empty() {
            self.directory
                .members()
                .filter(|m| m.has_role(Role::Witness) && m.id.as_str() != org)
                .map(|m| m.id.clone())
                .collect()
        } else {
            policy
                .witnesses
                .iter()
                .map(|w| OrgId::new(w).map_err(|e| format!("{w:?}: {e}")))
                .collect::<Result<_, _>>()?
        };
        // A witness named twice counts once, and a log cannot witness itself.
        ids.sort();
        ids.dedup();
        if ids.iter().any(|id| id.as_str() == org) {
            return Err(format!("{org} cannot witness its own log"));
        }
        let verifiers = ids
            .iter()
            .map(|id| {
                let m = self.member(id.as_str())?;
                // Only members with the witness role cosign: another could never count.
                if !m.has_role(Role::Witness) {
                    return Err(format!(
                        "{id} is not a witness: the directory gives it no witness role"
                    ));
                }
                Ok(CosignatureVerifier::new(
                    &corridor::audit::witness_name(&self.directory.federation, id),
                    m.signing_key,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let quorum = policy.quorum.unwrap_or(verifiers.len() / 2 + 1);
        if quorum > verifiers.len() {
            return Err(format!(
                "a quorum of {quorum} can never be met by {} witness(es)",
                verifiers.len()
            ));
        }
        Ok((verifiers, quorum))
    }

    /// Fetches and verifies a node's checkpoint signature; returns it with its note.
    async fn checkpoint(
        &self,
        client: &mut AuditClient<Channel>,
        org: &str,
    ) -> Result<(Checkpoint, String, NoteVerifier), String> {
        let response = client
            .get_checkpoint(pb::GetCheckpointRequest {})
            .await
            .map_err(|s| format!("{org}: {}", s.message()))?
            .into_inner();
        let verifier = self.log_verifier(org)?;
        let checkpoint = checkpoint::open(&response.note, &verifier).map_err(|e| {
            format!("{org}'s checkpoint does not verify with its directory key: {e}")
        })?;
        Ok((checkpoint, response.note, verifier))
    }

    /// Fetches a log's checkpoint and every entry it covers, all held in memory.
    async fn fetch(&self, org: &str) -> Result<Fetched, String> {
        // The size is the audited node's word: reserve for one page, not for what it claims.
        let mut entries = Vec::with_capacity(1000);
        let (checkpoint, note, verifier) = self
            .fetch_pages(org, |_, mut page| entries.append(&mut page))
            .await?;
        Ok(Fetched {
            checkpoint,
            note,
            verifier,
            entries,
        })
    }

    /// Fetches a log's checkpoint, then the entries it covers a page at a time, handing
    /// each page with the index of its first entry to `page` and keeping none.
    async fn fetch_pages(
        &self,
        org: &str,
        mut page: impl FnMut(u64, Vec<Vec<u8>>),
    ) -> Result<(Checkpoint, String, NoteVerifier), String> {
        let mut client = self.client(org).await?;
        let (checkpoint, note, verifier) = self.checkpoint(&mut client, org).await?;
        if checkpoint.size > self.max_entries {
            return Err(format!(
                "{org}'s checkpoint covers {} entries, more than this auditor fetches (--max-entries {}): raise --max-entries to audit a log this large",
                checkpoint.size, self.max_entries
            ));
        }
        let mut start = 0;
        while start < checkpoint.size {
            let end = (start + 1000).min(checkpoint.size);
            let entries = client
                .get_entries(pb::GetEntriesRequest { start, end })
                .await
                .map_err(|s| format!("{org}: {}", s.message()))?
                .into_inner()
                .entries;
            let got = entries.len() as u64;
            page(start, entries);
            if got != end - start {
                // The node could not produce every entry its checkpoint covers.
                return Err(format!(
                    "{org}'s log is missing entries: asked for {start}..{end}, got {got}; entry {} is missing",
                    start + got
                ));
            }
            start = end;
            progress(self.output, start, checkpoint.size);
        }
        Ok((checkpoint, note, verifier))
    }

    fn state_path(&self, org: &str) -> PathBuf {
        self.state.join(format!("{org}.json"))
    }

    fn load_state(&self, org: &str) -> Result<State, String> {
        let path = self.state_path(org);
        if !path.exists() {
            return Ok(State::default());
        }
        serde_json::from_slice(&files::read_file(&path, MAX_AUDIT_FILE_BYTES)?).map_err(|e| {
            format!(
                "the auditor state {} is damaged or was edited: it is not the JSON this tool writes ({e}); restore it from a backup (removing it starts over and forgets every checkpoint verified before)",
                path.display()
            )
        })
    }

    fn save_state(&self, org: &str, state: &State) -> Result<(), String> {
        if self.state.exists() && !self.state.is_dir() {
            return Err(format!(
                "--state {} is a file: it names the directory where the auditor keeps what it verified",
                self.state.display()
            ));
        }
        std::fs::create_dir_all(&self.state)
            .map_err(|e| format!("{}: {e}", self.state.display()))?;
        let path = self.state_path(org);
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(state).map_err(|e| e.to_string())?;
        // On disk before it replaces the last state, and the rename on disk before the
        // auditor reports: a power cut leaves the old state or the new, never a torn one.
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&written)?;
            file.sync_all()
        };
        write().map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::File::open(&self.state)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| format!("{}: {e}", self.state.display()))
    }
}

/// The leaf hashes an auditor's state holds, once they are found to hold together with
/// the checkpoints it pinned: each pinned root is the root of that many leaves, in order
/// of size, and the last covers them all. A state cut or edited by hand would otherwise
/// make this auditor accept a rewritten history as the one it verified before.
fn verified_leaves(state: &State) -> Result<Vec<Hash>, String> {
    let leaves = state
        .leaves
        .iter()
        .enumerate()
        .map(|(i, leaf)| {
            hex::decode(leaf)
                .ok()
                .and_then(|h| Hash::try_from(h).ok())
                .ok_or(format!("leaf {i} is not a hash"))
        })
        .collect::<Result<Vec<Hash>, String>>()?;
    let mut edge = merkle::RightEdge::default();
    let mut remaining = leaves.iter();
    for pinned in &state.checkpoints {
        let root = pinned.root_hash().ok_or(format!(
            "the root pinned at size {} is not a hash",
            pinned.size
        ))?;
        if pinned.size < edge.size() || (pinned.size == edge.size() && pinned.size > 0) {
            return Err(format!(
                "the checkpoint pinned at size {} comes after one of size {}",
                pinned.size,
                edge.size()
            ));
        }
        while edge.size() < pinned.size {
            let leaf = remaining.next().ok_or(format!(
                "it holds {} leaves, fewer than the checkpoint pinned at size {}",
                leaves.len(),
                pinned.size
            ))?;
            edge.push(*leaf);
        }
        if edge.root() != root {
            return Err(format!(
                "its leaves do not hash to the root pinned at size {}",
                pinned.size
            ));
        }
    }
    if edge.size() != leaves.len() as u64 {
        return Err(format!(
            "it holds {} leaves, but its last pinned checkpoint covers {}",
            leaves.len(),
            edge.size()
        ));
    }
    Ok(leaves)
}

/// The signing key a `node-started` entry names. A node records its key at every start,
/// before it signs anything, so a checkpoint of size *s* is signed with the key the last
/// such entry before index *s* names ([`key_for`]).
fn started_with(entry: &corridor::audit::Entry) -> Option<corridor::VerifyingKey> {
    (entry.kind == "node-started")
        .then(|| entry.get("signing_key"))
        .flatten()
        .and_then(|key| corridor::VerifyingKey::from_base64(key).ok())
}

/// The key a checkpoint of `size` was signed with, by `changes`, the index of each
/// `node-started` entry and the key it names under the log's name (see
/// [`started_with`]); the directory's (`current`) where no entry names one.
fn key_for<'k>(
    size: u64,
    current: &'k NoteVerifier,
    changes: &'k [(u64, NoteVerifier)],
) -> &'k NoteVerifier {
    changes
        .iter()
        .rev()
        .find(|(index, _)| *index < size)
        .map_or(current, |(_, key)| key)
}

/// Why an auditor's pinned checkpoints do not stand.
#[derive(Debug, PartialEq, Eq)]
enum PinProblem {
    /// The state is not this log's, or not as this auditor wrote it.
    Damaged(String),
    /// A pin was signed with a key the log's entries do not name for its size: the state
    /// was edited, or the log was rewritten without the entries that named the key.
    KeyUnexplained(u64),
}

/// Checks that every checkpoint an auditor's state pinned is the log's signed word for
/// its size and root: a state copied from another log's, or edited, would otherwise
/// have this auditor accuse an honest log of rewriting its history. Each pin verifies
/// under the key the log's entries name for its size ([`key_for`]), which must be the
/// key the pin recorded, if it recorded one: a log whose signing key changed since is
/// still the log it was, and a key the log never used signs nothing here.
fn pinned_by(
    state: &State,
    current: &NoteVerifier,
    changes: &[(u64, NoteVerifier)],
) -> Result<(), PinProblem> {
    let not_signed = |size: u64| {
        PinProblem::Damaged(format!(
            "the checkpoint pinned at size {size} is not this log's signed checkpoint of that size and root"
        ))
    };
    for pinned in &state.checkpoints {
        let key = key_for(pinned.size, current, changes);
        if let Some(recorded) = &pinned.key {
            // A key under another log's name: a state copied from another log's.
            let recorded = NoteVerifier::parse(recorded)
                .ok()
                .filter(|recorded| recorded.name() == current.name())
                .ok_or_else(|| not_signed(pinned.size))?;
            if recorded != *key {
                return Err(PinProblem::KeyUnexplained(pinned.size));
            }
        }
        let signed = checkpoint::open(&pinned.note, key).ok();
        if signed.is_none_or(|cp| Some(cp.root) != pinned.root_hash() || cp.size != pinned.size) {
            return Err(not_signed(pinned.size));
        }
    }
    Ok(())
}

/// What a log's witnesses say of one of its checkpoints, under the auditor's policy.
struct Witnessed {
    /// The witnesses whose cosignatures verify.
    names: Vec<String>,
    witnesses: usize,
    quorum: usize,
    /// The latest time (seconds since the epoch) a quorum of them vouched for it.
    quorum_at: Option<u64>,
}

impl Witnessed {
    fn of(auditor: &Auditor, org: &str, note: &str, policy: &Policy) -> Result<Self, String> {
        let (verifiers, quorum) = auditor.witnesses(org, policy)?;
        let cosigners = checkpoint::cosigners(note, &verifiers);
        Ok(Self {
            names: cosigners.iter().map(|(v, _)| v.name().to_owned()).collect(),
            witnesses: verifiers.len(),
            quorum,
            quorum_at: checkpoint::quorum_time(
                cosigners.iter().map(|(_, at)| *at),
                quorum,
                corridor_node::node::now_s(),
            ),
        })
    }

    fn met(&self) -> bool {
        self.names.len() >= self.quorum
    }

    /// How long ago the quorum last vouched; a witness's clock ahead of ours counts as now.
    fn age_s(&self) -> Option<u64> {
        let now_s = corridor_node::node::now_s();
        self.quorum_at.map(|at| now_s.saturating_sub(at))
    }

    /// The figures, for a command's JSON line.
    fn json(&self) -> serde_json::Value {
        json!({
            "cosigned_by": self.names, "witnesses": self.witnesses, "quorum": self.quorum,
            "quorum_met": self.met(),
            "quorum_cosigned_at": self
                .quorum_at
                .and_then(|at| i64::try_from(at).ok()?.checked_mul(1000))
                .map(corridor::utc::format),
            "quorum_age_s": self.age_s(),
        })
    }

    /// `cosigned by 2 of 3 witnesses (…), quorum 2: MET, vouched for 4 min ago`.
    fn describe(&self) -> String {
        let mut text = format!(
            "cosigned by {} of {} witnesses ({}), quorum {}: {}",
            self.names.len(),
            self.witnesses,
            self.names.join(", "),
            self.quorum,
            if self.met() { "MET" } else { "NOT MET" }
        );
        if let Some(age) = self.age_s() {
            text.push_str(&format!(", vouched for {} ago", describe_age(age)));
        }
        text
    }

    /// Fails if the quorum last vouched for the checkpoint longer ago than `fresh` allows.
    fn require_fresh(&self, org: &str, fresh: &Freshness) -> Result<(), String> {
        match (self.age_s(), fresh.max_age.0) {
            (Some(age), Some(max)) if age > max => Err(format!(
                "{org}: its witnesses' quorum last vouched for its checkpoint {} ago, longer than --max-age allows ({}): the node has stopped checkpointing its log, as it does when its stored log no longer matches what it signed, or cannot reach its witnesses (`--max-age off` to accept it)",
                describe_age(age),
                describe_age(max)
            )),
            _ => Ok(()),
        }
    }
}

/// Merges `extra`'s fields into the JSON object `value`.
fn with_fields(mut value: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(into), serde_json::Value::Object(from)) = (value.as_object_mut(), extra) {
        into.extend(from);
    }
    value
}

fn hashes(proof: &[Vec<u8>]) -> Result<Vec<Hash>, String> {
    proof
        .iter()
        .map(|h| {
            <Hash>::try_from(h.as_slice()).map_err(|_| "proof hash is not 32 bytes".to_string())
        })
        .collect()
}

pub async fn run(args: AuditArgs, output: Output) -> Result<(), String> {
    let auditor = Auditor::new(&args, output)?;
    match args.command {
        AuditCommand::Checkpoint { org, policy, fresh } => {
            let mut client = auditor.client(&org).await?;
            let (cp, note, _) = auditor.checkpoint(&mut client, &org).await?;
            let witnessed = Witnessed::of(&auditor, &org, &note, &policy)?;
            let ok = witnessed.met();
            emit(
                output,
                with_fields(
                    json!({
                        "org": org, "origin": cp.origin, "size": cp.size,
                        "root": B64.encode(cp.root), "ok": ok,
                    }),
                    witnessed.json(),
                ),
                || {
                    format!(
                        "{org}: checkpoint of size {} signed by the log (verified); {}",
                        cp.size,
                        witnessed.describe()
                    )
                },
            );
            if !ok {
                return Err(format!(
                    "{org}: only {} of the required {} witnesses cosigned its checkpoint",
                    witnessed.names.len(),
                    witnessed.quorum
                ));
            }
            witnessed.require_fresh(&org, &fresh)
        }
        AuditCommand::Verify { org, policy, fresh } => {
            verify(&auditor, &org, &policy, &fresh).await
        }
        AuditCommand::Export { org, out } => {
            let fetched = auditor.fetch(&org).await?;
            let file = json!({
                "format": "corridor-audit-export/v1",
                "org": org,
                "origin": fetched.checkpoint.origin,
                "verifier_key": fetched.verifier.to_string(),
                "checkpoint": fetched.note,
                "entries": fetched.entries.iter().map(|e| B64.encode(e)).collect::<Vec<_>>(),
            });
            std::fs::write(
                &out,
                serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?,
            )
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            emit(
                output,
                json!({"org": org, "entries": fetched.entries.len(), "out": out}),
                || {
                    format!(
                        "exported {} entries of {org} to {}",
                        fetched.entries.len(),
                        out.display()
                    )
                },
            );
            Ok(())
        }
        AuditCommand::VerifyExport { file, policy } => verify_export(&auditor, &file, &policy),
        AuditCommand::CrossCheck {
            a,
            b,
            policy,
            fresh,
        } => cross_check(&auditor, &a, &b, &policy, &fresh).await,
        AuditCommand::Prove {
            org,
            index,
            out,
            policy,
            fresh,
        } => {
            let mut client = auditor.client(&org).await?;
            let (cp, note, _) = auditor.checkpoint(&mut client, &org).await?;
            require_witnessed(&auditor, &org, &note, &policy, &fresh)?;
            if index >= cp.size {
                return Err(format!(
                    "{org}'s checkpoint covers entries 0..{}; {index} is not among them",
                    cp.size
                ));
            }
            let proof = client
                .get_inclusion_proof(pb::GetInclusionProofRequest {
                    tree_size: cp.size,
                    index,
                    leaf_hash: Vec::new(),
                })
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner();
            let entry = client
                .get_entries(pb::GetEntriesRequest {
                    start: index,
                    end: index + 1,
                })
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner()
                .entries
                .pop()
                .ok_or("entry missing")?;
            let proof_hashes = hashes(&proof.proof)?;
            merkle::verify_inclusion(
                index,
                cp.size,
                &merkle::leaf_hash(&entry),
                &proof_hashes,
                &cp.root,
            )
            .map_err(|e| format!("the node's proof does not verify: {e}"))?;
            let mut text = format!(
                "c2sp.org/tlog-proof@v1\nextra {}\nindex {index}\n",
                B64.encode(&entry)
            );
            for h in &proof_hashes {
                text.push_str(&B64.encode(h));
                text.push('\n');
            }
            text.push('\n');
            text.push_str(&note);
            match out {
                Some(path) => {
                    std::fs::write(&path, &text)
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    emit(
                        output,
                        json!({"org": org, "index": index, "out": path}),
                        || {
                            format!(
                                "proof that entry {index} is in {org}'s log (size {}) written to {}",
                                cp.size,
                                path.display()
                            )
                        },
                    );
                }
                // The proof format itself, signed note included: not for escaping, unless
                // a person reads it, whose terminal the log's words must not drive.
                None if std::io::IsTerminal::is_terminal(&std::io::stdout()) => {
                    for line in text.lines() {
                        outln!("{}", crate::terminal::escape_controls(line));
                    }
                }
                None => out!("{text}"),
            }
            Ok(())
        }
    }
}

fn emit(output: Output, value: serde_json::Value, text: impl FnOnce() -> String) {
    match output {
        Output::Json => outln!("{value}"),
        Output::Text => outln!("{}", text()),
    }
}

async fn verify(
    auditor: &Auditor,
    org: &str,
    policy: &Policy,
    fresh: &Freshness,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    // Entries are read a page at a time and not kept: what the checks need of them is
    // their leaf hashes, their kinds and the keys their node-started entries name.
    let mut leaves: Vec<Hash> = Vec::new();
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    let mut started_keys = Vec::new();
    let mut malformed = None;
    let (checkpoint, note, verifier) = auditor
        .fetch_pages(org, |start, page| {
            for (index, entry) in (start..).zip(&page) {
                leaves.push(merkle::leaf_hash(entry));
                match corridor::audit::decode(entry) {
                    Ok(entry) => {
                        started_keys.extend(started_with(&entry).map(|key| (index, key)));
                        *kinds.entry(entry.kind).or_default() += 1;
                    }
                    Err(err) => {
                        malformed
                            .get_or_insert(format!("{org}: entry {index} is malformed: {err}"));
                    }
                }
            }
        })
        .await?;
    let cp = &checkpoint;
    let mut state = auditor.load_state(org)?;

    let root_matches = merkle::root(&leaves) == cp.root;
    let changes: Vec<(u64, NoteVerifier)> = started_keys
        .into_iter()
        .map(|(index, key)| (index, NoteVerifier::new(verifier.name(), key)))
        .collect();
    let damaged = |problem: String| {
        format!(
            "the auditor state {} is damaged or was edited: {problem}; restore it from a backup (removing it starts over and forgets every checkpoint verified before)",
            auditor.state_path(org).display()
        )
    };
    let verified = match pinned_by(&state, &verifier, &changes) {
        Ok(()) => verified_leaves(&state).map_err(damaged)?,
        Err(PinProblem::Damaged(problem)) => return Err(damaged(problem)),
        // Entries that are not the ones the log signed name no keys: the check of the
        // root below fails and locates the change.
        Err(PinProblem::KeyUnexplained(_)) if !root_matches => Vec::new(),
        Err(PinProblem::KeyUnexplained(size)) => {
            return Err(format!(
                "{org}: the checkpoint of size {size} pinned in the auditor state {} was signed with a key that {org}'s log does not name for that size: either the state was edited, or the log was rewritten without the node-started entries that named its earlier key. Keep the state: its pins are the log's signed checkpoints, the evidence if the log was rewritten",
                auditor.state_path(org).display()
            ));
        }
    };
    // What was verified before must still be there, unchanged and in place.
    for (i, old) in verified.iter().enumerate() {
        match leaves.get(i) {
            None => {
                return Err(format!(
                    "{org}'s log shrank: entry {i} (and every later one) verified before is gone"
                ));
            }
            Some(leaf) if leaf != old => {
                return Err(format!(
                    "{org}'s log was rewritten: entry {i} differs from the entry verified before"
                ));
            }
            Some(_) => {}
        }
    }
    // The entries must hash to the signed root.
    if !root_matches {
        let mut client = auditor.client(org).await?;
        for (i, leaf) in leaves.iter().enumerate().skip(verified.len()) {
            let proof = client
                .get_inclusion_proof(pb::GetInclusionProofRequest {
                    tree_size: cp.size,
                    index: i as u64,
                    leaf_hash: Vec::new(),
                })
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner();
            if merkle::verify_inclusion(i as u64, cp.size, leaf, &hashes(&proof.proof)?, &cp.root)
                .is_err()
            {
                return Err(format!(
                    "{org}'s entry {i} does not match its signed checkpoint of size {} (changed, deleted or reordered)",
                    cp.size
                ));
            }
        }
        return Err(format!(
            "{org}'s entries do not hash to its signed checkpoint of size {}",
            cp.size
        ));
    }
    // The last checkpoint verified before must be consistent with this one; each before
    // it was found consistent with the next when that was verified, so with this one too.
    let mut client = auditor.client(org).await?;
    // The empty tree is a prefix of every tree, and no proof starts from it.
    if let Some(pinned) = state.checkpoints.last().filter(|p| p.size > 0) {
        let root = pinned.root_hash().ok_or("auditor state is corrupt")?;
        if pinned.size > cp.size {
            return Err(format!(
                "{org} now shows a tree of size {} but earlier signed one of size {}: a fork",
                cp.size, pinned.size
            ));
        }
        let proof = client
            .get_consistency_proof(pb::GetConsistencyProofRequest {
                old_size: pinned.size,
                new_size: cp.size,
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        merkle::verify_consistency(pinned.size, cp.size, &hashes(&proof.proof)?, &root, &cp.root).map_err(|e| {
            format!("{org}'s checkpoint of size {} is not consistent with its earlier checkpoint of size {}: {e}", cp.size, pinned.size)
        })?;
    }
    let witnessed = Witnessed::of(auditor, org, &note, policy)?;
    if let Some(malformed) = malformed {
        return Err(malformed);
    }
    state.leaves = leaves.iter().map(hex::encode).collect();
    // Pins from before pins recorded keys verified under the directory's key above:
    // record it, so that they still verify once the log's key changes.
    for pinned in state.checkpoints.iter_mut().filter(|p| p.key.is_none()) {
        pinned.key = Some(key_for(pinned.size, &verifier, &changes).to_string());
    }
    if state.checkpoints.last().is_none_or(|p| p.size != cp.size) {
        state.checkpoints.push(Pinned {
            size: cp.size,
            root: B64.encode(cp.root),
            note: note.clone(),
            verified_at_ms: corridor_node::node::now_ms(),
            key: Some(verifier.to_string()),
        });
    }
    // The checkpoint is pinned even without its quorum: it is the log's own signed word,
    // and a later one inconsistent with it is a fork this auditor can then prove.
    auditor.save_state(org, &state)?;
    let secs = started.elapsed().as_secs_f64();
    let quorum_met = witnessed.met();
    emit(
        auditor.output,
        with_fields(
            json!({
                "org": org, "size": cp.size, "ok": quorum_met, "entries_by_kind": kinds,
                "pinned_checkpoints": state.checkpoints.len(), "seconds": secs,
            }),
            witnessed.json(),
        ),
        || {
            // Entry kinds are the audited node's word.
            let kinds: Vec<String> = kinds
                .iter()
                .map(|(k, n)| format!("{n} {}", escape_controls(k)))
                .collect();
            format!(
                "{org}: {} entries verified against its signed checkpoint, consistent with {} checkpoint(s) verified before; {}; {}",
                cp.size,
                state.checkpoints.len().saturating_sub(1),
                witnessed.describe(),
                kinds.join(", ")
            )
        },
    );
    if !quorum_met {
        // Without its witnesses, this log may be showing this auditor a view of its own.
        return Err(format!(
            "{org}: its entries verify, but only {} of the required {} witnesses cosigned its checkpoint",
            witnessed.names.len(),
            witnessed.quorum
        ));
    }
    witnessed.require_fresh(org, fresh)?;
    Ok(())
}

fn verify_export(auditor: &Auditor, file: &Path, policy: &Policy) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Export {
        format: String,
        org: String,
        checkpoint: String,
        entries: Vec<String>,
    }
    let export: Export = serde_json::from_slice(&files::read_file(file, MAX_AUDIT_FILE_BYTES)?)
        .map_err(|e| {
            format!(
                "{} is not an export written by `corridor audit export` ({e})",
                file.display()
            )
        })?;
    if export.format != "corridor-audit-export/v1" {
        return Err(format!("{} is not a corridor audit export", file.display()));
    }
    let started = std::time::Instant::now();
    // Trust the key the directory lists, not the one in the file.
    let verifier = auditor.log_verifier(&export.org)?;
    let cp = checkpoint::open(&export.checkpoint, &verifier)
        .map_err(|e| format!("the exported checkpoint does not verify: {e}"))?;
    let entries = export
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            B64.decode(e)
                .map_err(|_| format!("entry {i} is not base64"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if entries.len() as u64 != cp.size {
        return Err(format!(
            "the export holds {} entries but its checkpoint covers {}",
            entries.len(),
            cp.size
        ));
    }
    let leaves: Vec<Hash> = entries.iter().map(|e| merkle::leaf_hash(e)).collect();
    if merkle::root(&leaves) != cp.root {
        return Err("the exported entries do not hash to the exported checkpoint".into());
    }
    for (i, e) in entries.iter().enumerate() {
        corridor::audit::decode(e).map_err(|err| format!("entry {i} is malformed: {err}"))?;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    // As online: without its witnesses, an export may be a view the log made for one
    // auditor.
    // The export is a snapshot: how long ago its quorum vouched is told, not judged.
    let witnessed = Witnessed::of(auditor, &export.org, &export.checkpoint, policy)?;
    let quorum_met = witnessed.met();
    let org = escape_controls(&export.org);
    emit(
        auditor.output,
        with_fields(
            json!({
                "org": export.org, "size": cp.size, "ok": quorum_met,
                "entries_per_second": cp.size as f64 / secs,
            }),
            witnessed.json(),
        ),
        || {
            format!(
                "{org}: exported log of {} entries verified offline against its signed checkpoint; {}",
                cp.size,
                witnessed.describe()
            )
        },
    );
    if !quorum_met {
        return Err(format!(
            "{org}: the exported entries verify, but only {} of the required {} witnesses cosigned its checkpoint",
            witnessed.names.len(),
            witnessed.quorum
        ));
    }
    Ok(())
}

/// Fails unless the witness quorum cosigned `org`'s checkpoint `note`, recently enough:
/// what is proved against a checkpoint no quorum saw may be a fork shown to this auditor
/// alone, and one they saw long ago may hide all the log wrote since.
fn require_witnessed(
    auditor: &Auditor,
    org: &str,
    note: &str,
    policy: &Policy,
    fresh: &Freshness,
) -> Result<Witnessed, String> {
    let witnessed = Witnessed::of(auditor, org, note, policy)?;
    if !witnessed.met() {
        return Err(format!(
            "{org}: only {} of the required {} witnesses cosigned its checkpoint, so what is proved against it may be a fork (`--quorum 0` to check regardless)",
            witnessed.names.len(),
            witnessed.quorum
        ));
    }
    witnessed.require_fresh(org, fresh)?;
    Ok(witnessed)
}

/// What a recipient's log says of a receipt the sender's `referral-delivered` entry holds.
#[derive(Debug, PartialEq, Eq)]
enum Backing {
    /// The entry the receipt names is the recipient's `referral-received` entry for this
    /// envelope, from this sender.
    Backed,
    /// The entry comes after the recipient's checkpoint, and the receipt is recent enough
    /// for the recipient to have written it after signing the checkpoint read: not
    /// checkable yet.
    NotYetCovered,
    Missing {
        message: String,
        index: u64,
    },
}

/// How long a log may take to cover what it wrote with a checkpoint its witnesses saw,
/// clocks apart included: far more than a node takes (a checkpoint a second, by default).
const COVERED_WITHIN_MS: i64 = 3600 * 1000;

/// The time before which a log's entries must be in its checkpoint: an hour before its
/// witnesses' quorum last vouched for it (`quorum_at`, seconds), or before now if no one
/// vouches (`--quorum 0`).
fn covers_before(quorum_at: Option<u64>) -> i64 {
    let vouched_ms = quorum_at
        .and_then(|at| i64::try_from(at).ok()?.checked_mul(1000))
        .unwrap_or_else(corridor_node::node::now_ms);
    vouched_ms.saturating_sub(COVERED_WITHIN_MS)
}

/// Checks the receipt that the sender's `delivered` entry records against the
/// recipient's `entries` (those its checkpoint of `size` covers). An entry past the
/// checkpoint counts as not yet covered only if the sender recorded the receipt after
/// `covers_before_ms`; an older one must be there, or a recipient could sign receipts
/// naming places its log never reaches.
fn receipt_backing(
    sender: &str,
    delivered: &corridor::audit::Entry,
    entries: &[Vec<u8>],
    size: u64,
    covers_before_ms: i64,
) -> Result<Backing, String> {
    let message = delivered.get("message_id").unwrap_or_default();
    let index: u64 = delivered
        .get("recipient_log_index")
        .and_then(|i| i.parse().ok())
        .ok_or("malformed delivered entry")?;
    if index >= size && delivered.time_ms >= covers_before_ms {
        return Ok(Backing::NotYetCovered);
    }
    let leaf = delivered
        .get("recipient_leaf_hash")
        .and_then(|h| hex::decode(h).ok())
        .unwrap_or_default();
    let found = usize::try_from(index).ok().and_then(|i| entries.get(i));
    // The entry must be its record of receiving this very envelope: another entry naming
    // the message (a refusal, say) would have the recipient sign for what it refused.
    let backed = found.is_some_and(|f| merkle::leaf_hash(f).as_slice() == leaf.as_slice())
        && found
            .and_then(|f| corridor::audit::decode(f).ok())
            .is_some_and(|r| {
                r.kind == "referral-received"
                    && r.get("message_id") == Some(message)
                    && r.get("sender") == Some(sender)
                    && r.get("envelope_digest") == delivered.get("envelope_digest")
            });
    Ok(if backed {
        Backing::Backed
    } else {
        Backing::Missing {
            message: message.to_owned(),
            index,
        }
    })
}

async fn cross_check(
    auditor: &Auditor,
    a: &str,
    b: &str,
    policy: &Policy,
    fresh: &Freshness,
) -> Result<(), String> {
    if a == b {
        return Err(format!(
            "cross-check compares two orgs' logs: {a} was named twice"
        ));
    }
    let logs = [(a, auditor.fetch(a).await?), (b, auditor.fetch(b).await?)];
    // Per log, the time before which what it wrote must be in the checkpoint read.
    let mut covers_before_ms = Vec::new();
    for (org, log) in &logs {
        let witnessed = require_witnessed(auditor, org, &log.note, policy, fresh)?;
        covers_before_ms.push(covers_before(witnessed.quorum_at));
    }
    // Entries count only if they are the ones each log signed.
    for (org, log) in &logs {
        let leaves: Vec<Hash> = log.entries.iter().map(|e| merkle::leaf_hash(e)).collect();
        if merkle::root(&leaves) != log.checkpoint.root {
            return Err(format!(
                "{org}'s entries do not hash to its signed checkpoint; `corridor audit verify {org}` locates the change"
            ));
        }
    }
    let mut problems = Vec::new();
    let (mut checked, mut not_yet_covered) = (0u64, 0u64);
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let (sender, sender_log) = &logs[from];
        let (recipient, recipient_log) = &logs[to];
        for e in &sender_log.entries {
            let entry = corridor::audit::decode(e).map_err(|err| format!("{sender}: {err}"))?;
            if entry.kind != "referral-delivered" || entry.get("recipient") != Some(recipient) {
                continue;
            }
            checked += 1;
            match receipt_backing(
                sender,
                &entry,
                &recipient_log.entries,
                recipient_log.checkpoint.size,
                covers_before_ms[to],
            )? {
                Backing::Backed => {}
                Backing::NotYetCovered => not_yet_covered += 1,
                Backing::Missing { message, index } => problems.push(format!(
                    "{sender} holds {recipient}'s receipt for {message} naming {recipient}'s entry {index}, but that entry is missing from {recipient}'s log or is not its record of receiving it"
                )),
            }
        }
    }
    emit(
        auditor.output,
        json!({
            "a": a, "b": b, "receipts_checked": checked, "problems": problems,
            "not_yet_covered": not_yet_covered,
        }),
        || {
            if problems.is_empty() {
                let backed = checked - not_yet_covered;
                let mut text = format!(
                    "{a} <-> {b}: all {backed} receipts are backed by entries in the recipient's log"
                );
                if not_yet_covered > 0 {
                    text.push_str(&format!(
                        "; {not_yet_covered} name entries the recipient's checkpoint does not cover yet (run again to check them)"
                    ));
                }
                text
            } else {
                // The problems quote message ids from the nodes' logs.
                problems
                    .iter()
                    .map(|p| escape_controls(p))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        },
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "cross-check of {a} and {b} found {} receipt(s) without a matching entry",
            problems.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receipt is backed only by the recipient's record of receiving that envelope from
    /// that sender, at the place the receipt names, within the checkpoint read.
    #[test]
    fn a_receipt_is_backed_only_by_the_record_of_receiving_its_envelope() {
        use corridor::audit::{Event, decode, encode};
        use corridor::{MessageId, OrgId};
        let (id, digest) = (MessageId([1; 16]), [7; 32]);
        let (my, kh) = (
            OrgId::new("shelter-my").unwrap(),
            OrgId::new("shelter-kh").unwrap(),
        );
        let received = |envelope_digest| {
            encode(
                &Event::ReferralReceived {
                    message_id: id,
                    sender: my.clone(),
                    envelope_digest,
                    case: "ref-1".into(),
                    purpose: "reintegration".into(),
                },
                1,
            )
        };
        let refused = encode(
            &Event::EnvelopeRefused {
                message_id: Some(id),
                sender: my.clone(),
                rule: "consent-gate".into(),
            },
            1,
        );
        let delivered = |entry: &[u8], index| {
            decode(&encode(
                &Event::ReferralDelivered {
                    message_id: id,
                    recipient: kh.clone(),
                    envelope_digest: digest,
                    recipient_log_index: index,
                    recipient_leaf_hash: merkle::leaf_hash(entry),
                },
                1,
            ))
            .unwrap()
        };
        // Receipts recorded at 1 ms, the recipient's log covering what it wrote before 0.
        let check = |entry: &Vec<u8>, index, size| {
            let log = vec![b"first".to_vec(), entry.clone()];
            receipt_backing("shelter-my", &delivered(entry, index), &log, size, 0).unwrap()
        };
        assert_eq!(check(&received(digest), 1, 2), Backing::Backed);
        let missing = Backing::Missing {
            message: id.to_hex(),
            index: 1,
        };
        assert_eq!(check(&refused, 1, 2), missing, "a refusal signed for");
        assert_eq!(check(&received([8; 32]), 1, 2), missing, "another envelope");
        assert_eq!(
            check(&received(digest), 0, 2),
            Backing::Missing {
                message: id.to_hex(),
                index: 0,
            }
        );
        assert_eq!(check(&received(digest), 1, 1), Backing::NotYetCovered);
        // Recorded before the time the recipient's log must cover: it had to be there.
        let log = vec![b"first".to_vec()];
        let old = receipt_backing("shelter-my", &delivered(&received(digest), 1), &log, 1, 2);
        assert_eq!(old.unwrap(), missing);
    }

    fn pin(leaves: &[Hash]) -> Pinned {
        Pinned {
            size: leaves.len() as u64,
            root: B64.encode(merkle::root(leaves)),
            note: String::new(),
            verified_at_ms: 0,
            key: None,
        }
    }

    fn state_of(n: u8, pins: &[usize]) -> (State, Vec<Hash>) {
        let leaves: Vec<Hash> = (0..n).map(|i| merkle::leaf_hash(&[i])).collect();
        let state = State {
            checkpoints: pins.iter().map(|&k| pin(&leaves[..k])).collect(),
            leaves: leaves.iter().map(hex::encode).collect(),
        };
        (state, leaves)
    }

    /// The index of each `node-started` entry of `entries` and the key it names, under
    /// `current`'s name, as `verify` gathers them page by page.
    fn key_changes(current: &NoteVerifier, entries: &[Vec<u8>]) -> Vec<(u64, NoteVerifier)> {
        (0..)
            .zip(entries)
            .filter_map(|(index, entry)| {
                let key = started_with(&corridor::audit::decode(entry).ok()?)?;
                Some((index, NoteVerifier::new(current.name(), key)))
            })
            .collect()
    }

    /// A pin of size 3 signed by `key` for the log `name`, recording `recorded`.
    fn signed_pin(
        name: &str,
        key: &corridor::SigningKey,
        recorded: Option<&NoteVerifier>,
    ) -> Pinned {
        let verifier = NoteVerifier::new(name, key.verifying_key());
        let leaves: Vec<Hash> = (0..3u8).map(|i| merkle::leaf_hash(&[i])).collect();
        let cp = Checkpoint {
            origin: name.into(),
            size: 3,
            root: merkle::root(&leaves),
        };
        Pinned {
            note: checkpoint::sign(&cp, &verifier, key),
            key: recorded.map(ToString::to_string),
            ..pin(&leaves)
        }
    }

    #[test]
    fn a_pin_verifies_only_under_the_key_the_log_names_for_its_size() {
        let name = "corridor.network/test/log/shelter-my";
        let key = |seed| corridor::SigningKey::from_seed(&[seed; 32]).expect("key");
        let (old, new, forged) = (key(1), key(2), key(3));
        let verifier = |k: &corridor::SigningKey| NoteVerifier::new(name, k.verifying_key());
        let state = |pin: Pinned| State {
            checkpoints: vec![pin],
            leaves: Vec::new(),
        };
        let started = |k: &corridor::SigningKey| {
            corridor::audit::encode(
                &corridor::audit::Event::NodeStarted {
                    config_sha256: [0; 32],
                    signing_key: k.verifying_key().to_base64(),
                    sealing_key: String::new(),
                    cert_sha256: [0; 32],
                },
                0,
            )
        };
        let other =
            corridor::audit::encode(&corridor::audit::Event::RetentionPurge { deleted: 0 }, 0);
        // Started with the old key (entry 0), pins of size 3 under it, then with the
        // new key (entry 3), which the directory lists now.
        let entries = [started(&old), other.clone(), other, started(&new)];
        let changes = key_changes(&verifier(&new), &entries);
        assert_eq!(changes, [(0, verifier(&old)), (3, verifier(&new))]);
        assert_eq!(key_for(3, &verifier(&new), &changes), &verifier(&old));
        assert_eq!(key_for(4, &verifier(&new), &changes), &verifier(&new));
        assert_eq!(key_for(9, &verifier(&new), &[]), &verifier(&new));

        let current = verifier(&new);
        let pinned_old = signed_pin(name, &old, Some(&verifier(&old)));
        assert_eq!(
            pinned_by(&state(pinned_old.clone()), &current, &changes),
            Ok(())
        );
        // A pin from before pins recorded keys verifies under the key of its time too.
        let keyless_old = signed_pin(name, &old, None);
        assert_eq!(pinned_by(&state(keyless_old), &current, &changes), Ok(()));
        // Without the entries that name it, the old key explains nothing.
        assert_eq!(
            pinned_by(&state(pinned_old), &current, &[]),
            Err(PinProblem::KeyUnexplained(3))
        );
        // A key made up under the log's name, or the new key for a size the old one
        // signed, is not the key the log names for that size.
        for (signer, recorded) in [(&forged, &forged), (&new, &new)] {
            let pin = signed_pin(name, signer, Some(&verifier(recorded)));
            assert_eq!(
                pinned_by(&state(pin), &current, &changes),
                Err(PinProblem::KeyUnexplained(3))
            );
        }
        // A pin that records the right key but was signed by another is not the log's.
        let mislabelled = signed_pin(name, &forged, Some(&verifier(&old)));
        let Err(PinProblem::Damaged(err)) = pinned_by(&state(mislabelled), &current, &changes)
        else {
            panic!("a pin not signed by its key is refused as damaged");
        };
        assert!(err.contains("is not this log's signed checkpoint"), "{err}");
        // Another log's key and pin: a copied state.
        let other_log = "corridor.network/test/log/shelter-kh";
        let copied = signed_pin(
            other_log,
            &old,
            Some(&NoteVerifier::new(other_log, old.verifying_key())),
        );
        let Err(PinProblem::Damaged(err)) = pinned_by(&state(copied), &current, &changes) else {
            panic!("a copied state is refused as damaged");
        };
        assert!(err.contains("is not this log's signed checkpoint"), "{err}");
    }

    #[test]
    fn a_state_that_holds_together_gives_its_leaves() {
        assert_eq!(verified_leaves(&State::default()), Ok(Vec::new()));
        let (state, leaves) = state_of(9, &[3, 4, 9]);
        assert_eq!(verified_leaves(&state), Ok(leaves));
    }

    #[test]
    fn a_state_cut_or_edited_by_hand_is_refused() {
        let (mut cut, _) = state_of(9, &[3, 9]);
        cut.leaves.truncate(5);
        let err = verified_leaves(&cut).unwrap_err();
        assert!(
            err.contains("fewer than the checkpoint pinned at size 9"),
            "{err}"
        );

        let (mut edited, _) = state_of(9, &[3, 9]);
        edited.leaves[1] = hex::encode(merkle::leaf_hash(b"other"));
        let err = verified_leaves(&edited).unwrap_err();
        assert!(err.contains("root pinned at size 3"), "{err}");

        let (mut extra, _) = state_of(9, &[3, 9]);
        extra.leaves.push(hex::encode(merkle::leaf_hash(b"more")));
        let err = verified_leaves(&extra).unwrap_err();
        assert!(err.contains("covers 9"), "{err}");

        let (mut unpinned, _) = state_of(9, &[]);
        let err = verified_leaves(&unpinned).unwrap_err();
        assert!(err.contains("covers 0"), "{err}");
        unpinned.leaves.clear();
        assert!(verified_leaves(&unpinned).is_ok());

        let (mut reordered, _) = state_of(9, &[3, 9]);
        reordered.checkpoints.reverse();
        let err = verified_leaves(&reordered).unwrap_err();
        assert!(err.contains("comes after"), "{err}");

        let (mut not_hex, _) = state_of(9, &[9]);
        not_hex.leaves[4] = "zz".into();
        assert_eq!(
            verified_leaves(&not_hex),
            Err("leaf 4 is not a hash".into())
        );
    }
}
