//! PostgreSQL's md5 password authentication.
//!
//! The stored form is `"md5" + hex(md5(password ++ user))`. A client answers the server's
//! 4-byte salt with `"md5" + hex(md5(hex_part_of_stored ++ salt))`, so both sides can work
//! from the stored form alone: pgweir never needs the plaintext to verify a client or to log
//! in to PostgreSQL. (That also means the stored form is password-equivalent for md5.)

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

/// Length of `"md5"` followed by 32 hex digits.
const STORED_LEN: usize = 35;

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Whether `s` has the shape of a stored md5 password: `"md5"` and 32 hex digits
/// (either case).
pub fn is_md5_stored(s: &str) -> bool {
    s.len() == STORED_LEN && s.starts_with("md5") && s.as_bytes()[3..].iter().all(u8::is_ascii_hexdigit)
}

/// `"md5" + hex(md5(password ++ user))` — the form stored in pg_authid / userlist.txt.
pub fn md5_stored(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// The PasswordMessage payload a client sends for AuthenticationMD5Password:
/// `"md5" + hex(md5(hex_part_of_stored ++ salt))`.
///
/// `stored` is the `"md5…"` string; works without the plaintext password. Upper-case hex
/// is accepted (PostgreSQL itself always stores lower case, which is what gets hashed). A
/// string that is not a stored md5 password yields a response no server will accept;
/// check with [`is_md5_stored`] first to report the misconfiguration instead.
pub fn md5_response_from_stored(stored: &str, salt: [u8; 4]) -> String {
    let inner = stored.strip_prefix("md5").unwrap_or(stored).to_ascii_lowercase();
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// Convenience: `md5_response_from_stored(&md5_stored(user, password), salt)`.
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    md5_response_from_stored(&md5_stored(user, password), salt)
}

/// Constant-time check of a client's md5 response against the stored `"md5…"` string.
///
/// A `stored` value that is not `"md5"` + 32 hex digits never verifies: otherwise an empty
/// or truncated entry would make the expected response computable by anyone from the salt.
pub fn md5_verify(stored: &str, salt: [u8; 4], response: &[u8]) -> bool {
    if !is_md5_stored(stored) {
        return false;
    }
    let expected = md5_response_from_stored(stored, salt);
    // The expected length is public (always 35), so checking it first leaks nothing.
    expected.len() == response.len() && bool::from(expected.as_bytes().ct_eq(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: [u8; 4] = [0x01, 0x02, 0x03, 0x04];

    #[test]
    fn stored_form_matches_postgres_protocol() {
        // Known answer published in postgres-protocol's own tests.
        assert_eq!(md5_stored("foo", "secret"), "md54ab2c5d00339c4b2a4e921d2dc4edec7");
        for (user, pw) in [("alice", "secret"), ("", ""), ("bob", "pässwörd ✓"), ("u,=x", "p\0w")] {
            assert_eq!(
                md5_stored(user, pw),
                postgres_protocol::password::md5(pw.as_bytes(), user)
            );
            assert!(is_md5_stored(&md5_stored(user, pw)));
        }
    }

    #[test]
    fn response_matches_postgres_protocol() {
        for salt in [SALT, [0; 4], [0xff; 4]] {
            for (user, pw) in [("alice", "secret"), ("", ""), ("bob", "pässwörd ✓")] {
                let theirs = postgres_protocol::authentication::md5_hash(user.as_bytes(), pw.as_bytes(), salt);
                assert_eq!(md5_response(user, pw, salt), theirs);
                assert_eq!(md5_response_from_stored(&md5_stored(user, pw), salt), theirs);
            }
        }
    }

    #[test]
    fn upper_case_stored_hex_gives_the_same_response() {
        let stored = md5_stored("alice", "secret");
        let upper = format!("md5{}", stored[3..].to_ascii_uppercase());
        assert_eq!(
            md5_response_from_stored(&upper, SALT),
            md5_response_from_stored(&stored, SALT)
        );
        assert!(md5_verify(
            &upper,
            SALT,
            md5_response("alice", "secret", SALT).as_bytes()
        ));
    }

    #[test]
    fn verify_accepts_only_the_right_response() {
        let stored = md5_stored("alice", "secret");
        let good = md5_response("alice", "secret", SALT);
        assert!(md5_verify(&stored, SALT, good.as_bytes()));
        assert!(!md5_verify(
            &stored,
            SALT,
            md5_response("alice", "wrong", SALT).as_bytes()
        ));
        assert!(!md5_verify(
            &stored,
            SALT,
            md5_response("bob", "secret", SALT).as_bytes()
        ));
        assert!(!md5_verify(&stored, [4, 3, 2, 1], good.as_bytes()));
        // Near misses: truncated, extended, trailing NUL, changed case, empty.
        assert!(!md5_verify(&stored, SALT, &good.as_bytes()[..34]));
        assert!(!md5_verify(&stored, SALT, format!("{good}0").as_bytes()));
        assert!(!md5_verify(&stored, SALT, format!("{good}\0").as_bytes()));
        assert!(!md5_verify(&stored, SALT, good.to_ascii_uppercase().as_bytes()));
        assert!(!md5_verify(&stored, SALT, b""));
        assert!(!md5_verify(&stored, SALT, b"md5"));
        assert!(!md5_verify(&stored, SALT, &[0xff; 35]));
    }

    #[test]
    fn malformed_stored_never_verifies() {
        for stored in [
            "",
            "md5",
            "secret",
            "md5abc",
            &format!("md5{}", "g".repeat(32)),
            &"a".repeat(35),
        ] {
            // The response a client could compute from the salt alone must not be accepted.
            let guessable = md5_response_from_stored(stored, SALT);
            assert!(!md5_verify(stored, SALT, guessable.as_bytes()), "{stored:?}");
        }
        // Multi-byte characters must not trip the slicing in is_md5_stored.
        assert!(!is_md5_stored("md5ééééééééééééééé"));
        assert!(!is_md5_stored("ém5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
    }
}
