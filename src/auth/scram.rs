//! SCRAM-SHA-256 (RFC 5802 with RFC 7677's hash) as PostgreSQL speaks it, both sides.
//!
//! [`ScramServer`] verifies a client against a stored [`ScramVerifier`]. Along the way it
//! recovers the client's ClientKey (`ClientProof XOR ClientSignature`); with the verifier's
//! ServerKey that makes a [`ScramKeys`], which is exactly what [`ScramClient`] needs to log
//! in to a PostgreSQL server holding the same verifier, without ever knowing the password
//! ("SCRAM pass-through").
//!
//! PostgreSQL's dialect: the SASL user name (`n=`) is empty or ignored, because the startup
//! packet's user is authoritative; authorization identities and mandatory extensions are
//! refused; passwords go through SASLprep, falling back to the raw bytes when SASLprep
//! rejects them. Channel binding (SCRAM-SHA-256-PLUS, `tls-server-end-point`) is offered on TLS
//! connections whose certificate names a hash ([`ChannelBinding`]); then a client's `y,,` ("I
//! could bind, but you did not offer it") means someone stripped the offer and is refused.
//! Elsewhere `p=` is refused and `y,,` accepted.
//!
//! Each side is a small state machine that takes one peer message and returns the next
//! message to send. Any error ends the exchange: later calls return
//! [`AuthError::OutOfOrder`] (a client whose server was verified stays verified).

use std::fmt;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AuthError;

/// The SASL mechanism name, as sent in AuthenticationSASL and SASLInitialResponse.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// The channel-binding variant, offered on TLS connections.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// What the server offered and the client chose, for channel binding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    /// Not offered (plaintext connection, or a certificate without a usable hash).
    #[default]
    NotOffered,
    /// SCRAM-SHA-256-PLUS was offered, and the client chose plain SCRAM-SHA-256.
    Declined,
    /// The client chose SCRAM-SHA-256-PLUS; this is the `tls-server-end-point` data (the hash
    /// of our certificate, RFC 5929) it must echo.
    TlsServerEndPoint(Vec<u8>),
}

/// Iteration count for verifiers made by [`ScramVerifier::generate`] (PostgreSQL's default).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Most PBKDF2 iterations [`ScramClient`] will run for a server. Each costs two HMACs, so a
/// hostile or misconfigured server asking for billions would pin a core for minutes per
/// login; a million (~0.1 s) is far above PostgreSQL's default of 4096.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// PostgreSQL's nonce size (SCRAM_RAW_NONCE_LEN), before base64.
const NONCE_BYTES: usize = 18;

/// PostgreSQL's salt size for new verifiers.
const SALT_BYTES: usize = 16;

/// SCRAM messages are a few hundred bytes; the PostgreSQL framing layer already bounds
/// them, but this module does not rely on its callers for that, since every message is
/// copied into the exchange's state and echoed in replies.
const MAX_MESSAGE_LEN: usize = 16 * 1024;

/// base64("n,,"), the channel-binding attribute of a client that does not bind.
const CBIND_NONE: &str = "biws";

/// Checks the mechanism a client chose in SASLInitialResponse.
pub fn check_mechanism(mechanism: &[u8]) -> Result<(), AuthError> {
    if mechanism == SCRAM_SHA_256.as_bytes() {
        Ok(())
    } else {
        Err(AuthError::UnsupportedMechanism(
            String::from_utf8_lossy(mechanism).into_owned(),
        ))
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC pre-hashes keys longer than its block and pads shorter ones, so every key length
    // is valid and new_from_slice cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn decode_32(s: &str) -> Option<[u8; 32]> {
    B64.decode(s).ok()?.try_into().ok()
}

fn random_nonce() -> String {
    B64.encode(rand::random::<[u8; NONCE_BYTES]>())
}

/// RFC 5802's `printable`: visible ASCII except ','. Nonces must be made of it.
fn is_printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Decimal digits only: `str::parse` would also take a leading '+', which the grammar
/// (and PostgreSQL's parser) do not.
fn parse_count(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The message as text, after the size cap. SCRAM messages are ASCII apart from the
/// (ignored) user name, so non-UTF-8 input is simply malformed.
fn message_str<'a>(msg: &'a [u8], what: &'static str) -> Result<&'a str, AuthError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(AuthError::MalformedMessage("message too long"));
    }
    std::str::from_utf8(msg).map_err(|_| AuthError::MalformedMessage(what))
}

/// The value of `part` if it is the attribute `key=value`.
fn attr_value(part: &str, key: char) -> Option<&str> {
    part.strip_prefix(key)?.strip_prefix('=')
}

