use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::*;

/// Runs a whole exchange; returns the keys the server recovered.
fn exchange(client: &mut ScramClient, server: &mut ScramServer) -> Result<ScramKeys, AuthError> {
    let first = client.client_first();
    let server_first = server.handle_client_first(&first)?;
    let client_final = client.handle_server_first(&server_first)?;
    let (server_final, keys) = server.handle_client_final(&client_final)?;
    client.handle_server_final(&server_final)?;
    Ok(keys)
}

fn password(pw: &str) -> ScramClient {
    ScramClient::new(ClientSecret::Password(pw.to_owned()))
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

/// A server that has answered `client_first`, and its server-first-message.
fn server_after_first(v: &ScramVerifier, client_first: &[u8]) -> (ScramServer, String) {
    let mut server = ScramServer::new(v.clone());
    let server_first = text(server.handle_client_first(client_first).unwrap());
    (server, server_first)
}

/// A verifier cheap enough to use in loops: PBKDF2 runs only once here, but the client
/// side re-runs it for every Password login.
fn cheap_verifier(pw: &str) -> ScramVerifier {
    ScramVerifier::from_password(pw, b"0123456789abcdef", 16)
}

// --- Known answers -----------------------------------------------------------------------

// RFC 7677 §3: user "user", password "pencil".
const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const RFC_CLIENT_FINAL: &str =
    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

fn rfc_verifier() -> ScramVerifier {
    ScramVerifier::from_password("pencil", &B64.decode(RFC_SALT).unwrap(), 4096)
}

#[test]
fn rfc7677_server_known_answer() {
    let mut server = ScramServer::new(rfc_verifier());
    server.server_nonce = RFC_SERVER_NONCE.to_owned();
    assert_eq!(
        text(server.handle_client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap()),
        RFC_SERVER_FIRST
    );
    let (server_final, keys) = server.handle_client_final(RFC_CLIENT_FINAL.as_bytes()).unwrap();
    assert_eq!(text(server_final), RFC_SERVER_FINAL);
    let expected = ScramKeys::from_salted_password(&salted_password("pencil", &B64.decode(RFC_SALT).unwrap(), 4096));
    assert_eq!(keys, expected);
}

#[test]
fn rfc7677_client_known_answer() {
    for secret in [
        ClientSecret::Password("pencil".into()),
        ClientSecret::Keys(ScramKeys::from_salted_password(&salted_password(
            "pencil",
            &B64.decode(RFC_SALT).unwrap(),
            4096,
        ))),
    ] {
        let mut client = ScramClient::new(secret);
        assert_eq!(
            text(client.start(RFC_CLIENT_NONCE.to_owned(), "user")),
            RFC_CLIENT_FIRST
        );
        assert_eq!(
            text(client.handle_server_first(RFC_SERVER_FIRST.as_bytes()).unwrap()),
            RFC_CLIENT_FINAL
        );
        assert!(!client.is_verified());
        client.handle_server_final(RFC_SERVER_FINAL.as_bytes()).unwrap();
        assert!(client.is_verified());
    }
}

#[test]
fn verifier_known_answer() {
    // Fixed-salt vector from postgres-protocol's own test suite (its with-salt function is
    // crate-private, so the expected string is copied from there).
    let salt: Vec<u8> = (1..=16).collect();
    let expected = "SCRAM-SHA-256$4096:AQIDBAUGBwgJCgsMDQ4PEA==$8rrDg00OqaiWXJ7p+sCgHEIaBSHY89ZJl3mfIsf32oY=:05L1f+yZbiN8O0AnO40Og85NNRhvzTS57naKRWCcsIA=";
    let v = ScramVerifier::from_password("secret", &salt, 4096);
    assert_eq!(v.to_pg_string(), expected);
    assert_eq!(ScramVerifier::parse(expected).unwrap(), v);
}

/// RFC 5802's Hi(), written out as the RFC states it, independently of the pbkdf2 crate.
fn rfc_hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        out = xor(&out, &u);
    }
    out
}

#[test]
fn key_derivation_matches_rfc_definitions() {
    for (pw, prepped, salt, iterations) in [
        ("pencil", "pencil", &b"salt"[..], 1),
        ("pencil", "pencil", b"W22ZaJ0SNY7soEsUEjb6gQ", 4096),
        ("I\u{00AD}X", "IX", b"\x00\xff", 7),
        ("a\u{7}b", "a\u{7}b", b"s", 3),
    ] {
        let salted = rfc_hi(prepped.as_bytes(), salt, iterations);
        assert_eq!(salted_password(pw, salt, iterations), salted);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let v = ScramVerifier::from_password(pw, salt, iterations);
        assert_eq!(v.stored_key, sha256(&client_key));
        assert_eq!(v.server_key, hmac(&salted, &[b"Server Key"]));
        assert_eq!((v.salt.as_slice(), v.iterations), (salt, iterations));
    }
}

#[test]
fn verifiers_from_postgres_protocol_parse_and_rederive() {
    // ASCII, SASLprep-mapped (soft hyphen dropped, NFKC), SASLprep-prohibited (control
    // character, private use: raw bytes are used), and empty.
    for pw in [
        "pw",
        "I\u{00AD}X",
        "\u{2168}",
        "naïve pässword",
        "a\u{7}b",
        "\u{E000}x",
        "",
    ] {
        let theirs = postgres_protocol::password::scram_sha_256(pw.as_bytes());
        let v = ScramVerifier::parse(&theirs).unwrap();
        assert_eq!(v.to_pg_string(), theirs, "{pw:?}");
        assert_eq!(ScramVerifier::from_password(pw, &v.salt, v.iterations), v, "{pw:?}");
        // Our client logs in to a server holding their verifier.
        let mut client = password(pw);
        exchange(&mut client, &mut ScramServer::new(v)).unwrap();
        assert!(client.is_verified());
    }
}

