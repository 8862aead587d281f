//! PostgreSQL md5 password authentication. The stored form is
//! `"md5" + hex(md5(password ++ user))`; a client answers a challenge with
//! `"md5" + hex(md5(hex_of_stored ++ salt))`, so the plaintext is never needed.

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// `"md5" + hex(md5(password ++ user))`, the form stored in pg_authid and userlist.txt.
pub fn md5_stored(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// The PasswordMessage payload answering an md5 challenge, computed from the stored form.
pub fn md5_response_from_stored(stored: &str, salt: [u8; 4]) -> String {
    let inner = stored.strip_prefix("md5").unwrap_or(stored);
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// The PasswordMessage payload answering an md5 challenge, from the plaintext password.
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    md5_response_from_stored(&md5_stored(user, password), salt)
}

/// Constant-time check of a client's md5 response against the stored `md5…` string.
pub fn md5_verify(stored: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let expected = md5_response_from_stored(stored, salt);
    expected.len() == response.len() && bool::from(expected.as_bytes().ct_eq(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres_protocol() {
        let salt = [1, 2, 3, 4];
        assert_eq!(
            md5_response("alice", "secret", salt),
            postgres_protocol::authentication::md5_hash(b"alice", b"secret", salt)
        );
        let stored = md5_stored("alice", "secret");
        assert_eq!(stored.len(), 35);
        assert!(md5_verify(
            &stored,
            salt,
            md5_response("alice", "secret", salt).as_bytes()
        ));
        assert!(!md5_verify(
            &stored,
            salt,
            md5_response("alice", "wrong", salt).as_bytes()
        ));
        assert!(!md5_verify(&stored, salt, b"md5"));
        assert!(!md5_verify(
            &stored,
            [9, 9, 9, 9],
            md5_response("alice", "secret", salt).as_bytes()
        ));
    }
}
