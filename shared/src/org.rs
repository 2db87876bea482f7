//! Organisation ids: stable lowercase slugs such as `tenaganita-my` or `kh-embassy-kl`,
//! and the URI form `urn:corridor:org:<id>` that TLS certificates carry.

use std::fmt;

/// The URI prefix under which an org id appears in a certificate's subjectAltName.
pub const ORG_URI_PREFIX: &str = "urn:corridor:org:";

/// Longest org id accepted, in bytes.
pub const MAX_ORG_ID_LEN: usize = 63;

/// A validated organisation id: 1–63 bytes of `a-z`, `0-9` and `-`, starting with a
/// letter and not ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgId(String);

/// Why a string is not a valid org id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrgIdError {
    #[error("org id is empty")]
    Empty,
    #[error("org id is longer than {MAX_ORG_ID_LEN} bytes")]
    TooLong,
    #[error("org id must start with a lowercase letter")]
    BadStart,
    #[error("org id must not end with '-'")]
    BadEnd,
    #[error("org id may contain only lowercase letters, digits and '-'")]
    BadCharacter,
    #[error("certificate URI is not of the form {ORG_URI_PREFIX}<org-id>")]
    NotOrgUri,
}

impl OrgId {
    /// Parses and validates an org id.
    pub fn new(value: &str) -> Result<Self, OrgIdError> {
        let bytes = value.as_bytes();
        let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
            return Err(OrgIdError::Empty);
        };
        if bytes.len() > MAX_ORG_ID_LEN {
            return Err(OrgIdError::TooLong);
        }
        if !first.is_ascii_lowercase() {
            return Err(OrgIdError::BadStart);
        }
        if *last == b'-' {
            return Err(OrgIdError::BadEnd);
        }
        if !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        {
            return Err(OrgIdError::BadCharacter);
        }
        Ok(Self(value.to_owned()))
    }

    /// Parses the org id out of a `urn:corridor:org:<id>` URI.
    pub fn from_uri(uri: &str) -> Result<Self, OrgIdError> {
        uri.strip_prefix(ORG_URI_PREFIX)
            .ok_or(OrgIdError::NotOrgUri)
            .and_then(Self::new)
    }

    /// The `urn:corridor:org:<id>` URI for this org.
    pub fn to_uri(&self) -> String {
        format!("{ORG_URI_PREFIX}{}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for OrgId {
    type Err = OrgIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> serde::Deserialize<'de> for OrgId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for OrgId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_slugs() {
        for id in ["tenaganita-my", "kh-embassy-kl", "a", "a1-b2"] {
            assert_eq!(OrgId::new(id).map(|o| o.to_string()), Ok(id.to_owned()));
        }
    }

    #[test]
    fn rejects_malformed_ids() {
        assert_eq!(OrgId::new(""), Err(OrgIdError::Empty));
        assert_eq!(OrgId::new("1abc"), Err(OrgIdError::BadStart));
        assert_eq!(OrgId::new("abc-"), Err(OrgIdError::BadEnd));
        assert_eq!(OrgId::new("Abc"), Err(OrgIdError::BadStart));
        assert_eq!(OrgId::new("ab c"), Err(OrgIdError::BadCharacter));
        assert_eq!(OrgId::new("ab/c"), Err(OrgIdError::BadCharacter));
        assert_eq!(OrgId::new(&"a".repeat(64)), Err(OrgIdError::TooLong));
    }

    #[test]
    fn uri_round_trip() {
        let id = OrgId::new("kh-embassy-kl").unwrap();
        assert_eq!(id.to_uri(), "urn:corridor:org:kh-embassy-kl");
        assert_eq!(OrgId::from_uri(&id.to_uri()), Ok(id));
        assert_eq!(
            OrgId::from_uri("urn:other:kh-embassy-kl"),
            Err(OrgIdError::NotOrgUri)
        );
    }
}