#[test]
fn saslprep_is_applied_like_postgresql() {
    let salt = b"salt";
    // U+00AD is mapped to nothing and U+2168 (ROMAN NUMERAL NINE) normalises to "IX".
    let ix = ScramVerifier::from_password("IX", salt, 4);
    assert_eq!(ScramVerifier::from_password("I\u{00AD}X", salt, 4), ix);
    assert_eq!(ScramVerifier::from_password("\u{2168}", salt, 4), ix);
    // A prohibited character makes SASLprep fail: the raw bytes are used, so the
    // password still works (and differs from the one without it).
    let raw = ScramVerifier::from_password("I\u{7}X", salt, 4);
    assert_ne!(raw, ix);
    let mut client = password("I\u{7}X");
    exchange(&mut client, &mut ScramServer::new(raw)).unwrap();
}

// --- Round trips ---------------------------------------------------------------------------

#[test]
fn password_round_trip() {
    let v = ScramVerifier::generate("s3cret");
    let mut client = password("s3cret");
    let keys = exchange(&mut client, &mut ScramServer::new(v.clone())).unwrap();
    assert!(client.is_verified());
    assert_eq!(keys.server_key, v.server_key);
    assert_eq!(sha256(&keys.client_key), v.stored_key);
    assert_eq!(ScramVerifier::from_keys(&keys, &v.salt, v.iterations), v);
}

#[test]
fn pass_through_with_recovered_keys() {
    let v = ScramVerifier::generate("s3cret");
    let keys = exchange(&mut password("s3cret"), &mut ScramServer::new(v.clone())).unwrap();
    // The recovered keys log in to any server holding the same verifier, repeatedly.
    for _ in 0..3 {
        let mut client = ScramClient::new(ClientSecret::Keys(keys.clone()));
        let again = exchange(&mut client, &mut ScramServer::new(v.clone())).unwrap();
        assert!(client.is_verified());
        assert_eq!(again, keys);
    }
    // ... but not to one with another verifier for the same password (other salt).
    let other = ScramVerifier::generate("s3cret");
    assert_eq!(
        exchange(
            &mut ScramClient::new(ClientSecret::Keys(keys)),
            &mut ScramServer::new(other)
        ),
        Err(AuthError::WrongPassword)
    );
}

#[test]
fn cached_salted_password_logs_in() {
    let v = ScramVerifier::generate("cache me");
    let salted = salted_password("cache me", &v.salt, v.iterations);
    let keys = ScramKeys::from_salted_password(&salted);
    exchange(
        &mut ScramClient::new(ClientSecret::Keys(keys)),
        &mut ScramServer::new(v),
    )
    .unwrap();
}

#[test]
fn postgres_protocol_client_against_our_server() {
    for pw in ["pw", "naïve pässword", "I\u{00AD}X", ""] {
        for binding in [ChannelBinding::unsupported(), ChannelBinding::unrequested()] {
            let v = ScramVerifier::generate(pw);
            let mut server = ScramServer::new(v.clone());
            let mut client = ScramSha256::new(pw.as_bytes(), binding);
            let server_first = server.handle_client_first(client.message()).unwrap();
            client.update(&server_first).unwrap();
            let (server_final, keys) = server.handle_client_final(client.message()).unwrap();
            client.finish(&server_final).unwrap();
            assert_eq!(sha256(&keys.client_key), v.stored_key);
            // Their login's keys work for pass-through with our client.
            exchange(
                &mut ScramClient::new(ClientSecret::Keys(keys)),
                &mut ScramServer::new(v),
            )
            .unwrap();
        }
    }
}

#[test]
fn postgres_protocol_client_with_their_verifier_and_wrong_password() {
    let v = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(b"right")).unwrap();
    let mut server = ScramServer::new(v.clone());
    let mut client = ScramSha256::new(b"right", ChannelBinding::unsupported());
    let server_first = server.handle_client_first(client.message()).unwrap();
    client.update(&server_first).unwrap();
    let (server_final, _) = server.handle_client_final(client.message()).unwrap();
    client.finish(&server_final).unwrap();

    let mut server = ScramServer::new(v);
    let mut client = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
    let server_first = server.handle_client_first(client.message()).unwrap();
    client.update(&server_first).unwrap();
    assert_eq!(
        server.handle_client_final(client.message()),
        Err(AuthError::WrongPassword)
    );
}

#[test]
fn postgres_protocol_channel_binding_is_refused() {
    let client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![1, 2, 3]));
    let mut server = ScramServer::new(cheap_verifier("pw"));
    assert_eq!(
        server.handle_client_first(client.message()),
        Err(AuthError::ChannelBindingUnsupported)
    );
}

#[test]
fn wrong_password_fails() {
    let v = ScramVerifier::generate("right");
    for pw in ["wrong", "", "right ", "Right"] {
        let mut client = password(pw);
        assert_eq!(
            exchange(&mut client, &mut ScramServer::new(v.clone())),
            Err(AuthError::WrongPassword)
        );
        assert!(!client.is_verified());
    }
}

// --- Mock server ---------------------------------------------------------------------------

fn salt_and_iterations(server_first: &str) -> (String, String) {
    let mut parts = server_first.split(',').skip(1);
    (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned())
}

#[test]
fn mock_server_always_fails() {
    for pw in ["", "anything", "ghost"] {
        assert_eq!(
            exchange(&mut password(pw), &mut ScramServer::mock("ghost")),
            Err(AuthError::WrongPassword)
        );
    }
    // Even a proof that matches the mock's verifier is refused: the mock flag alone decides.
    let mut server = ScramServer::mock("ghost");
    server.verifier = cheap_verifier("pw");
    assert_eq!(
        exchange(&mut password("pw"), &mut server),
        Err(AuthError::WrongPassword)
    );
    let mut server = ScramServer::mock("ghost");
    server.verifier = cheap_verifier("pw");
    let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
    let server_first = server.handle_client_first(client.message()).unwrap();
    client.update(&server_first).unwrap();
    assert_eq!(
        server.handle_client_final(client.message()),
        Err(AuthError::WrongPassword)
    );
}

