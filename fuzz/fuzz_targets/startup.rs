//! The first packet a client sends (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest),
//! straight from the socket: every byte, including the declared length, is the attacker's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgweir::proto::startup::{MAX_STARTUP_LEN, StartupPacket, parse_startup_packet};

fuzz_target!(|data: &[u8]| {
    // The handshake reads at most MAX_STARTUP_LEN bytes before parsing; parse anything anyway,
    // since the parser must not rely on that check for memory safety or termination.
    let data = &data[..data.len().min(MAX_STARTUP_LEN + 16)];
    let parsed = parse_startup_packet(data);
    // The handshake hands its packet over (the parameters keep its allocation): same answer.
    assert_eq!(parse_startup_packet(data.to_vec()), parsed);
    if let Ok(StartupPacket::Startup(params)) = parsed {
        // A value read as text is the value read raw (a packet wholly UTF-8 is held as text).
        for (name, _) in params.iter() {
            if let Some(text) = params.get_str(name) {
                assert_eq!(params.get(name), Some(text.as_bytes()));
            }
        }
        // Everything we hand out must lie inside the input.
        let _ = params.get("user");
        let _ = params.get_str("database");
        let total: usize = params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        assert!(total <= data.len());
        // The str view and the byte view name the same parameters.
        assert!(params.iter().map(|(k, _)| k.as_bytes()).eq(params.raw().map(|(k, _)| k)));
        assert!(
            params
                .protocol_options()
                .eq(params.iter().map(|(k, _)| k).filter(|k| k.starts_with("_pq_.")))
        );
    }
});