/// The next comma-separated attribute, which the grammar says must be `key`.
fn next_attr<'a>(
    parts: &mut std::str::Split<'a, char>,
    key: char,
    missing: &'static str,
) -> Result<&'a str, AuthError> {
    parts
        .next()
        .and_then(|part| attr_value(part, key))
        .ok_or(AuthError::MalformedMessage(missing))
}

/// Optional extensions (`ALPHA "=" value`) may trail a message; they are ignored, as
/// PostgreSQL ignores them, but must still be well-formed.
fn skip_extensions(parts: std::str::Split<'_, char>) -> Result<(), AuthError> {
    for part in parts {
        let b = part.as_bytes();
        if b.len() < 2 || !b[0].is_ascii_alphabetic() || b[1] != b'=' {
            return Err(AuthError::MalformedMessage("invalid attribute"));
        }
    }
    Ok(())
}

/// PBKDF2-HMAC-SHA-256 of the SASLprep-ed password: SCRAM's SaltedPassword.
///
/// This is the expensive step (`iterations` × 2 HMACs); callers that log in repeatedly
/// with the same password, salt and count may cache the result and pass it to
/// [`ScramKeys::from_salted_password`]. Like PostgreSQL, a password that SASLprep rejects
/// is used as its raw bytes; `iterations` of 0 is treated as 1.
pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepped = stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password));
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(prepped.as_bytes(), salt, iterations.max(1))
}

/// ClientKey + ServerKey: enough to log in to a PostgreSQL server whose verifier equals
/// ours, without the password ("SCRAM pass-through").
///
/// Both halves are password-equivalent for that server; `Debug` redacts them.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// HMAC(SaltedPassword, "Client Key"); its SHA-256 is the verifier's StoredKey.
    pub client_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key"), as in the verifier.
    pub server_key: [u8; 32],
}

impl ScramKeys {
    /// The keys derived from a SaltedPassword (see [`salted_password`]).
    pub fn from_salted_password(salted: &[u8; 32]) -> Self {
        ScramKeys {
            client_key: hmac(salted, &[b"Client Key"]),
            server_key: hmac(salted, &[b"Server Key"]),
        }
    }
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramKeys { .. }")
    }
}

/// A parsed pg_authid-style verifier
/// `SCRAM-SHA-256$<iter>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// PBKDF2 salt, sent to clients in the clear.
    pub salt: Vec<u8>,
    /// SHA-256(ClientKey): checks a client's proof, but cannot produce one.
    pub stored_key: [u8; 32],
    /// Signs the server-final-message, proving to the client that we hold the verifier.
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses the pg_authid / userlist.txt form.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let invalid = AuthError::InvalidVerifier;
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(invalid("does not start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest.split_once('$').ok_or(invalid("missing keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(invalid("missing salt"))?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(invalid("missing ServerKey"))?;
        let iterations = parse_count(iterations)
            .filter(|&i| i > 0)
            .ok_or(invalid("iteration count is not a positive integer"))?;
        let salt = B64.decode(salt).map_err(|_| invalid("salt is not base64"))?;
        if salt.is_empty() {
            return Err(invalid("salt is empty"));
        }
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_32(stored_key).ok_or(invalid("StoredKey is not 32 bytes of base64"))?,
            server_key: decode_32(server_key).ok_or(invalid("ServerKey is not 32 bytes of base64"))?,
        })
    }

    /// Derives a verifier from a plaintext password (SASLprep applied, as PostgreSQL does;
    /// falls back to raw bytes if SASLprep fails, also as PostgreSQL does). `iterations`
    /// of 0 is stored as 1, the least PostgreSQL accepts.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let keys = ScramKeys::from_salted_password(&salted_password(password, salt, iterations));
        Self::from_keys(&keys, salt, iterations)
    }

    /// The verifier matching `keys` for the given salt and iteration count (0 is stored as
    /// 1, as in [`ScramVerifier::from_password`]).
    pub fn from_keys(keys: &ScramKeys, salt: &[u8], iterations: u32) -> Self {
        ScramVerifier {
            iterations: iterations.max(1),
            salt: salt.to_vec(),
            stored_key: sha256(&keys.client_key),
            server_key: keys.server_key,
        }
    }

    /// Random 16-byte salt, 4096 iterations.
    pub fn generate(password: &str) -> Self {
        Self::from_password(password, &rand::random::<[u8; SALT_BYTES]>(), DEFAULT_ITERATIONS)
    }

    /// The pg_authid form, accepted by [`ScramVerifier::parse`] and by PostgreSQL
    /// (e.g. in `ALTER ROLE … PASSWORD '…'`).
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