#[test]
fn mock_server_looks_like_a_real_one() {
    let first = b"n,,n=,r=abcdefghijklmnopqrstuvwx";
    let a = text(ScramServer::mock("ghost").handle_client_first(first).unwrap());
    let b = text(ScramServer::mock("ghost").handle_client_first(first).unwrap());
    let c = text(ScramServer::mock("phantom").handle_client_first(first).unwrap());
    let real = text(
        ScramServer::new(ScramVerifier::generate("x"))
            .handle_client_first(first)
            .unwrap(),
    );
    // Stable salt per user name, different across names, same shape as a real server's.
    assert_eq!(salt_and_iterations(&a), salt_and_iterations(&b));
    assert_ne!(salt_and_iterations(&a).0, salt_and_iterations(&c).0);
    assert_eq!(salt_and_iterations(&a).1, salt_and_iterations(&real).1);
    assert_eq!(a.len(), real.len());
    assert_ne!(a, b, "server nonces are fresh");
    // The salt depends on the key, so outsiders cannot precompute it.
    let k1 = text(
        ScramServer::mock_with_key("ghost", b"k1")
            .handle_client_first(first)
            .unwrap(),
    );
    let k1_again = text(
        ScramServer::mock_with_key("ghost", b"k1")
            .handle_client_first(first)
            .unwrap(),
    );
    let k2 = text(
        ScramServer::mock_with_key("ghost", b"k2")
            .handle_client_first(first)
            .unwrap(),
    );
    assert_eq!(salt_and_iterations(&k1), salt_and_iterations(&k1_again));
    assert_ne!(salt_and_iterations(&k1).0, salt_and_iterations(&k2).0);
}

#[test]
fn mock_server_rejects_malformed_input_like_a_real_one() {
    for bad in [&b""[..], b"x,,n=,r=a", b"n,,n=,r=", b"p=tls-server-end-point,,n=,r=a"] {
        let real = ScramServer::new(cheap_verifier("pw")).handle_client_first(bad);
        assert_eq!(ScramServer::mock("ghost").handle_client_first(bad), real);
    }
}

// --- Tampering -----------------------------------------------------------------------------

/// A fresh client/server pair after the first round trip: (server, client, client-final).
fn after_first_round(v: &ScramVerifier, pw: &str) -> (ScramServer, ScramClient, String) {
    let mut client = password(pw);
    let first = client.client_first();
    let (server, server_first) = server_after_first(v, &first);
    let client_final = text(client.handle_server_first(server_first.as_bytes()).unwrap());
    (server, client, client_final)
}

#[test]
fn tampered_client_final_is_rejected() {
    let v = cheap_verifier("pw");
    for ((mut server, bad), expected) in cases_on_same_exchange(&v) {
        assert_eq!(
            server.handle_client_final(bad.as_bytes()).map(|_| ()),
            Err(expected),
            "{bad}"
        );
    }
    // Flipping any bit of the proof fails.
    for i in 0..32 {
        let (mut server, _, good) = after_first_round(&v, "pw");
        let (prefix, p) = good.rsplit_once(",p=").unwrap();
        let mut p = B64.decode(p).unwrap();
        p[i] ^= 1 << (i % 8);
        let bad = format!("{prefix},p={}", B64.encode(&p));
        assert_eq!(
            server.handle_client_final(bad.as_bytes()).map(|_| ()),
            Err(AuthError::WrongPassword)
        );
    }
    // A valid client-final replayed on another exchange fails (new server nonce).
    let (_, _, replayed) = after_first_round(&v, "pw");
    let (mut server, _, good) = after_first_round(&v, "pw");
    assert_eq!(
        server.handle_client_final(replayed.as_bytes()).map(|_| ()),
        Err(AuthError::NonceMismatch)
    );
    // The untampered message works on its own exchange.
    let (mut server, _, good2) = after_first_round(&v, "pw");
    assert_ne!(good, good2);
    assert!(server.handle_client_final(good2.as_bytes()).is_ok());
}

/// Builds a client-final from the exchange's nonce and proof.
type Tamper = fn(&str, &str) -> String;

/// Tampered client-final messages built on each exchange's own nonce, paired with the error
/// each must produce.
fn cases_on_same_exchange(v: &ScramVerifier) -> Vec<((ScramServer, String), AuthError)> {
    let tamper: [(Tamper, AuthError); 7] = [
        (|n, p| format!("c=biws,r={n}x,p={p}"), AuthError::NonceMismatch),
        (|n, p| format!("c=biws,r={},p={p}", &n[..24]), AuthError::NonceMismatch),
        (
            |n, p| format!("c=eSws,r={n},p={p}"),
            AuthError::MalformedMessage("channel binding does not match the gs2 header"),
        ),
        (
            |n, p| format!("c=,r={n},p={p}"),
            AuthError::MalformedMessage("channel binding does not match the gs2 header"),
        ),
        (
            |n, _| format!("c=biws,r={n},p={}", B64.encode([0u8; 32])),
            AuthError::WrongPassword,
        ),
        (
            |n, _| format!("c=biws,r={n}"),
            AuthError::MalformedMessage("missing proof"),
        ),
        (
            |n, p| format!("r={n},c=biws,p={p}"),
            AuthError::MalformedMessage("missing channel binding attribute"),
        ),
    ];
    tamper
        .into_iter()
        .map(|(f, err)| {
            let (server, _, good) = after_first_round(v, "pw");
            let (nonce_part, proof) = good.rsplit_once(",p=").unwrap();
            let nonce = nonce_part.strip_prefix("c=biws,r=").unwrap().to_owned();
            ((server, f(&nonce, proof)), err)
        })
        .collect()
}

