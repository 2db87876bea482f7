//! `corridor dev-pki`: a development PKI and configuration for a local federation — a
//! federation CA, a TLS certificate and key per org (SAN: `localhost`, `127.0.0.1` and
//! `urn:corridor:org:<id>`), signing, sealing and data-at-rest keys, the directory file and a node.toml
//! per org, and a governance board of three keys (`governance/board-N.key`), any two of
//! which sign the directory (`directory.toml.sig`, here signed by all three). Every private
//! key file is written with mode 0600. Not for production use.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use corridor::directory::{DirectoryFile, MemberEntry};
use corridor::{OrgId, Role, SealingKey, SigningKey};
use corridor_node::keys::write_secret_file;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ring::rand::SecureRandom as _;

/// Keys on the development governance board, and how many of them sign a directory.
const GOVERNANCE_KEYS: usize = 3;
const GOVERNANCE_THRESHOLD: usize = 2;
/// How long a generated directory is in force.
const DIRECTORY_VALIDITY_DAYS: i64 = 365;

/// One organisation to generate material for.
#[derive(Debug, Clone)]
pub struct OrgSpec {
    pub id: OrgId,
    pub name: String,
    pub country: String,
    /// For a state authority, the state it acts for where that is not `country`.
    pub represents: Option<String>,
    pub roles: Vec<Role>,
}

impl std::str::FromStr for OrgSpec {
    type Err = String;
    /// `id:COUNTRY[/REPRESENTS]:role[+role...][:Display name]`, e.g.
    /// `kh-embassy-kl:MY/KH:embassy:Embassy of Cambodia` (in MY, acting for KH).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(4, ':');
        let (Some(id), Some(country), Some(roles)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "org {s:?} must be id:COUNTRY[/REPRESENTS]:role[+role][:name], e.g. shelter-my:MY:shelter"
            ));
        };
        let (country, represents) = match country.split_once('/') {
            Some((country, state)) => (country, Some(state.to_owned())),
            None => (country, None),
        };
        let id = OrgId::new(id).map_err(|e| format!("org {id:?}: {e}"))?;
        let roles = roles
            .split('+')
            .map(|r| {
                toml::Value::String(r.to_owned())
                    .try_into::<Role>()
                    .map_err(|_| format!("org {id}: unknown role {r:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(twice) = roles
            .iter()
            .enumerate()
            .find_map(|(i, r)| roles[..i].contains(r).then_some(r))
        {
            return Err(format!("org {id}: role {} is given twice", twice.as_str()));
        }
        let name = match parts.next() {
            Some(name) if name.trim().is_empty() => {
                return Err(format!(
                    "org {id}: the display name after the last ':' is empty"
                ));
            }
            Some(name) => name,
            None => id.as_str(),
        };
        Ok(Self {
            name: name.to_owned(),
            id,
            country: country.to_owned(),
            represents,
            roles,
        })
    }
}

/// The demo federation: a shelter in Malaysia, a reintegration shelter in Cambodia and
/// the Cambodian embassy in Kuala Lumpur, which witness each other's audit logs, and an
/// auditor (an identity only, it runs no node).
pub fn demo_orgs() -> Vec<OrgSpec> {
    [
        "shelter-my:MY:shelter+witness:Harbour Shelter, Kuala Lumpur (demo)",
        "shelter-kh:KH:shelter+witness:Reintegration Shelter, Phnom Penh (demo)",
        "kh-embassy-kl:MY/KH:embassy+witness:Embassy of Cambodia in Kuala Lumpur (demo)",
        "auditor-demo:MY:auditor:Independent Auditor (demo)",
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
}

/// Ports of one org's listeners.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub federation: u16,
    pub local: u16,
}

/// What was generated for one org.
#[derive(Debug, Clone)]
pub struct GeneratedOrg {
    pub spec: OrgSpec,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub ports: Ports,
}

fn err(context: &str) -> impl Fn(rcgen::Error) -> String + '_ {
    move |e| format!("{context}: {e}")
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("cannot write {}: {e}", path.display())
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now_year = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| 1970 + (d.as_secs() / 31_556_952) as i32)
        .unwrap_or(2026);
    params.not_before = rcgen::date_time_ymd(now_year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(now_year + years, 1, 1);
}

fn write(path: &Path, contents: &[u8]) -> Result<(), String> {
    std::fs::write(path, contents).map_err(io_err(path))
}

fn write_secret(path: &Path, contents: &[u8]) -> Result<(), String> {
    write_secret_file(path, contents).map_err(io_err(path))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "system randomness unavailable".to_string())?;
    Ok(bytes)
}

