//! Message framing as the client and server readers use it: scan a buffer frame by frame with a
//! distrusted length in every header, then hand each body to the message parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgweir::proto::frame::{HEADER_LEN, frame_at, needed_len};
use pgweir::proto::messages;

fuzz_target!(|data: &[u8]| {
    let Some((&limit, buf)) = data.split_first() else {
        return;
    };
    // A small limit exercises TooLong; the largest one is what a real config allows.
    let max_len = match limit % 4 {
        0 => 64,
        1 => 8 << 10,
        2 => 1 << 20,
        _ => 64 << 20,
    };
    let mut pos = 0;
    loop {
        match frame_at(buf, pos, max_len) {
            Ok(Some(frame)) => {
                assert!(frame.total_len >= HEADER_LEN && frame.total_len <= max_len);
                assert!(pos + frame.total_len <= buf.len());
                assert_eq!(needed_len(buf, pos, max_len), Some(frame.total_len));
                let body = &buf[pos..pos + frame.total_len][frame.body_range()];
                parse_body(frame.tag, body);
                pos += frame.total_len;
            }
            Ok(None) => {
                // Either the header is incomplete, or the frame needs more bytes than remain;
                // the reader then reserves at most max_len.
                match needed_len(buf, pos, max_len) {
                    Some(n) => assert!(n > buf.len() - pos && n <= max_len),
                    None => assert!(buf.len() - pos < HEADER_LEN),
                }
                break;
            }
            Err(_) => {
                assert_eq!(needed_len(buf, pos, max_len), None);
                break;
            }
        }
    }
});

fn parse_body(tag: u8, body: &[u8]) {
    match tag {
        b'R' => {
            let _ = messages::parse_auth_request(body);
        }
        b'E' | b'N' => {
            let _ = messages::parse_error_fields(body);
        }
        b'S' => {
            let _ = messages::parse_parameter_status(body);
        }
        b'K' => {
            let _ = messages::parse_backend_key_data(body);
        }
        b'p' => {
            let _ = messages::parse_sasl_initial_response(body);
            let _ = messages::parse_password(body);
        }
        _ => {}
    }
}