#[test]
fn y_flag_binds_its_own_header() {
    let v = cheap_verifier("pw");
    let mut client = password("pw");
    let first = text(client.client_first());
    let y_first = first.replacen("n,,", "y,,", 1);
    let mut server = ScramServer::new(v.clone());
    let server_first = server.handle_client_first(y_first.as_bytes()).unwrap();
    // Our client answers with c=biws ("n,,"), which no longer matches the header the
    // server saw: a downgrade of the flag in transit is detected.
    let client_final = client.handle_server_first(&server_first).unwrap();
    assert_eq!(
        server.handle_client_final(&client_final).map(|_| ()),
        Err(AuthError::MalformedMessage(
            "channel binding does not match the gs2 header"
        ))
    );
}

#[test]
fn tampered_server_messages_are_rejected() {
    let v = cheap_verifier("pw");
    // server-first whose nonce does not extend ours, or adds nothing to it.
    let mut client = password("pw");
    let first = text(client.client_first());
    let nonce = first.strip_prefix("n,,n=,r=").unwrap().to_owned();
    for bad in [
        format!("r=x{nonce}abc,s=AAAA,i=16"),
        format!("r={nonce},s=AAAA,i=16"),
        format!("r={},s=AAAA,i=16", &nonce[..23]),
        "r=abc,s=AAAA,i=16".to_owned(),
    ] {
        let mut client = password("pw");
        client.start(nonce.clone(), "");
        assert_eq!(
            client.handle_server_first(bad.as_bytes()),
            Err(AuthError::NonceMismatch),
            "{bad}"
        );
    }

    // server-final: any change to v=, or an error, fails.
    let run_to_final = || {
        let mut client = password("pw");
        let mut server = ScramServer::new(v.clone());
        let server_first = server.handle_client_first(&client.client_first()).unwrap();
        let client_final = client.handle_server_first(&server_first).unwrap();
        let (server_final, _) = server.handle_client_final(&client_final).unwrap();
        (client, text(server_final))
    };
    let (mut client, good) = run_to_final();
    let signature = B64.decode(good.strip_prefix("v=").unwrap()).unwrap();
    for i in 0..signature.len() {
        let (mut client, _) = run_to_final();
        let mut s = signature.clone();
        s[i] ^= 0x80;
        let bad = format!("v={}", B64.encode(&s));
        assert_eq!(
            client.handle_server_final(bad.as_bytes()),
            Err(AuthError::ServerSignatureMismatch)
        );
        assert!(!client.is_verified());
    }
    // A valid signature from another exchange is not accepted either.
    let (mut other, _) = run_to_final();
    assert_eq!(
        other.handle_server_final(good.as_bytes()),
        Err(AuthError::ServerSignatureMismatch)
    );
    let (mut c, _) = run_to_final();
    assert_eq!(
        c.handle_server_final(b"e=invalid-proof"),
        Err(AuthError::ServerError("invalid-proof".into()))
    );
    let (mut c, _) = run_to_final();
    assert_eq!(c.handle_server_final(b"v="), Err(AuthError::ServerSignatureMismatch));
    let (mut c, _) = run_to_final();
    assert_eq!(
        c.handle_server_final(format!("v={}", B64.encode(&signature[..31])).as_bytes()),
        Err(AuthError::ServerSignatureMismatch)
    );
    client.handle_server_final(good.as_bytes()).unwrap();
    assert!(client.is_verified());
}

// --- State machine -------------------------------------------------------------------------

#[test]
fn steps_out_of_order_are_refused() {
    let v = cheap_verifier("pw");
    let mut server = ScramServer::new(v.clone());
    assert_eq!(
        server.handle_client_final(b"c=biws,r=a,p=b").map(|_| ()),
        Err(AuthError::OutOfOrder)
    );

    let mut client = password("pw");
    assert_eq!(
        client.handle_server_first(b"r=a,s=AAAA,i=1"),
        Err(AuthError::OutOfOrder)
    );
    assert_eq!(client.handle_server_final(b"v=AAAA"), Err(AuthError::OutOfOrder));

    // After a complete exchange every step is refused.
    let mut server = ScramServer::new(v.clone());
    let mut client = password("pw");
    exchange(&mut client, &mut server).unwrap();
    assert_eq!(server.handle_client_first(b"n,,n=,r=abc"), Err(AuthError::OutOfOrder));
    assert_eq!(
        server.handle_client_final(b"c=biws,r=a,p=b").map(|_| ()),
        Err(AuthError::OutOfOrder)
    );
    assert_eq!(
        client.handle_server_first(b"r=a,s=AAAA,i=1"),
        Err(AuthError::OutOfOrder)
    );
    assert_eq!(client.handle_server_final(b"v=AAAA"), Err(AuthError::OutOfOrder));
    assert!(client.is_verified(), "a refused late call does not undo verification");

    // A failed step ends the exchange: a retry with a good message is refused.
    let mut client = password("pw");
    let first = client.client_first();
    let mut server = ScramServer::new(v);
    assert!(server.handle_client_first(b"garbage").is_err());
    assert_eq!(server.handle_client_first(&first), Err(AuthError::OutOfOrder));
}

#[test]
fn client_first_shape_and_fresh_nonces() {
    let mut client = password("pw");
    let a = text(client.client_first());
    let b = text(client.client_first());
    for m in [&a, &b] {
        let nonce = m.strip_prefix("n,,n=,r=").unwrap();
        assert_eq!(nonce.len(), 24);
        assert!(is_printable(nonce));
    }
    assert_ne!(a, b);
    // Restarting uses the latest nonce.
    let mut server = ScramServer::new(cheap_verifier("pw"));
    let server_first = server.handle_client_first(b.as_bytes()).unwrap();
    let client_final = client.handle_server_first(&server_first).unwrap();
    let (server_final, _) = server.handle_client_final(&client_final).unwrap();
    client.handle_server_final(&server_final).unwrap();
}

