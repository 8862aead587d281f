//! SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL uses it), both sides.
//!
//! Server side ([`ScramServer`]) verifies a client against a stored verifier and recovers the
//! client's ClientKey (`ClientProof XOR ClientSignature`). Together with the verifier's
//! ServerKey that is enough for the client side ([`ScramClient`]) to log in to a PostgreSQL
//! server holding the same verifier, without the password: SCRAM pass-through.
//! Channel binding is not offered; clients sending `y,,` (supported but not used) are accepted.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AuthError;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// PostgreSQL's default iteration count for new verifiers.
const DEFAULT_ITERATIONS: u32 = 4096;
/// A server asking for more iterations than this is refused rather than burning CPU.
const MAX_ITERATIONS: u32 = 1_000_000;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for i in 0..32 {
        out[i] = a[i] ^ b[i];
    }
    out
}

fn decode_key(s: &str, what: &'static str) -> Result<[u8; 32], AuthError> {
    let v = B64.decode(s).map_err(|_| AuthError::InvalidVerifier(what))?;
    v.try_into().map_err(|_| AuthError::InvalidVerifier(what))
}

/// PBKDF2-HMAC-SHA256 of the (SASLprep-normalised) password, as PostgreSQL computes it.
pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    // PostgreSQL falls back to the raw bytes when SASLprep rejects the password.
    let prepped = stringprep::saslprep(password)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| password.to_owned());
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(prepped.as_bytes(), salt, iterations)
}

