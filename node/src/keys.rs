//! Loading the node's secrets from files. A secret file must be a regular file that only
//! its owner can read or write (no group or other permission bits); anything looser is
//! refused, so a misconfigured deployment fails at start rather than leaking keys.

use std::path::Path;

use corridor::{SealingKey, SigningKey};

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read secret file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "secret file {path} is accessible by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    TooOpen { path: String, mode: u32 },
    #[error("secret file {path} is not a regular file")]
    NotAFile { path: String },
    #[error("secret file {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
}

/// Reads a secret file after checking its permissions.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile { path: shown });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen { path: shown, mode });
    }
    std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: shown,
        source,
    })
}

fn read_text(path: &Path) -> Result<String, KeyFileError> {
    String::from_utf8(read_secret_file(path)?).map_err(|_| KeyFileError::Malformed {
        path: path.display().to_string(),
        reason: "not UTF-8 text".into(),
    })
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    SigningKey::from_base64(&read_text(path)?).map_err(|e| KeyFileError::Malformed {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

pub fn load_sealing_key(path: &Path) -> Result<SealingKey, KeyFileError> {
    SealingKey::from_base64(&read_text(path)?).map_err(|e| KeyFileError::Malformed {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

pub fn load_data_key(path: &Path) -> Result<corridor::at_rest::KeyEncryptionKey, KeyFileError> {
    use base64::Engine as _;
    let malformed = |reason: String| KeyFileError::Malformed {
        path: path.display().to_string(),
        reason,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(read_text(path)?.trim())
        .map_err(|_| malformed("not base64".into()))?;
    corridor::at_rest::KeyEncryptionKey::from_bytes(&bytes).map_err(|e| malformed(e.to_string()))
}

/// Writes a secret file readable only by its owner (mode 0600), creating it exclusively.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn refuses_group_or_world_readable_keys() {
        let dir = std::env::temp_dir().join(format!("corridor-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("signing.key");
        let _ = std::fs::remove_file(&path);
        let key = SigningKey::from_seed(&[4; 32]).unwrap();
        write_secret_file(&path, key.to_base64().as_bytes()).unwrap();
        assert_eq!(
            load_signing_key(&path).unwrap().verifying_key(),
            key.verifying_key()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_signing_key(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            load_signing_key(&path),
            Err(KeyFileError::Malformed { .. })
        ));
        assert!(matches!(
            load_sealing_key(&dir.join("missing")),
            Err(KeyFileError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