// --- Malformed input -------------------------------------------------------------------------

#[test]
fn malformed_client_first_is_rejected() {
    let v = cheap_verifier("pw");
    let cases: &[(&[u8], AuthError)] = &[
        (b"", AuthError::MalformedMessage("missing gs2 header")),
        (b"n", AuthError::MalformedMessage("missing gs2 header")),
        (b"n,", AuthError::MalformedMessage("missing gs2 header")),
        (b"n,,", AuthError::MalformedMessage("missing user name attribute")),
        (b"n,,r=abc", AuthError::MalformedMessage("missing user name attribute")),
        (b"n,,n=", AuthError::MalformedMessage("missing client nonce")),
        (b"n,,n=,", AuthError::MalformedMessage("missing client nonce")),
        (b"n,,n=,r=", AuthError::MalformedMessage("invalid client nonce")),
        (b"n,,n=,r=a b", AuthError::MalformedMessage("invalid client nonce")),
        (b"n,,n=,r=a\x7f", AuthError::MalformedMessage("invalid client nonce")),
        (b"n,,n=,r=\xc3\xa9", AuthError::MalformedMessage("invalid client nonce")),
        (b"n,,n=,s=abc", AuthError::MalformedMessage("missing client nonce")),
        (b"n,,n=,r=abc,", AuthError::MalformedMessage("invalid attribute")),
        (b"n,,n=,r=abc,1=x", AuthError::MalformedMessage("invalid attribute")),
        (b"n,,n=,r=abc,xx", AuthError::MalformedMessage("invalid attribute")),
        (
            b"x,,n=,r=abc",
            AuthError::MalformedMessage("invalid channel binding flag"),
        ),
        (
            b"nn,,n=,r=abc",
            AuthError::MalformedMessage("invalid channel binding flag"),
        ),
        (
            b",,n=,r=abc",
            AuthError::MalformedMessage("invalid channel binding flag"),
        ),
        (
            b"p=tls-server-end-point,,n=,r=abc",
            AuthError::ChannelBindingUnsupported,
        ),
        (
            b"p,,n=,r=abc",
            AuthError::MalformedMessage("invalid channel binding flag"),
        ),
        (b"n,a=bob,n=,r=abc", AuthError::Unsupported("authorization identity")),
        (b"n,x,n=,r=abc", AuthError::Unsupported("authorization identity")),
        (b"n,,m=ext,n=,r=abc", AuthError::Unsupported("mandatory extension")),
        (
            b"\xff\xfe",
            AuthError::MalformedMessage("client-first-message is not UTF-8"),
        ),
        (
            b"n,,n=\xff,r=abc",
            AuthError::MalformedMessage("client-first-message is not UTF-8"),
        ),
        (b"\0", AuthError::MalformedMessage("missing gs2 header")),
    ];
    for (msg, expected) in cases {
        assert_eq!(
            ScramServer::new(v.clone()).handle_client_first(msg).as_ref(),
            Err(expected),
            "{}",
            String::from_utf8_lossy(msg)
        );
    }
    let huge = format!("n,,n=,r={}", "a".repeat(MAX_MESSAGE_LEN));
    assert_eq!(
        ScramServer::new(v.clone()).handle_client_first(huge.as_bytes()),
        Err(AuthError::MalformedMessage("message too long"))
    );
}

#[test]
fn lenient_client_first_variants_are_accepted() {
    // User names are ignored; extensions after the nonce are allowed and ignored.
    for msg in [
        "n,,n=alice,r=abc",
        "n,,n=*,r=abc",
        "y,,n=,r=abc",
        "n,,n=,r=abc,x=ext",
        "n,,n=,r=abc,x=",
        "n,,n=é=2C,r=abc",
    ] {
        let server_first = text(
            ScramServer::new(cheap_verifier("pw"))
                .handle_client_first(msg.as_bytes())
                .unwrap(),
        );
        assert!(server_first.starts_with("r=abc"), "{msg}");
    }
}