/// Key for deriving mock salts: random per process, so nobody can compute the salt an
/// unknown user would get and compare it with what the server sends.
fn mock_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(rand::random)
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

/// Server side: pgweir authenticating a client.
pub struct ScramServer {
    verifier: ScramVerifier,
    /// Our half of the nonce, appended to the client's.
    server_nonce: String,
    /// Unknown user: run the whole exchange, then fail.
    mock: bool,
    binding: ChannelBinding,
    state: ServerState,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ServerState::Initial => "Initial",
            ServerState::SentFirst { .. } => "SentFirst",
            ServerState::Done => "Done",
        };
        f.debug_struct("ScramServer")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// A server for a user with this verifier, with a random server nonce (18 random
    /// bytes, base64).
    pub fn new(verifier: ScramVerifier) -> Self {
        ScramServer {
            verifier,
            server_nonce: random_nonce(),
            mock: false,
            binding: ChannelBinding::NotOffered,
            state: ServerState::Initial,
        }
    }

    /// Sets what was offered and chosen for channel binding; call before the first message.
    pub fn set_channel_binding(&mut self, binding: ChannelBinding) {
        self.binding = binding;
    }

    /// A server that will run a full-looking exchange but always fail at the end (for
    /// unknown users, so user names cannot be probed). Uses a deterministic-per-username
    /// fake salt, so repeated attempts see a stable salt just as for a real user.
    ///
    /// The salt is keyed with a per-process random secret; use
    /// [`ScramServer::mock_with_key`] to keep it stable across restarts too.
    pub fn mock(username: &str) -> Self {
        Self::mock_with_key(username, mock_key())
    }

    /// Like [`ScramServer::mock`], with the salt derived from `key` (a secret of the
    /// caller's, e.g. persisted alongside the configuration) and the user name.
    pub fn mock_with_key(username: &str, key: &[u8]) -> Self {
        let digest = hmac(key, &[b"pgweir mock salt\0", username.as_bytes()]);
        let verifier = ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: digest[..SALT_BYTES].to_vec(),
            // Random keys: no proof can match, yet the final step costs what a real one does.
            stored_key: rand::random(),
            server_key: rand::random(),
        };
        ScramServer {
            mock: true,
            ..Self::new(verifier)
        }
    }

    /// Input: the SASLInitialResponse data (client-first-message, e.g. `n,,n=,r=<nonce>`).
    /// Output: server-first-message.
    ///
    /// Accepts gs2 headers `n,,` and `y,,` (channel binding not supported: `p=` → error).
    /// Ignores the `n=` username (PostgreSQL does; the startup user is authoritative).
    pub fn handle_client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ServerState::Initial) {
            return Err(AuthError::OutOfOrder);
        }
        self.state = ServerState::Done;
        let msg = message_str(msg, "client-first-message is not UTF-8")?;

        let (flag, rest) = msg
            .split_once(',')
            .ok_or(AuthError::MalformedMessage("missing gs2 header"))?;
        match (flag, &self.binding) {
            ("n", ChannelBinding::NotOffered | ChannelBinding::Declined) => {}
            ("y", ChannelBinding::NotOffered) => {}
            // We offered -PLUS over TLS; a client able to bind says it did not see the offer,
            // so the mechanism list was tampered with (RFC 5802 §6).
            ("y", _) => return Err(AuthError::MalformedMessage("channel binding downgrade detected")),
            ("p=tls-server-end-point", ChannelBinding::TlsServerEndPoint(_)) => {}
            (_, ChannelBinding::TlsServerEndPoint(_)) => {
                return Err(AuthError::MalformedMessage(
                    "SCRAM-SHA-256-PLUS needs channel binding type tls-server-end-point",
                ));
            }
            _ if flag.starts_with("p=") => return Err(AuthError::ChannelBindingUnsupported),
            _ => return Err(AuthError::MalformedMessage("invalid channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(AuthError::MalformedMessage("missing gs2 header"))?;
        if !authzid.is_empty() {
            // PostgreSQL refuses these too: the startup user is the only identity.
            return Err(AuthError::Unsupported("authorization identity"));
        }
        // The header is echoed (base64) in the client's final message, so it is kept verbatim.
        let gs2_header = &msg[..flag.len() + 2];

        let mut parts = bare.split(',');
        let user = parts.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(AuthError::Unsupported("mandatory extension"));
        }
        if attr_value(user, 'n').is_none() {
            return Err(AuthError::MalformedMessage("missing user name attribute"));
        }
        let client_nonce = next_attr(&mut parts, 'r', "missing client nonce")?;
        if !is_printable(client_nonce) {
            return Err(AuthError::MalformedMessage("invalid client nonce"));
        }
        skip_extensions(parts)?;

        let nonce = format!("{client_nonce}{}", self.server_nonce);
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

    /// Input: client-final-message. Checks that `c=` equals base64(gs2 header) and `r=` the
    /// combined nonce, and verifies the proof (constant time). Output: server-final-message
    /// (`v=…`) and the recovered [`ScramKeys`]
    /// (ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)).
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
        let msg = message_str(msg, "client-final-message is not UTF-8")?;

        // The proof is last, and the AuthMessage covers everything before it.
        let (without_proof, proof) = msg
            .rsplit_once(',')
            .ok_or(AuthError::MalformedMessage("missing proof"))?;
        let proof = attr_value(proof, 'p').ok_or(AuthError::MalformedMessage("missing proof"))?;
        let proof = decode_32(proof).ok_or(AuthError::MalformedMessage("proof is not 32 bytes of base64"))?;

        let mut parts = without_proof.split(',');
        let binding = next_attr(&mut parts, 'c', "missing channel binding attribute")?;
        let client_nonce = next_attr(&mut parts, 'r', "missing nonce")?;
        skip_extensions(parts)?;
        // Without this check a man in the middle could strip a client's "y" flag (or
        // swap headers) unnoticed; with -PLUS it proves both ends saw the same certificate.
        let mut expected = gs2_header.into_bytes();
        if let ChannelBinding::TlsServerEndPoint(data) = &self.binding {
            expected.extend_from_slice(data);
        }
        if B64.decode(binding).ok().as_deref() != Some(&expected[..]) {
            return Err(AuthError::MalformedMessage(
                "channel binding does not match the gs2 header",
            ));
        }
        if client_nonce != nonce {
            return Err(AuthError::NonceMismatch);
        }

        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &client_signature);
        let proof_ok = bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key));
        if !proof_ok || self.mock {
            return Err(AuthError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok((
            format!("v={}", B64.encode(server_signature)).into_bytes(),
            ScramKeys {
                client_key,
                server_key: self.verifier.server_key,
            },
        ))
    }
}