/// An org's entry in the directory.
fn member_entry(
    spec: &OrgSpec,
    ports: Ports,
    signing: &SigningKey,
    sealing: &SealingKey,
    cert_sha256: &[u8],
) -> MemberEntry {
    MemberEntry {
        id: spec.id.to_string(),
        name: spec.name.clone(),
        country: spec.country.clone(),
        represents: spec.represents.clone(),
        roles: spec.roles.clone(),
        endpoint: format!("https://127.0.0.1:{}", ports.federation),
        signing_key: signing.verifying_key().to_base64(),
        sealing_key: sealing.public_key().to_base64(),
        cert_sha256: hex::encode(cert_sha256),
    }
}

/// Refuses orgs the directory would refuse (an id given twice, a country that is not an
/// ISO code, ...) before anything is written: the directory's own rules, applied to a
/// directory of these orgs with stand-in keys.
fn check_orgs(federation: &str, orgs: &[OrgSpec], ports: &[Ports]) -> Result<(), String> {
    if !corridor::audit::is_federation_name(federation) {
        return Err(corridor::DirectoryError::FederationName(federation.to_owned()).to_string());
    }
    if orgs.is_empty() {
        return Err("at least one org is needed".into());
    }
    let mut ids = std::collections::BTreeSet::new();
    for spec in orgs {
        if !ids.insert(&spec.id) {
            return Err(format!(
                "org {} is given twice; each --org needs an id of its own",
                spec.id
            ));
        }
    }
    let members = orgs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let ports = ports
                .get(i)
                .copied()
                .ok_or("not enough ports for every org")?;
            // Distinct stand-in keys: members may not share one.
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let signing = SigningKey::from_seed(&seed).map_err(|e| e.to_string())?;
            Ok(member_entry(
                spec,
                ports,
                &signing,
                &SealingKey::derive(&seed),
                &corridor::canonical::sha256(&seed),
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    corridor::Directory::from_file(DirectoryFile {
        federation: federation.to_owned(),
        serial: 1,
        expires_at_ms: 0,
        members,
    })
    .map_err(|e| format!("invalid org: {e}"))?;
    Ok(())
}

/// Generates the PKI and configuration under `out`, which must not exist or be empty.
pub fn generate(
    out: &Path,
    federation: &str,
    orgs: &[OrgSpec],
    ports: &[Ports],
) -> Result<Vec<GeneratedOrg>, String> {
    check_orgs(federation, orgs, ports)?;
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(io_err(out))?
            .next()
            .is_some()
    {
        return Err(format!(
            "{} already exists and is not empty; choose another directory",
            out.display()
        ));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;

    let ca_key = KeyPair::generate().map_err(err("CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err("CA"))?;
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("{federation} federation CA (development)"),
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, 5);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err("CA"))?;
    write(&out.join("ca.pem"), ca_cert.pem().as_bytes())?;
    write_secret(&out.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    let issuer = Issuer::new(ca_params, ca_key);

    // The governance board: any GOVERNANCE_THRESHOLD of its keys sign the directory.
    let board_dir = out.join("governance");
    std::fs::create_dir_all(&board_dir).map_err(io_err(&board_dir))?;
    let mut board = Vec::new();
    for i in 1..=GOVERNANCE_KEYS {
        let key = SigningKey::from_seed(&random_bytes::<32>()?).map_err(|e| e.to_string())?;
        write_secret(
            &board_dir.join(format!("board-{i}.key")),
            key.to_base64().as_bytes(),
        )?;
        board.push(key);
    }
    let governance = format!(
        "[governance]\n\
         keys = [{}]\n\
         threshold = {GOVERNANCE_THRESHOLD}\n",
        board
            .iter()
            .map(|k| format!("\"{}\"", k.verifying_key().to_base64()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // For auditors, who run no node: the directory is trusted only as signed by these.
    write(
        &out.join("governance.toml"),
        format!(
            "# The governance keys of {federation}, generated by `corridor dev-pki`.\n{governance}"
        )
        .as_bytes(),
    )?;

    let mut members = Vec::new();
    let mut generated = Vec::new();
    for (i, spec) in orgs.iter().enumerate() {
        let ports = ports
            .get(i)
            .copied()
            .ok_or("not enough ports for every org")?;
        let dir = out.join(spec.id.as_str());
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;

        let key = KeyPair::generate().map_err(err("TLS key"))?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).map_err(err("certificate"))?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.subject_alt_names.push(SanType::URI(
            spec.id.to_uri().try_into().map_err(err("org URI"))?,
        ));
        params
            .distinguished_name
            .push(DnType::CommonName, spec.id.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, &spec.name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 1);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(err("certificate"))?;
        write(&dir.join("tls.pem"), cert.pem().as_bytes())?;
        write_secret(&dir.join("tls.key"), key.serialize_pem().as_bytes())?;

        let signing = SigningKey::from_seed(&random_bytes::<32>()?).map_err(|e| e.to_string())?;
        let sealing = SealingKey::derive(&random_bytes::<32>()?);
        write_secret(&dir.join("signing.key"), signing.to_base64().as_bytes())?;
        write_secret(&dir.join("sealing.key"), sealing.to_base64().as_bytes())?;
        {
            use base64::Engine as _;
            let kek = base64::engine::general_purpose::STANDARD.encode(random_bytes::<32>()?);
            write_secret(&dir.join("data.key"), kek.as_bytes())?;
        }

        members.push(member_entry(
            spec,
            ports,
            &signing,
            &sealing,
            &corridor::canonical::sha256(cert.der()),
        ));

        let config = dir.join("node.toml");
        // Orgs with the witness role witness each other's logs.
        let peers: Vec<String> = if spec.roles.contains(&Role::Witness) {
            orgs.iter()
                .filter(|o| o.id != spec.id && o.roles.contains(&Role::Witness))
                .map(|o| format!("\"{}\"", o.id))
                .collect()
        } else {
            Vec::new()
        };
        let text = format!(
            "# Development configuration of {name} generated by `corridor dev-pki`.\n\
             # Every setting not written here has the default documented in corridor-node.\n\
             org_id = \"{id}\"\n\
             data_dir = \"data\"\n\
             directory = \"../directory.toml\"\n\
             \n\
             {governance}\
             \n\
             [federation]\n\
             listen = \"127.0.0.1:{fed}\"\n\
             ca_cert = \"../ca.pem\"\n\
             cert = \"tls.pem\"\n\
             key = \"tls.key\"\n\
             \n\
             [local]\n\
             listen = \"127.0.0.1:{local}\"\n\
             \n\
             [keys]\n\
             signing_key = \"signing.key\"\n\
             sealing_key = \"sealing.key\"\n\
             data_key = \"data.key\"\n\
             \n\
             [delivery]\n\
             initial_backoff_ms = 200\n\
             max_backoff_ms = 5000\n\
             \n\
             [audit]\n\
             checkpoint_interval_ms = 200\n\
             witnesses = [{peers}]\n\
             witness_for = [{peers}]\n",
            peers = peers.join(", "),
            name = spec.name.replace('"', "'"),
            id = spec.id,
            fed = ports.federation,
            local = ports.local,
        );
        write(&config, text.as_bytes())?;
        generated.push(GeneratedOrg {
            spec: spec.clone(),
            dir,
            config,
            ports,
        });
    }

    let now = corridor_node::node::now_ms();
    let directory = DirectoryFile {
        federation: federation.to_owned(),
        serial: 1,
        expires_at_ms: now.saturating_add(DIRECTORY_VALIDITY_DAYS * 86_400_000),
        members,
    };
    let text = toml::to_string_pretty(&directory).map_err(|e| format!("directory: {e}"))?;
    let header =
        format!("# Federation directory of {federation}, generated by `corridor dev-pki`.\n\n");
    let body = format!("{header}{text}");
    write(&out.join("directory.toml"), body.as_bytes())?;
    let signatures: String = board
        .iter()
        .map(|k| corridor::directory::signature_line(body.as_bytes(), k) + "\n")
        .collect();
    write(&out.join("directory.toml.sig"), signatures.as_bytes())?;
    // Prove the output is a valid, signed directory before anyone relies on it.
    let keys = board.iter().map(|k| k.verifying_key()).collect();
    let governance = corridor::directory::Governance::new(keys, GOVERNANCE_THRESHOLD)
        .map_err(|e| format!("governance: {e}"))?;
    corridor::Directory::from_signed(&body, &signatures, &governance, now)
        .map_err(|e| format!("generated directory: {e}"))?;
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_specs_are_read_and_checked() {
        let embassy: OrgSpec = "kh-embassy-kl:MY/KH:embassy:Embassy".parse().unwrap();
        assert_eq!(embassy.represents.as_deref(), Some("KH"));
        assert_eq!(embassy.name, "Embassy");
        let plain: OrgSpec = "shelter-my:MY:shelter".parse().unwrap();
        assert_eq!(plain.name, "shelter-my");
        for (bad, says) in [
            ("a:MY:shelter:", "display name"),
            ("a:MY:embassy+embassy", "role embassy is given twice"),
            ("a:MY", "must be id:COUNTRY[/REPRESENTS]"),
            ("a:MY:spy", "unknown role"),
        ] {
            let err = bad.parse::<OrgSpec>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