#[test]
fn malformed_server_first_is_rejected() {
    let mut client = password("pw");
    let first = text(client.client_first());
    let n = first.strip_prefix("n,,n=,r=").unwrap().to_owned();
    let malformed = |why| AuthError::MalformedMessage(why);
    let cases: Vec<(Vec<u8>, AuthError)> = vec![
        (b"".to_vec(), malformed("missing nonce")),
        (b"\xff".to_vec(), malformed("server-first-message is not UTF-8")),
        (b"r=".to_vec(), malformed("missing salt")),
        (format!("r={n}x").into_bytes(), malformed("missing salt")),
        (format!("r={n}x,").into_bytes(), malformed("missing salt")),
        (
            format!("r={n}x,s=AAAA").into_bytes(),
            malformed("missing iteration count"),
        ),
        (format!("r={n}x,i=16,s=AAAA").into_bytes(), malformed("missing salt")),
        (format!("s=AAAA,r={n}x,i=16").into_bytes(), malformed("missing nonce")),
        (
            format!("m=ext,r={n}x,s=AAAA,i=16").into_bytes(),
            AuthError::Unsupported("mandatory extension"),
        ),
        (format!("r={n}x,s=,i=16").into_bytes(), malformed("salt is empty")),
        (format!("r={n}x,s=A,i=16").into_bytes(), malformed("salt is not base64")),
        (
            format!("r={n}x,s=A!AA,i=16").into_bytes(),
            malformed("salt is not base64"),
        ),
        (
            format!("r={n}x,s=AAAA,i=").into_bytes(),
            malformed("iteration count is not a positive integer"),
        ),
        (
            format!("r={n}x,s=AAAA,i=0").into_bytes(),
            malformed("iteration count is not a positive integer"),
        ),
        (
            format!("r={n}x,s=AAAA,i=-1").into_bytes(),
            malformed("iteration count is not a positive integer"),
        ),
        (
            format!("r={n}x,s=AAAA,i=+16").into_bytes(),
            malformed("iteration count is not a positive integer"),
        ),
        (
            format!("r={n}x,s=AAAA,i= 16").into_bytes(),
            malformed("iteration count is not a positive integer"),
        ),
        (
            format!("r={n}x,s=AAAA,i=0x10").into_bytes(),
            malformed("iteration count is not a positive integer"),
        ),
        (
            format!("r={n}x,s=AAAA,i=4294967296").into_bytes(),
            malformed("iteration count is not a positive integer"),
        ),
        (
            format!("r={n}x,s=AAAA,i=99999999999999999999").into_bytes(),
            malformed("iteration count is not a positive integer"),
        ),
        (
            format!("r={n}x,s=AAAA,i=1000001").into_bytes(),
            malformed("iteration count too large"),
        ),
        (
            format!("r={n}x,s=AAAA,i=4294967295").into_bytes(),
            malformed("iteration count too large"),
        ),
        (
            format!("r={n}x,s=AAAA,i=16,").into_bytes(),
            malformed("invalid attribute"),
        ),
        (
            format!("r={n}x y,s=AAAA,i=16").into_bytes(),
            malformed("invalid server nonce"),
        ),
        (
            format!("r={n}\u{e9},s=AAAA,i=16").into_bytes(),
            malformed("invalid server nonce"),
        ),
        (
            format!("r={n}x,s=AAAA,i=16,{}", "x=y,".repeat(MAX_MESSAGE_LEN / 4)).into_bytes(),
            malformed("message too long"),
        ),
    ];
    for (msg, expected) in cases {
        let mut client = password("pw");
        client.start(n.clone(), "");
        assert_eq!(
            client.handle_server_first(&msg),
            Err(expected),
            "{}",
            String::from_utf8_lossy(&msg)
        );
    }
}

#[test]
fn iteration_cap_applies_only_when_pbkdf2_runs() {
    let keys = ScramKeys::from_salted_password(&[7; 32]);
    let mut client = ScramClient::new(ClientSecret::Keys(keys));
    let first = text(client.client_first());
    let n = first.strip_prefix("n,,n=,r=").unwrap();
    let msg = format!("r={n}x,s=AAAA,i=4294967295");
    assert!(client.handle_server_first(msg.as_bytes()).is_ok());

    // At the cap, a password login still proceeds (in a test: cheap enough at opt-level 2).
    let mut client = password("pw");
    let first = text(client.client_first());
    let n = first.strip_prefix("n,,n=,r=").unwrap();
    let msg = format!("r={n}x,s=AAAA,i={MAX_ITERATIONS}");
    assert!(client.handle_server_first(msg.as_bytes()).is_ok());
}

#[test]
fn lenient_server_first_variants_are_accepted() {
    // Trailing extensions are part of the AuthMessage; the rest of the exchange must still
    // agree with a server that computed the AuthMessage over the same text.
    let v = cheap_verifier("pw");
    let mut client = password("pw");
    let first = client.client_first();
    let mut server = ScramServer::new(v.clone());
    let server_first = text(server.handle_client_first(&first).unwrap());
    let extended = format!("{server_first},x=ext");
    let client_final = client.handle_server_first(extended.as_bytes()).unwrap();
    // Our server computed its AuthMessage without ",x=ext", so the proof must not verify.
    assert_eq!(
        server.handle_client_final(&client_final).map(|_| ()),
        Err(AuthError::WrongPassword)
    );
}

#[test]
fn malformed_server_final_is_rejected() {
    let fresh = || {
        let mut client = ScramClient::new(ClientSecret::Keys(ScramKeys::from_salted_password(&[1; 32])));
        let first = text(client.client_first());
        let n = first.strip_prefix("n,,n=,r=").unwrap().to_owned();
        client
            .handle_server_first(format!("r={n}x,s=AAAA,i=1").as_bytes())
            .unwrap();
        client
    };
    let malformed = AuthError::MalformedMessage;
    let cases: &[(&[u8], AuthError)] = &[
        (b"", malformed("missing server signature")),
        (b"v", malformed("missing server signature")),
        (b"x=abc", malformed("missing server signature")),
        (b"\xff", malformed("server-final-message is not UTF-8")),
        (b"v=!!!!", malformed("server signature is not base64")),
        (b"v=A", malformed("server signature is not base64")),
        (b"v=AAAA,", malformed("invalid attribute")),
        (b"v=AAAA", AuthError::ServerSignatureMismatch),
        (b"e=", AuthError::ServerError(String::new())),
        (b"e=other-error,x=y", AuthError::ServerError("other-error".into())),
    ];
    for (msg, expected) in cases {
        assert_eq!(
            fresh().handle_server_final(msg).as_ref(),
            Err(expected),
            "{}",
            String::from_utf8_lossy(msg)
        );
    }
    let huge = format!("e={}", "x".repeat(MAX_MESSAGE_LEN));
    assert_eq!(
        fresh().handle_server_final(huge.as_bytes()),
        Err(AuthError::MalformedMessage("message too long"))
    );
}