/// What the client side authenticates with.
#[derive(Clone)]
pub enum ClientSecret {
    /// A plaintext password: PBKDF2 runs once per login, with the server's salt and count.
    Password(String),
    /// Keys recovered by [`ScramServer`] from a client's login (pass-through), or derived
    /// from a cached [`salted_password`]. Server's salt and count are not needed.
    Keys(ScramKeys),
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets must not reach logs through `{:?}`.
        match self {
            ClientSecret::Password(_) => f.write_str("Password(..)"),
            ClientSecret::Keys(_) => f.write_str("Keys(..)"),
        }
    }
}

enum ClientState {
    Initial,
    SentFirst { nonce: String, client_first_bare: String },
    SentFinal { server_signature: [u8; 32] },
    Verified,
    Failed,
}

/// Client side: pgweir authenticating to PostgreSQL.
pub struct ScramClient {
    secret: ClientSecret,
    state: ClientState,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ClientState::Initial => "Initial",
            ClientState::SentFirst { .. } => "SentFirst",
            ClientState::SentFinal { .. } => "SentFinal",
            ClientState::Verified => "Verified",
            ClientState::Failed => "Failed",
        };
        f.debug_struct("ScramClient")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// A client that will authenticate with `secret`.
    pub fn new(secret: ClientSecret) -> Self {
        ScramClient {
            secret,
            state: ClientState::Initial,
        }
    }

    /// client-first-message `n,,n=,r=<nonce>` (the payload of SASLInitialResponse; the
    /// mechanism name is sent separately by the caller). Calling it again restarts the
    /// exchange with a fresh nonce.
    pub fn client_first(&mut self) -> Vec<u8> {
        self.start(random_nonce(), "")
    }

    /// Takes the state for a step, leaving Failed so that any error ends the exchange; a
    /// verified exchange stays verified, so a stray late message cannot undo it.
    fn take_state(&mut self) -> ClientState {
        match std::mem::replace(&mut self.state, ClientState::Failed) {
            ClientState::Verified => {
                self.state = ClientState::Verified;
                ClientState::Verified
            }
            state => state,
        }
    }

    /// `username` must already be a valid saslname (no ',' or '='); pgweir sends none.
    fn start(&mut self, nonce: String, username: &str) -> Vec<u8> {
        let client_first_bare = format!("n={username},r={nonce}");
        let msg = format!("n,,{client_first_bare}");
        self.state = ClientState::SentFirst {
            nonce,
            client_first_bare,
        };
        msg.into_bytes()
    }

    /// Input: server-first-message (AuthenticationSASLContinue data). Checks the server
    /// nonce extends ours and the iteration count is within bounds (1..=[`MAX_ITERATIONS`]
    /// when a password must be stretched; with [`ClientSecret::Keys`] no PBKDF2 runs, so
    /// only 0 is refused). Output: client-final-message.
    pub fn handle_server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let ClientState::SentFirst {
            nonce,
            client_first_bare,
        } = self.take_state()
        else {
            return Err(AuthError::OutOfOrder);
        };
        let msg = message_str(msg, "server-first-message is not UTF-8")?;

        let mut parts = msg.split(',');
        let first = parts.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(AuthError::Unsupported("mandatory extension"));
        }
        let server_nonce = attr_value(first, 'r').ok_or(AuthError::MalformedMessage("missing nonce"))?;
        let salt = next_attr(&mut parts, 's', "missing salt")?;
        let iterations = next_attr(&mut parts, 'i', "missing iteration count")?;
        skip_extensions(parts)?;

        // The server must add its own part: echoing ours alone would let a replayed or
        // forged first message pass.
        if !server_nonce.starts_with(nonce.as_str()) || server_nonce.len() == nonce.len() {
            return Err(AuthError::NonceMismatch);
        }
        if !is_printable(server_nonce) {
            return Err(AuthError::MalformedMessage("invalid server nonce"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| AuthError::MalformedMessage("salt is not base64"))?;
        if salt.is_empty() {
            return Err(AuthError::MalformedMessage("salt is empty"));
        }
        let iterations = parse_count(iterations)
            .filter(|&i| i > 0)
            .ok_or(AuthError::MalformedMessage("iteration count is not a positive integer"))?;

        let keys = match &self.secret {
            ClientSecret::Password(password) => {
                if iterations > MAX_ITERATIONS {
                    return Err(AuthError::MalformedMessage("iteration count too large"));
                }
                ScramKeys::from_salted_password(&salted_password(password, &salt, iterations))
            }
            ClientSecret::Keys(keys) => keys.clone(),
        };

        let without_proof = format!("c={CBIND_NONE},r={server_nonce}");
        let auth_message = format!("{client_first_bare},{msg},{without_proof}");
        let client_signature = hmac(&sha256(&keys.client_key), &[auth_message.as_bytes()]);
        let proof = xor(&keys.client_key, &client_signature);
        self.state = ClientState::SentFinal {
            server_signature: hmac(&keys.server_key, &[auth_message.as_bytes()]),
        };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Input: server-final-message (AuthenticationSASLFinal data). Constant-time check of
    /// `v=`; an `e=` error attribute → [`AuthError::ServerError`].
    pub fn handle_server_final(&mut self, msg: &[u8]) -> Result<(), AuthError> {
        let ClientState::SentFinal { server_signature } = self.take_state() else {
            return Err(AuthError::OutOfOrder);
        };
        let msg = message_str(msg, "server-final-message is not UTF-8")?;
        let mut parts = msg.split(',');
        let first = parts.next().unwrap_or_default();
        if let Some(error) = attr_value(first, 'e') {
            return Err(AuthError::ServerError(error.to_owned()));
        }
        let verifier = attr_value(first, 'v').ok_or(AuthError::MalformedMessage("missing server signature"))?;
        skip_extensions(parts)?;
        let verifier = B64
            .decode(verifier)
            .map_err(|_| AuthError::MalformedMessage("server signature is not base64"))?;
        // Length is public (always 32 for a real server); only the contents are compared in
        // constant time.
        if verifier.len() == server_signature.len() && bool::from(verifier.as_slice().ct_eq(&server_signature)) {
            self.state = ClientState::Verified;
            Ok(())
        } else {
            Err(AuthError::ServerSignatureMismatch)
        }
    }

    /// Whether the server proved it holds the verifier ([`ScramClient::handle_server_final`]
    /// succeeded). A caller must not accept AuthenticationOk before this is true: a server
    /// that skips AuthenticationSASLFinal would otherwise log us in unauthenticated.
    pub fn is_verified(&self) -> bool {
        matches!(self.state, ClientState::Verified)
    }
}

#[cfg(test)]
mod tests;