/// A pg_authid-style verifier: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(AuthError::InvalidVerifier("does not start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest.split_once('$').ok_or(AuthError::InvalidVerifier("missing keys"))?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or(AuthError::InvalidVerifier("missing salt"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(AuthError::InvalidVerifier("missing ServerKey"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| AuthError::InvalidVerifier("bad iteration count"))?;
        if iterations == 0 {
            return Err(AuthError::InvalidVerifier("iteration count is zero"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| AuthError::InvalidVerifier("salt is not base64"))?;
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored, "StoredKey is not 32 bytes of base64")?,
            server_key: decode_key(server, "ServerKey is not 32 bytes of base64")?,
        })
    }

    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password, salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac(&salted, &[b"Client Key"])),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// Random 16-byte salt, 4096 iterations.
    pub fn generate(password: &str) -> Self {
        let salt: [u8; 16] = rand::random();
        Self::from_password(password, &salt, DEFAULT_ITERATIONS)
    }

    pub fn to_pg_string(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// ClientKey + ServerKey: enough to log in to a server whose verifier equals ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

/// Parses `k=v,k=v` attributes; values may contain '=' (base64) but not ','.
fn attributes(msg: &str) -> impl Iterator<Item = (char, &str)> {
    msg.split(',').filter_map(|part| {
        let mut chars = part.chars();
        let key = chars.next()?;
        let value = part.get(1..)?.strip_prefix('=')?;
        Some((key, value))
    })
}

fn attr(msg: &str, key: char) -> Option<&str> {
    attributes(msg).find(|(k, _)| *k == key).map(|(_, v)| v)
}

fn random_nonce() -> String {
    let bytes: [u8; 18] = rand::random();
    B64.encode(bytes)
}

enum ServerState {
    Initial,
    SentFirst {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Done,
}

/// pgweir verifying a client.
pub struct ScramServer {
    verifier: ScramVerifier,
    /// A mock exchange always fails at the end (unknown users), after looking like a real one.
    mock: bool,
    state: ServerState,
}

impl ScramServer {
    pub fn new(verifier: ScramVerifier) -> Self {
        ScramServer {
            verifier,
            mock: false,
            state: ServerState::Initial,
        }
    }

    /// An exchange for an unknown user: the salt is derived from the user name so repeated
    /// attempts see a stable salt, as for a real user, and the end result is always failure.
    pub fn mock(username: &str) -> Self {
        let digest = sha256(format!("pgweir mock salt {username}").as_bytes());
        ScramServer {
            verifier: ScramVerifier {
                iterations: DEFAULT_ITERATIONS,
                salt: digest[..16].to_vec(),
                stored_key: rand::random(),
                server_key: rand::random(),
            },
            mock: true,
            state: ServerState::Initial,
        }
    }

    /// Takes the client-first-message, returns the server-first-message.
    pub fn handle_client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ServerState::Initial) {
            return Err(AuthError::OutOfOrder);
        }
        let msg = std::str::from_utf8(msg).map_err(|_| AuthError::MalformedMessage("client-first is not UTF-8"))?;
        let (gs2_header, bare) = match msg.as_bytes().first() {
            Some(b'n') | Some(b'y') => {
                // gs2-header = cbind-flag "," [authzid] ","
                let first = msg.find(',').ok_or(AuthError::MalformedMessage("no gs2 header"))?;
                let second = msg[first + 1..]
                    .find(',')
                    .map(|p| first + 1 + p)
                    .ok_or(AuthError::MalformedMessage("no gs2 header"))?;
                if &msg[..first] != "n" && &msg[..first] != "y" {
                    return Err(AuthError::MalformedMessage("bad channel binding flag"));
                }
                (&msg[..=second], &msg[second + 1..])
            }
            Some(b'p') => return Err(AuthError::ChannelBindingUnsupported),
            _ => return Err(AuthError::MalformedMessage("bad channel binding flag")),
        };
        // The user name (n=) is ignored, as PostgreSQL does: the startup packet's is authoritative.
        let client_nonce = attr(bare, 'r').ok_or(AuthError::MalformedMessage("no client nonce"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(AuthError::MalformedMessage("invalid client nonce"));
        }
        if attr(bare, 'm').is_some() {
            return Err(AuthError::MalformedMessage("mandatory extensions are not supported"));
        }
        let nonce = format!("{client_nonce}{}", random_nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = ServerState::SentFirst {
            gs2_header: gs2_header.to_owned(),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first.into_bytes())
    }

    /// Takes the client-final-message; returns the server-final-message and the recovered keys.
    pub fn handle_client_final(&mut self, msg: &[u8]) -> Result<(Vec<u8>, ScramKeys), AuthError> {
        let ServerState::SentFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(AuthError::OutOfOrder);
        };
        let msg = std::str::from_utf8(msg).map_err(|_| AuthError::MalformedMessage("client-final is not UTF-8"))?;
        let proof_at = msg.rfind(",p=").ok_or(AuthError::MalformedMessage("no proof"))?;
        let without_proof = &msg[..proof_at];
        let proof = B64
            .decode(&msg[proof_at + 3..])
            .map_err(|_| AuthError::MalformedMessage("proof is not base64"))?;
        let proof: [u8; 32] = proof
            .try_into()
            .map_err(|_| AuthError::MalformedMessage("proof is not 32 bytes"))?;
        let binding = attr(without_proof, 'c').ok_or(AuthError::MalformedMessage("no channel binding attribute"))?;
        if binding != B64.encode(gs2_header.as_bytes()) {
            return Err(AuthError::MalformedMessage(
                "channel binding does not match the gs2 header",
            ));
        }
        if attr(without_proof, 'r') != Some(nonce.as_str()) {
            return Err(AuthError::NonceMismatch);
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &client_signature);
        let ok = bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key));
        if !ok || self.mock {
            return Err(AuthError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        let server_final = format!("v={}", B64.encode(server_signature));
        Ok((
            server_final.into_bytes(),
            ScramKeys {
                client_key,
                server_key: self.verifier.server_key,
            },
        ))
    }
}

/// What the client side authenticates with.
#[derive(Clone, Debug)]
pub enum ClientSecret {
    Password(String),
    Keys(ScramKeys),
}

enum ClientState {
    Initial,
    SentFirst { nonce: String, client_first_bare: String },
    SentFinal { server_signature: [u8; 32] },
    Done,
}

/// pgweir logging in to PostgreSQL.
pub struct ScramClient {
    secret: ClientSecret,
    state: ClientState,
}

impl ScramClient {
    pub fn new(secret: ClientSecret) -> Self {
        ScramClient {
            secret,
            state: ClientState::Initial,
        }
    }

    /// The client-first-message (`n,,n=,r=<nonce>`).
    pub fn client_first(&mut self) -> Vec<u8> {
        let nonce = random_nonce();
        let client_first_bare = format!("n=,r={nonce}");
        let msg = format!("n,,{client_first_bare}");
        self.state = ClientState::SentFirst {
            nonce,
            client_first_bare,
        };
        msg.into_bytes()
    }

    /// Takes the server-first-message, returns the client-final-message.
    pub fn handle_server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let ClientState::SentFirst {
            nonce,
            client_first_bare,
        } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(AuthError::OutOfOrder);
        };
        let msg = std::str::from_utf8(msg).map_err(|_| AuthError::MalformedMessage("server-first is not UTF-8"))?;
        let server_nonce = attr(msg, 'r').ok_or(AuthError::MalformedMessage("no nonce"))?;
        if !server_nonce.starts_with(&nonce) || server_nonce.len() == nonce.len() {
            return Err(AuthError::NonceMismatch);
        }
        let salt = B64
            .decode(attr(msg, 's').ok_or(AuthError::MalformedMessage("no salt"))?)
            .map_err(|_| AuthError::MalformedMessage("salt is not base64"))?;
        let iterations: u32 = attr(msg, 'i')
            .ok_or(AuthError::MalformedMessage("no iteration count"))?
            .parse()
            .map_err(|_| AuthError::MalformedMessage("bad iteration count"))?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(AuthError::MalformedMessage("iteration count out of range"));
        }
        let (client_key, server_key) = match &self.secret {
            ClientSecret::Password(pw) => {
                let salted = salted_password(pw, &salt, iterations);
                (hmac(&salted, &[b"Client Key"]), hmac(&salted, &[b"Server Key"]))
            }
            ClientSecret::Keys(k) => (k.client_key, k.server_key),
        };
        let without_proof = format!("c=biws,r={server_nonce}");
        let auth_message = format!("{client_first_bare},{msg},{without_proof}");
        let stored_key = sha256(&client_key);
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof = xor(&client_key, &client_signature);
        self.state = ClientState::SentFinal {
            server_signature: hmac(&server_key, &[auth_message.as_bytes()]),
        };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message (the server proves it knows the verifier).
    pub fn handle_server_final(&mut self, msg: &[u8]) -> Result<(), AuthError> {
        let ClientState::SentFinal { server_signature } = std::mem::replace(&mut self.state, ClientState::Done) else {
            return Err(AuthError::OutOfOrder);
        };
        let msg = std::str::from_utf8(msg).map_err(|_| AuthError::MalformedMessage("server-final is not UTF-8"))?;
        if let Some(e) = attr(msg, 'e') {
            return Err(AuthError::ServerError(e.to_owned()));
        }
        let v = B64
            .decode(attr(msg, 'v').ok_or(AuthError::MalformedMessage("no verifier"))?)
            .map_err(|_| AuthError::MalformedMessage("verifier is not base64"))?;
        if v.len() == 32 && bool::from(v.as_slice().ct_eq(&server_signature)) {
            Ok(())
        } else {
            Err(AuthError::ServerSignatureMismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(mut client: ScramClient, server: &mut ScramServer) -> Result<ScramKeys, AuthError> {
        let first = client.client_first();
        let server_first = server.handle_client_first(&first)?;
        let client_final = client.handle_server_first(&server_first)?;
        let (server_final, keys) = server.handle_client_final(&client_final)?;
        client.handle_server_final(&server_final)?;
        Ok(keys)
    }

    #[test]
    fn password_round_trip_and_pass_through() {
        let v = ScramVerifier::generate("s3cret");
        let keys = exchange(
            ScramClient::new(ClientSecret::Password("s3cret".into())),
            &mut ScramServer::new(v.clone()),
        )
        .expect("password login");
        assert_eq!(keys.server_key, v.server_key);
        // The recovered keys log in again without the password.
        exchange(
            ScramClient::new(ClientSecret::Keys(keys)),
            &mut ScramServer::new(v.clone()),
        )
        .expect("pass-through login");
        assert_eq!(
            exchange(
                ScramClient::new(ClientSecret::Password("wrong".into())),
                &mut ScramServer::new(v)
            ),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn mock_always_fails() {
        let mut server = ScramServer::mock("ghost");
        assert_eq!(
            exchange(ScramClient::new(ClientSecret::Password("anything".into())), &mut server),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn verifier_matches_postgres_protocol() {
        let pg = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&pg).expect("parse postgres-protocol verifier");
        assert_eq!(v.to_pg_string(), pg);
        let again = ScramVerifier::from_password("pw", &v.salt, v.iterations);
        assert_eq!(again, v);
        exchange(
            ScramClient::new(ClientSecret::Password("pw".into())),
            &mut ScramServer::new(v),
        )
        .expect("login");
    }

    #[test]
    fn postgres_protocol_client_against_our_server() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let v = ScramVerifier::generate("pw");
        let mut server = ScramServer::new(v);
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let server_first = server.handle_client_first(client.message()).expect("first");
        client.update(&server_first).expect("client update");
        let (server_final, _) = server.handle_client_final(client.message()).expect("final");
        client.finish(&server_final).expect("server verified");
    }

    #[test]
    fn tampering_is_rejected() {
        let v = ScramVerifier::generate("pw");
        let mut client = ScramClient::new(ClientSecret::Password("pw".into()));
        let mut server = ScramServer::new(v.clone());
        let first = client.client_first();
        let server_first = server.handle_client_first(&first).expect("first");
        let client_final = String::from_utf8(client.handle_server_first(&server_first).expect("final")).expect("utf8");
        let tampered_nonce = client_final.replacen("r=", "r=x", 1);
        assert!(
            ScramServer::new(v.clone())
                .handle_client_final(tampered_nonce.as_bytes())
                .is_err()
        );
        let tampered_cb = client_final.replacen("c=biws", "c=eSws", 1);
        let mut s2 = ScramServer::new(v.clone());
        s2.handle_client_first(&first).expect("first");
        assert!(s2.handle_client_final(tampered_cb.as_bytes()).is_err());
        assert!(server.handle_client_final(b"c=biws,r=abc,p=AAAA").is_err());
    }

    #[test]
    fn malformed_input_never_panics() {
        let v = ScramVerifier::generate("pw");
        let valid_first = b"n,,n=,r=abcdefghijklmnop".to_vec();
        for cut in 0..valid_first.len() {
            let _ = ScramServer::new(v.clone()).handle_client_first(&valid_first[..cut]);
        }
        for junk in [
            &b""[..],
            b"p=tls-server-end-point,,n=,r=x",
            b"x,,",
            b"n,",
            b"n,,r=",
            b"\xff\xfe",
            b"n,,n=,r=a,m=ext",
        ] {
            assert!(
                ScramServer::new(v.clone()).handle_client_first(junk).is_err(),
                "{junk:?}"
            );
        }
        let mut server = ScramServer::new(v.clone());
        let sf = server.handle_client_first(&valid_first).expect("first");
        let sf = String::from_utf8(sf).expect("utf8");
        let valid_final = format!(
            "c=biws,r={},p={}",
            &sf[2..sf.find(',').expect("comma")],
            B64.encode([0u8; 32])
        );
        for cut in 0..valid_final.len() {
            let mut s = ScramServer::new(v.clone());
            s.handle_client_first(&valid_first).expect("first");
            let _ = s.handle_client_final(&valid_final.as_bytes()[..cut]);
        }
        let mut c = ScramClient::new(ClientSecret::Password("pw".into()));
        let _ = c.client_first();
        for junk in [&b""[..], b"r=zzz,s=AAAA,i=4096", b"r=", b"\xff"] {
            let mut c = ScramClient::new(ClientSecret::Password("pw".into()));
            let _ = c.client_first();
            assert!(c.handle_server_first(junk).is_err());
        }
        let mut c = ScramClient::new(ClientSecret::Password("pw".into()));
        let first = String::from_utf8(c.client_first()).expect("utf8");
        let nonce = &first[first.find("r=").expect("nonce") + 2..];
        let huge = format!("r={nonce}xyz,s=AAAA,i=4000000000");
        assert!(
            c.handle_server_first(huge.as_bytes()).is_err(),
            "absurd iteration counts are refused"
        );
        for bad in [
            "",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA",
            "SCRAM-SHA-256$0:AAAA$x:y",
            "md5abc",
        ] {
            assert!(ScramVerifier::parse(bad).is_err(), "{bad}");
        }
    }
}