#[test]
fn malformed_client_final_is_rejected() {
    let v = cheap_verifier("pw");
    let fresh = || {
        let mut server = ScramServer::new(v.clone());
        server.handle_client_first(b"n,,n=,r=abc").unwrap();
        server
    };
    let malformed = AuthError::MalformedMessage;
    let p = B64.encode([0u8; 32]);
    let cases: Vec<(Vec<u8>, AuthError)> = vec![
        (b"".to_vec(), malformed("missing proof")),
        (b"\xff".to_vec(), malformed("client-final-message is not UTF-8")),
        (b"p=".to_vec(), malformed("missing proof")),
        (b",p=".to_vec(), malformed("proof is not 32 bytes of base64")),
        (
            format!(",p={p}").into_bytes(),
            malformed("missing channel binding attribute"),
        ),
        (format!("c=biws,p={p}").into_bytes(), malformed("missing nonce")),
        (
            b"c=biws,r=abc,p=AAAA".to_vec(),
            malformed("proof is not 32 bytes of base64"),
        ),
        (
            b"c=biws,r=abc,p=!!".to_vec(),
            malformed("proof is not 32 bytes of base64"),
        ),
        (
            format!("c=biws,r=abc,p={p}A").into_bytes(),
            malformed("proof is not 32 bytes of base64"),
        ),
        (
            format!("c=biws,r=abc,p={}", B64.encode([0u8; 33])).into_bytes(),
            malformed("proof is not 32 bytes of base64"),
        ),
        (
            format!("c=biws,r=abc,1=x,p={p}").into_bytes(),
            malformed("invalid attribute"),
        ),
        (
            format!("c=biws,r=abc,,p={p}").into_bytes(),
            malformed("invalid attribute"),
        ),
        (format!("c=biws,r=abc,p={p},").into_bytes(), malformed("missing proof")),
        (
            format!("c=biws\u{e9},r=abc,p={p}").into_bytes(),
            malformed("channel binding does not match the gs2 header"),
        ),
        (
            format!("c=biws,r=abc,p={p}{}", "=".repeat(MAX_MESSAGE_LEN)).into_bytes(),
            malformed("message too long"),
        ),
    ];
    for (msg, expected) in cases {
        assert_eq!(
            fresh().handle_client_final(&msg).map(|_| ()),
            Err(expected),
            "{}",
            String::from_utf8_lossy(&msg)
        );
    }
}

#[test]
fn malformed_verifiers_are_rejected() {
    let good = ScramVerifier::from_password("pw", b"salt", 4096).to_pg_string();
    assert!(ScramVerifier::parse(&good).is_ok());
    let k = B64.encode([0u8; 32]);
    for bad in [
        String::new(),
        "md5abc".into(),
        "SCRAM-SHA-256".into(),
        "SCRAM-SHA-256$".into(),
        "scram-sha-256$4096:AAAA$AAAA:AAAA".into(),
        "SCRAM-SHA-1$4096:AAAA$AAAA:AAAA".into(),
        format!("SCRAM-SHA-256$4096:AAAA${k}"),
        format!("SCRAM-SHA-256$4096:AAAA$:{k}"),
        format!("SCRAM-SHA-256$4096:AAAA${k}:"),
        format!("SCRAM-SHA-256$4096$AAAA:{k}:{k}"),
        format!("SCRAM-SHA-256$4096:${k}:{k}"),
        format!("SCRAM-SHA-256$4096:A$${k}:{k}"),
        format!("SCRAM-SHA-256$0:AAAA${k}:{k}"),
        format!("SCRAM-SHA-256$-1:AAAA${k}:{k}"),
        format!("SCRAM-SHA-256$+4096:AAAA${k}:{k}"),
        format!("SCRAM-SHA-256$4294967296:AAAA${k}:{k}"),
        format!("SCRAM-SHA-256$:AAAA${k}:{k}"),
        format!("SCRAM-SHA-256$4096:AAAA${k}:{k}$"),
        format!("SCRAM-SHA-256$4096:AAAA${k}:{k}:{k}"),
        format!("SCRAM-SHA-256$4096:AAAA${}:{k}", B64.encode([0u8; 31])),
        format!("SCRAM-SHA-256$4096:AAAA${k}:{}", B64.encode([0u8; 33])),
        format!("SCRAM-SHA-256$4096:AAAA$ {k}:{k}"),
        format!("SCRAM-SHA-256$4096:AAAA${k}:{k}\n"),
        format!("SCRAM-SHA-256$4096:AAAA$é{k}:{k}"),
    ] {
        assert!(
            matches!(ScramVerifier::parse(&bad), Err(AuthError::InvalidVerifier(_))),
            "{bad:?}"
        );
    }
    // Every truncation of a valid verifier is refused, and none panics.
    for cut in 0..good.len() {
        assert!(ScramVerifier::parse(&good[..cut]).is_err(), "{}", &good[..cut]);
    }
}

/// Byte-level mutations of a message: every truncation and, at every position, a few
/// replacement bytes (including ones that break UTF-8 or inject separators).
fn mutations(msg: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let truncations = (0..msg.len()).map(|cut| msg[..cut].to_vec());
    let replacements = (0..msg.len()).flat_map(move |i| {
        [b',', b'=', 0x00, 0xff, 0xc3, b'A', msg[i] ^ 0x01]
            .into_iter()
            .filter_map(move |b| {
                let mut m = msg.to_vec();
                (m[i] != b).then(|| {
                    m[i] = b;
                    m
                })
            })
    });
    let insertions = (0..=msg.len()).map(|i| {
        let mut m = msg.to_vec();
        m.insert(i, b',');
        m
    });
    truncations.chain(replacements).chain(insertions)
}

