//! Header-only framing. A frame is `tag (1) | length (4, big-endian, includes itself) | body`.
//!
//! The length comes from the peer and is distrusted: it must be at least 4 (the length field
//! itself) and at most the configured maximum, checked before it is widened or used to reserve.

use thiserror::Error;

/// Bytes in the header: one tag byte and a four-byte length.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("message {tag:?} declares length {len}, below the minimum of 4")]
    TooShort { tag: char, len: i32 },
    #[error("message {tag:?} of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { tag: char, len: usize, max: usize },
}

/// A complete frame found in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// Total bytes including the tag and length field.
    pub total_len: usize,
}

impl Frame {
    /// The body range relative to the frame start.
    pub fn body_range(&self) -> std::ops::Range<usize> {
        HEADER_LEN..self.total_len
    }
}

/// Looks at the frame starting at `buf[pos..]`.
///
/// Returns `Ok(Some(frame))` when the whole frame is in the buffer, `Ok(None)` when more bytes are
/// needed (the caller reads more; at most `needed_len` tells how many), and an error when the
/// header is invalid — the stream cannot be resynchronised after that, so the connection ends.
pub fn frame_at(buf: &[u8], pos: usize, max_len: usize) -> Result<Option<Frame>, FrameError> {
    let Some(header) = buf.get(pos..pos + HEADER_LEN) else {
        return Ok(None);
    };
    let tag = header[0];
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(FrameError::TooShort { tag: tag as char, len });
    }
    // Non-negative after the check above, so the widening cannot wrap.
    let total_len = len as usize + 1;
    if total_len > max_len {
        return Err(FrameError::TooLong {
            tag: tag as char,
            len: total_len,
            max: max_len,
        });
    }
    if buf.len() - pos < total_len {
        return Ok(None);
    }
    Ok(Some(Frame { tag, total_len }))
}

/// How many bytes the frame starting at `buf[pos..]` needs in total, if its header is complete
/// and valid; lets the reader reserve once instead of growing repeatedly for a big message.
pub fn needed_len(buf: &[u8], pos: usize, max_len: usize) -> Option<usize> {
    let header = buf.get(pos..pos + HEADER_LEN)?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return None;
    }
    let total = len as usize + 1;
    (total <= max_len).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn complete_partial_and_invalid_frames() {
        let m = msg(b'Q', b"select 1\0");
        assert_eq!(
            frame_at(&m, 0, 1024),
            Ok(Some(Frame {
                tag: b'Q',
                total_len: m.len()
            }))
        );
        for cut in 0..m.len() {
            assert_eq!(frame_at(&m[..cut], 0, 1024), Ok(None), "cut at {cut}");
        }
        let bad = [b'Q', 0, 0, 0, 3];
        assert!(matches!(frame_at(&bad, 0, 1024), Err(FrameError::TooShort { .. })));
        let neg = [b'Q', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(frame_at(&neg, 0, 1024), Err(FrameError::TooShort { .. })));
        let big = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(frame_at(&big, 0, 1024), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn frames_in_sequence() {
        let mut buf = msg(b'P', b"\0select 1\0\0\0");
        buf.extend(msg(b'S', b""));
        let f1 = frame_at(&buf, 0, 1024).unwrap().unwrap();
        let f2 = frame_at(&buf, f1.total_len, 1024).unwrap().unwrap();
        assert_eq!(f2.tag, b'S');
        assert_eq!(f1.total_len + f2.total_len, buf.len());
        assert_eq!(needed_len(&buf, 0, 1024), Some(f1.total_len));
    }
}
