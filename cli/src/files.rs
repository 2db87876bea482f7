//! Reading the files a user names, within a size limit: `/dev/zero`, a pipe that never
//! ends or a huge file named by mistake is refused instead of read until memory runs out.

use std::io::Read;
use std::path::Path;

/// Certificates, keys, tokens, directories with their signatures, governance files: all
/// far smaller than this.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Audit exports and the auditor's state hold every entry of a log: enough for millions.
pub const MAX_AUDIT_FILE_BYTES: u64 = 1 << 30;

/// Reads `reader` to its end, or answers `None` as soon as it holds more than `limit`
/// bytes.
pub fn read_at_most(reader: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// Reads the file at `path` if it holds at most `limit` bytes.
pub fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let cannot_read = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    read_at_most(file, limit)
        .map_err(cannot_read)?
        .ok_or_else(|| too_large(path, limit))
}

/// Reads a secret file (a key, a token) that must be readable by its owner only, as the
/// node requires of its own keys, if it holds at most `limit` bytes.
pub fn read_secret_file(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    // The node's check reads a regular file whole: its size is known before reading.
    if let Ok(meta) = std::fs::metadata(path)
        && meta.is_file()
        && meta.len() > limit
    {
        return Err(too_large(path, limit));
    }
    corridor_node::keys::read_secret_file(path).map_err(|e| e.to_string())
}

fn too_large(path: &Path, limit: u64) -> String {
    format!(
        "{} is larger than {}, the most the CLI reads from such a file",
        path.display(),
        size_text(limit)
    )
}

/// A size for people: `1 MiB`, `16 MiB`, `1 GiB`, or bytes.
pub fn size_text(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_the_limit_and_no_further() {
        assert_eq!(
            read_at_most(&b"12345"[..], 5).expect("read"),
            Some(b"12345".to_vec())
        );
        assert_eq!(read_at_most(&b"123456"[..], 5).expect("read"), None);
        // An endless source stops at the limit.
        assert_eq!(read_at_most(std::io::repeat(0), 1024).expect("read"), None);
    }

    #[test]
    fn an_endless_file_is_refused_with_its_name_and_the_limit() {
        let err = read_file(Path::new("/dev/zero"), MAX_FILE_BYTES).expect_err("endless");
        assert_eq!(
            err,
            "/dev/zero is larger than 16 MiB, the most the CLI reads from such a file"
        );
    }

    #[test]
    fn a_secret_file_must_be_private_and_small() {
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::env::temp_dir().join(format!("corridor-cli-secret-{}", std::process::id()));
        std::fs::write(&path, "crt_x\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_secret_file(&path, MAX_FILE_BYTES).expect_err("readable by others");
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            read_secret_file(&path, MAX_FILE_BYTES).expect("read"),
            b"crt_x\n"
        );
        // A sparse file: large without taking the space.
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(MAX_FILE_BYTES + 1))
            .expect("grow");
        let err = read_secret_file(&path, MAX_FILE_BYTES).expect_err("too large");
        assert!(err.ends_with("is larger than 16 MiB, the most the CLI reads from such a file"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size_text(1 << 20), "1 MiB");
        assert_eq!(size_text(1 << 30), "1 GiB");
        assert_eq!(size_text(1000), "1000 bytes");
    }
}