#[test]
fn mutated_messages_never_panic_and_finals_always_fail() {
    let v = cheap_verifier("pw");
    let keys = ScramKeys::from_salted_password(&salted_password("pw", &v.salt, v.iterations));
    let mut client = ScramClient::new(ClientSecret::Keys(keys.clone()));
    let mut server = ScramServer::new(v.clone());
    let client_first = client.client_first();
    let server_first = server.handle_client_first(&client_first).unwrap();
    let client_final = client.handle_server_first(&server_first).unwrap();
    let (server_final, _) = server.handle_client_final(&client_final).unwrap();
    client.handle_server_final(&server_final).unwrap();
    let client_nonce = text(client_first.clone()).strip_prefix("n,,n=,r=").unwrap().to_owned();

    // client-first: some mutations are still valid (a shorter nonce, say); none may panic.
    for m in mutations(&client_first) {
        let _ = ScramServer::new(v.clone()).handle_client_first(&m);
        let _ = ScramServer::mock("ghost").handle_client_first(&m);
    }
    // client-final: every change must fail.
    for m in mutations(&client_final) {
        let mut server = ScramServer::new(v.clone());
        server.server_nonce = text(server_first.clone())[2 + client_nonce.len()..]
            .split(',')
            .next()
            .unwrap()
            .to_owned();
        server.handle_client_first(&client_first).unwrap();
        assert!(
            server.handle_client_final(&m).is_err(),
            "{}",
            String::from_utf8_lossy(&m)
        );
    }
    // server-first: keys-mode client, so a mutated iteration count costs nothing; a
    // mutated nonce, salt or count must never let the exchange verify.
    for m in mutations(&server_first) {
        let mut client = ScramClient::new(ClientSecret::Keys(keys.clone()));
        client.start(client_nonce.clone(), "");
        if let Ok(reply) = client.handle_server_first(&m) {
            assert_ne!(reply, client_final, "{}", String::from_utf8_lossy(&m));
        }
    }
    // server-final: every change must fail.
    for m in mutations(&server_final) {
        let mut client = ScramClient::new(ClientSecret::Keys(keys.clone()));
        client.start(client_nonce.clone(), "");
        client.handle_server_first(&server_first).unwrap();
        assert!(
            client.handle_server_final(&m).is_err(),
            "{}",
            String::from_utf8_lossy(&m)
        );
        assert!(!client.is_verified());
    }
}

// --- Misc ----------------------------------------------------------------------------------

#[test]
fn verifier_round_trips_and_generation() {
    let a = ScramVerifier::generate("pw");
    let b = ScramVerifier::generate("pw");
    assert_eq!(a.iterations, DEFAULT_ITERATIONS);
    assert_eq!(a.salt.len(), 16);
    assert_ne!(a.salt, b.salt);
    assert_ne!(a, b);
    assert_eq!(ScramVerifier::parse(&a.to_pg_string()).unwrap(), a);
    // Zero iterations are stored as 1, which parse accepts.
    let zero = ScramVerifier::from_password("pw", b"salt", 0);
    assert_eq!(zero, ScramVerifier::from_password("pw", b"salt", 1));
    assert_eq!(ScramVerifier::parse(&zero.to_pg_string()).unwrap(), zero);
}

#[test]
fn mechanism_check() {
    assert_eq!(check_mechanism(b"SCRAM-SHA-256"), Ok(()));
    assert_eq!(
        check_mechanism(b"SCRAM-SHA-256-PLUS"),
        Err(AuthError::UnsupportedMechanism("SCRAM-SHA-256-PLUS".into()))
    );
    assert!(check_mechanism(b"").is_err());
    assert!(check_mechanism(b"\xff").is_err());
}

#[test]
fn debug_output_redacts_secrets() {
    let keys = ScramKeys {
        client_key: [0xab; 32],
        server_key: [0xcd; 32],
    };
    for s in [
        format!("{:?}", ClientSecret::Password("hunter2".into())),
        format!("{:?}", ClientSecret::Keys(keys.clone())),
        format!("{keys:?}"),
        format!("{:?}", ScramClient::new(ClientSecret::Password("hunter2".into()))),
        format!("{:?}", ScramServer::new(cheap_verifier("hunter2"))),
    ] {
        assert!(
            !s.contains("hunter2") && !s.contains("171") && !s.contains("205"),
            "{s}"
        );
    }
}

/// postgres-protocol's client with channel binding, against our server: the binding data must
/// match what the server saw, and a "y" flag after an offer is a downgrade.
#[test]
fn channel_binding_tls_server_end_point() {
    let data = vec![7u8; 32];
    let run = |client_binding: ChannelBinding, server_binding: super::ChannelBinding| {
        let mut client = ScramSha256::new(b"pw", client_binding);
        let mut server = ScramServer::new(cheap_verifier("pw"));
        server.set_channel_binding(server_binding);
        let server_first = server.handle_client_first(client.message())?;
        client.update(&server_first).expect("server-first");
        let (server_final, _) = server.handle_client_final(client.message())?;
        client.finish(&server_final).expect("server signature");
        Ok::<(), AuthError>(())
    };
    use super::ChannelBinding as Offer;
    assert_eq!(
        run(
            ChannelBinding::tls_server_end_point(data.clone()),
            Offer::TlsServerEndPoint(data.clone())
        ),
        Ok(())
    );
    assert_eq!(
        run(
            ChannelBinding::tls_server_end_point(vec![8u8; 32]),
            Offer::TlsServerEndPoint(data.clone())
        ),
        Err(AuthError::MalformedMessage(
            "channel binding does not match the gs2 header"
        ))
    );
    // "I could bind but you did not offer": fine when we did not, a downgrade when we did.
    assert_eq!(run(ChannelBinding::unrequested(), Offer::NotOffered), Ok(()));
    assert_eq!(
        run(ChannelBinding::unrequested(), Offer::Declined),
        Err(AuthError::MalformedMessage("channel binding downgrade detected"))
    );
    assert_eq!(run(ChannelBinding::unsupported(), Offer::Declined), Ok(()));
    // Chose -PLUS but sent no binding.
    assert_eq!(
        run(ChannelBinding::unsupported(), Offer::TlsServerEndPoint(data)),
        Err(AuthError::MalformedMessage(
            "SCRAM-SHA-256-PLUS needs channel binding type tls-server-end-point"
        ))
    );
}
