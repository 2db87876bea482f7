//! Bearer tokens for the local API. A token is 32 random bytes, shown once when issued
//! and stored only as its SHA-256. It stands for a local user, whose role
//! ([`corridor::LocalRole`]) decides what the token may do.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom as _;
use tonic::{Request, Status};

use crate::storage::{Store, User};

/// Prefix of every token, so a leaked token is recognisable in a secret scanner.
pub const TOKEN_PREFIX: &str = "crt_";

/// A fresh token and the hash to store for it.
pub fn new_token() -> Result<(String, [u8; 32]), ring::error::Unspecified> {
    let mut raw = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut raw)?;
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
    let hash = token_hash(&token);
    Ok((token, hash))
}

pub fn token_hash(token: &str) -> [u8; 32] {
    corridor::canonical::sha256(token.as_bytes())
}

/// The user behind the request's bearer token, if that user's role may do `action`.
pub async fn authorize<T>(
    store: &Store,
    request: &Request<T>,
    action: corridor::LocalAction,
) -> Result<User, Status> {
    let user = authenticate(store, request).await?;
    if user.role.may(action) {
        Ok(user)
    } else {
        Err(Status::permission_denied(action.refusal(user.role)))
    }
}

/// The user behind the request's `authorization: Bearer <token>` header.
async fn authenticate<T>(store: &Store, request: &Request<T>) -> Result<User, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token> header"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization header must be Bearer <token>"))?;
    store
        .user_for_token(&token_hash(token.trim()))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "token lookup failed");
            Status::internal("token lookup failed")
        })?
        .ok_or_else(|| Status::unauthenticated("unknown or revoked token"))
}
