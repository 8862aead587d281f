//! The first packet a client sends (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest),
//! straight from the socket: every byte, including the declared length, is the attacker's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgweir::proto::startup::{MAX_STARTUP_LEN, StartupPacket, parse_startup_packet};

fuzz_target!(|data: &[u8]| {
    // The handshake reads at most MAX_STARTUP_LEN bytes before parsing; parse anything anyway,
    // since the parser must not rely on that check for memory safety or termination.
    let data = &data[..data.len().min(MAX_STARTUP_LEN + 16)];
    if let Ok(StartupPacket::Startup(params)) = parse_startup_packet(data) {
        // Everything we hand out must lie inside the input.
        let _ = params.get("user");
        let _ = params.get_str("database");
        let total: usize = params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        assert!(total <= data.len());
        // The str view and the byte view name the same parameters.
        assert!(params.iter().map(|(k, _)| k.as_bytes()).eq(params.raw().map(|(k, _)| k)));
        for _ in params.protocol_options() {}
    }
});
