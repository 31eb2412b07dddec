//! How span payloads are packed into one Redis set member and back
//! (docs/design.md §4), in the layout Sentry's span buffer uses so both
//! can read each other's data:
//!
//! - compression level `-1`: every payload is its own member, stored raw;
//! - any other level: one member holding one zstd frame (content size in the
//!   header, no checksum) of the payloads joined by `\x00`.
//!
//! On read, a member that starts with the zstd magic is a frame; anything else is
//! one raw payload. JSON never contains a raw NUL byte, so the separator is safe
//! for the payloads [`decode_span`](super::decode_span) produces.
//!
//! Encoding is deterministic (same payloads and level ⇒ same bytes, with this
//! build's zstd): re-ingesting a batch must `SADD` the same member again. zstd
//! contexts are reused per thread, which changes speed but not output.
//! Decoding is bounded: a corrupt or hostile member cannot make it allocate more
//! than the caller's limit. This module must not know about Redis keys.

use std::cell::RefCell;
use std::io::{self, Read};

use bytes::Bytes;
use zstd::bulk::{Compressor, Decompressor};

/// The first four bytes of every zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// The compression level that stores payloads raw, one member each.
pub const LEVEL_RAW: i32 = -1;

const SEPARATOR: u8 = b'\x00';

/// Failure to pack or unpack a member.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// zstd refused to compress (e.g. out of memory, invalid level).
    #[error("zstd compression of span payloads at level {level} failed")]
    Compress {
        level: i32,
        #[source]
        source: io::Error,
    },
    /// The member starts with the zstd magic but is not a valid frame.
    #[error("zstd decompression of a payload member failed")]
    Decompress(#[source] io::Error),
    /// The member would decompress to more than the caller's limit.
    #[error("zstd decompression of a payload member exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit given to [`decode_member`].
        limit: usize,
    },
}

/// Most bytes of joined payloads in one zstd frame. A subsegment can be as
/// large as a coalescing window; cutting it into frames of this size keeps
/// every member within what the flusher's decompression limit
/// ([`max_member_bytes`]) accepts, whatever the window bounds.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// The decompressed size a flusher accepts for one member: a frame, or one
/// span alone when spans may be larger than a frame, or what an older build
/// wrote (one frame per subsegment of a poll batch, `legacy_bytes`).
pub fn max_member_bytes(max_span_bytes: usize, legacy_bytes: usize) -> usize {
    MAX_FRAME_BYTES.max(max_span_bytes).max(legacy_bytes)
}

/// Packs payloads into set members. `level` -1: one member per payload (raw);
/// otherwise zstd frames (level 0 = zstd's default) of the payloads joined by
/// `b'\x00'`, each frame at most [`MAX_FRAME_BYTES`] of joined payloads (a
/// larger payload is a frame alone), in order. No payloads ⇒ no members (the
/// caller must not `SADD` nothing).
///
/// Payloads must not contain NUL bytes and must not be empty; a compressed
/// member would not give them back unchanged.
pub fn encode_members<B: AsRef<[u8]>>(
    payloads: &[B],
    level: i32,
) -> Result<Vec<Vec<u8>>, CompressError> {
    if payloads.is_empty() {
        return Ok(Vec::new());
    }
    if level == LEVEL_RAW {
        return Ok(payloads.iter().map(|p| p.as_ref().to_vec()).collect());
    }
    let mut frames = Vec::new();
    let mut start = 0;
    while start < payloads.len() {
        // Greedy: as many payloads as fit in a frame, at least one.
        let mut end = start + 1;
        let mut len = payloads[start].as_ref().len();
        while end < payloads.len() && len + 1 + payloads[end].as_ref().len() <= MAX_FRAME_BYTES {
            len += 1 + payloads[end].as_ref().len();
            end += 1;
        }
        let mut joined = Vec::with_capacity(len);
        for (i, payload) in payloads[start..end].iter().enumerate() {
            if i > 0 {
                joined.push(SEPARATOR);
            }
            joined.extend_from_slice(payload.as_ref());
        }
        let mut frame =
            compress(&joined, level).map_err(|source| CompressError::Compress { level, source })?;
        // The buffer was sized for incompressible input; members are held until
        // Redis acknowledges the window, so give the slack back now.
        frame.shrink_to_fit();
        frames.push(frame);
        start = end;
    }
    Ok(frames)
}

/// Unpacks one set member onto `out`. A member starting with [`ZSTD_MAGIC`] is
/// decompressed and split on `b'\x00'` (a frame of nothing holds no payloads);
/// any other member is one raw payload. `max_bytes` bounds the decompressed
/// size; on any error nothing is pushed.
pub fn decode_member(
    member: &[u8],
    max_bytes: usize,
    out: &mut Vec<Bytes>,
) -> Result<(), CompressError> {
    if !member.starts_with(&ZSTD_MAGIC) {
        out.push(Bytes::copy_from_slice(member));
        return Ok(());
    }
    let data = Bytes::from(decompress(member, max_bytes)?);
    if data.is_empty() {
        return Ok(());
    }
    let mut start = 0;
    while let Some(len) = find_separator(&data[start..]) {
        out.push(data.slice(start..start + len));
        start += len + 1;
    }
    out.push(data.slice(start..));
    Ok(())
}

/// Position of the first separator. Word-at-a-time: splitting is otherwise the
/// most expensive step of unpacking a well-compressed member.
fn find_separator(haystack: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Non-zero iff some byte of `word` is zero (the classic SWAR test).
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let (blocks, _) = haystack.as_chunks::<32>();
    let mut checked = 0;
    for block in blocks {
        let (words, _) = block.as_chunks::<8>();
        let any = words
            .iter()
            .fold(0, |acc, word| acc | has_zero(u64::from_ne_bytes(*word)));
        if any != 0 {
            break;
        }
        checked += block.len();
    }
    haystack[checked..]
        .iter()
        .position(|&b| b == SEPARATOR)
        .map(|at| checked + at)
}

thread_local! {
    /// One compression context per thread, with the level it is set to:
    /// creating a context and its tables costs more than compressing one
    /// subsegment's payloads.
    static COMPRESSOR: RefCell<Option<(i32, Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

fn compress(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    // The thread's context can be unavailable only while the thread is being
    // torn down (or if this were ever re-entered); a fresh one then does the job.
    let reused = COMPRESSOR.try_with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        Some(compress_in(&mut slot, data, level))
    });
    match reused {
        Ok(Some(result)) => result,
        _ => Compressor::new(level)?.compress(data),
    }
}

fn compress_in(
    slot: &mut Option<(i32, Compressor<'static>)>,
    data: &[u8],
    level: i32,
) -> io::Result<Vec<u8>> {
    let compressor = match slot {
        Some((current, compressor)) if *current == level => compressor,
        Some((current, compressor)) => {
            if let Err(e) = compressor.set_compression_level(level) {
                // Do not keep a context whose level is unknown.
                *slot = None;
                return Err(e);
            }
            *current = level;
            compressor
        }
        None => &mut slot.insert((level, Compressor::new(level)?)).1,
    };
    compressor.compress(data)
}

fn decompress(member: &[u8], max_bytes: usize) -> Result<Vec<u8>, CompressError> {
    let declared = zstd::zstd_safe::get_frame_content_size(member).map_err(|_| {
        CompressError::Decompress(io::Error::new(
            io::ErrorKind::InvalidData,
            "corrupt zstd frame header",
        ))
    })?;
    match declared {
        Some(size) if size > max_bytes as u64 => Err(CompressError::TooLarge { limit: max_bytes }),
        // Frames from spanbuf and Sentry declare their size: decompress in one
        // call into an exact buffer. A mismatch (more frames follow, or the
        // header lies) fails here and takes the bounded streaming path.
        // `size` fits in usize: it is at most `max_bytes`.
        Some(size) => match decompress_exact(member, size as usize) {
            Ok(data) => Ok(data),
            Err(_) => decompress_streaming(member, max_bytes),
        },
        None => decompress_streaming(member, max_bytes),
    }
}

fn decompress_exact(member: &[u8], size: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size);
    let reused = DECOMPRESSOR.try_with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        let decompressor = match &mut *slot {
            Some(d) => d,
            None => match Decompressor::new() {
                Ok(d) => slot.insert(d),
                Err(e) => return Some(Err(e)),
            },
        };
        Some(decompressor.decompress_to_buffer(member, &mut buf))
    });
    match reused {
        Ok(Some(result)) => result?,
        _ => Decompressor::new()?.decompress_to_buffer(member, &mut buf)?,
    };
    Ok(buf)
}

fn decompress_streaming(member: &[u8], max_bytes: usize) -> Result<Vec<u8>, CompressError> {
    let decoder =
        zstd::stream::read::Decoder::with_buffer(member).map_err(CompressError::Decompress)?;
    let mut data = Vec::new();
    decoder
        .take((max_bytes as u64).saturating_add(1))
        .read_to_end(&mut data)
        .map_err(CompressError::Decompress)?;
    if data.len() > max_bytes {
        return Err(CompressError::TooLarge { limit: max_bytes });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const LIMIT: usize = 1 << 20;

    fn payloads(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                format!(
                    r#"{{"span_id":"{i:016x}","trace_id":"{:032x}","project_id":1,"description":"span number {i}"}}"#,
                    i * 7919
                )
                .into_bytes()
            })
            .collect()
    }

    fn decode_all(members: &[Vec<u8>], limit: usize) -> Result<Vec<Bytes>, CompressError> {
        let mut out = Vec::new();
        for member in members {
            decode_member(member, limit, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn round_trip_at_every_level() {
        for level in [LEVEL_RAW, 0, 3, 19] {
            for n in [0, 1, 2, 50, 500] {
                let input = payloads(n);
                let members = encode_members(&input, level).unwrap();
                match (level, n) {
                    (_, 0) => assert!(members.is_empty()),
                    (LEVEL_RAW, _) => assert_eq!(members.len(), n),
                    _ => {
                        assert_eq!(members.len(), 1);
                        assert!(members[0].starts_with(&ZSTD_MAGIC));
                    }
                }
                let output = decode_all(&members, LIMIT).unwrap();
                assert_eq!(output, input, "level {level}, {n} payloads");
            }
        }
    }

    #[test]
    fn compressed_member_is_a_plain_zstd_frame_of_nul_joined_payloads() {
        // What Sentry writes and reads: zstd.decompress(member).split(b"\0").
        let input = payloads(3);
        let members = encode_members(&input, 3).unwrap();
        let plain = zstd::decode_all(&members[0][..]).unwrap();
        assert_eq!(plain, input.join(&b'\x00'));
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&members[0]).unwrap(),
            Some(plain.len() as u64)
        );
        // And the other way round: a frame written by another encoder.
        let foreign = zstd::encode_all(&plain[..], 1).unwrap();
        assert_eq!(decode_all(&[foreign], LIMIT).unwrap(), input);
    }

    #[test]
    fn output_is_deterministic() {
        let mut rng = StdRng::seed_from_u64(7);
        for level in [LEVEL_RAW, 0, 3, 19, 1, 3] {
            for n in [1, 7, 50, 400] {
                let mut input = payloads(n);
                for p in &mut input {
                    p.extend((0..rng.random_range(0..200)).map(|_| rng.random_range(b'a'..=b'z')));
                }
                let reused = encode_members(&input, level).unwrap();
                let again = encode_members(&input, level).unwrap();
                assert_eq!(reused, again);
                if level != LEVEL_RAW {
                    // A fresh context gives the same bytes as the reused one.
                    let joined = input.join(&b'\x00');
                    let fresh = Compressor::new(level).unwrap().compress(&joined).unwrap();
                    assert_eq!(reused, vec![fresh], "level {level}, {n} payloads");
                }
                // And so does another thread, whose context has other history.
                let elsewhere = std::thread::scope(|s| {
                    s.spawn(|| encode_members(&input, level).unwrap())
                        .join()
                        .unwrap()
                });
                assert_eq!(reused, elsewhere);
            }
        }
    }

    #[test]
    fn a_large_subsegment_is_cut_into_frames_within_the_limit() {
        // 40 payloads of 512 KiB: 20 MiB of joined payloads, 3 frames, and a
        // payload larger than a frame is a frame alone.
        let big: Vec<Vec<u8>> = (0..40)
            .map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(512 * 1024)).into_bytes())
            .collect();
        let mut input = big.clone();
        input.insert(
            7,
            format!("{{\"pad\":\"{}\"}}", "y".repeat(MAX_FRAME_BYTES + 10)).into_bytes(),
        );
        let members = encode_members(&input, 0).unwrap();
        assert!(members.len() >= 4, "{} frames", members.len());
        let limit = max_member_bytes(MAX_FRAME_BYTES + 100, 0);
        let mut out = Vec::new();
        for member in &members {
            let before = out.len();
            decode_member(member, limit, &mut out).unwrap();
            let joined: usize = out[before..].iter().map(|p| p.len() + 1).sum::<usize>() - 1;
            assert!(
                joined <= MAX_FRAME_BYTES || out.len() - before == 1,
                "a frame of {joined} bytes with {} payloads",
                out.len() - before
            );
        }
        let got: Vec<&[u8]> = out.iter().map(|b| &b[..]).collect();
        let want: Vec<&[u8]> = input.iter().map(|p| &p[..]).collect();
        assert_eq!(got, want, "every payload, in order");
        assert_eq!(members, encode_members(&input, 0).unwrap(), "deterministic");
    }

    #[test]
    fn raw_members_pass_through() {
        let mut out = Vec::new();
        for member in [&b"{\"a\":1}"[..], b"", b"\x28\xb5\x2f", b"not json at all"] {
            decode_member(member, 0, &mut out).unwrap();
        }
        assert_eq!(
            out,
            [&b"{\"a\":1}"[..], b"", b"\x28\xb5\x2f", b"not json at all"]
        );
    }

    #[test]
    fn decompressed_size_limit_is_enforced() {
        let input = payloads(50);
        let size = input.iter().map(Vec::len).sum::<usize>() + input.len() - 1;
        let members = encode_members(&input, 0).unwrap();
        assert_eq!(decode_all(&members, size).unwrap(), input);
        let mut out = Vec::new();
        let err = decode_member(&members[0], size - 1, &mut out).unwrap_err();
        assert!(
            matches!(err, CompressError::TooLarge { limit } if limit == size - 1),
            "{err}"
        );
        assert!(out.is_empty());

        // Also without a declared size in the header (a streamed frame): the
        // limit is enforced while decompressing.
        let joined = input.join(&b'\x00');
        let mut streamed = Vec::new();
        {
            let mut encoder = zstd::stream::write::Encoder::new(&mut streamed, 3).unwrap();
            encoder.include_contentsize(false).unwrap();
            std::io::Write::write_all(&mut encoder, &joined).unwrap();
            encoder.finish().unwrap();
        }
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(),
            None
        );
        assert_eq!(decode_all(&[streamed.clone()], size).unwrap(), input);
        let err = decode_member(&streamed, size - 1, &mut out).unwrap_err();
        assert!(matches!(err, CompressError::TooLarge { .. }), "{err}");

        // A small bomb: 64 MiB of zeros in a few KiB, against a 1 MiB limit.
        let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 19).unwrap();
        assert!(bomb.len() < 64 << 10);
        let err = decode_member(&bomb, LIMIT, &mut out).unwrap_err();
        assert!(matches!(err, CompressError::TooLarge { .. }), "{err}");
        assert!(out.is_empty());
    }

    #[test]
    fn concatenated_frames_are_all_read() {
        let first = payloads(2);
        let second = payloads(3);
        let mut member = encode_members(&first, 3).unwrap().remove(0);
        // No separator between frames: each frame's last payload runs into the
        // next frame's first, exactly as zstd.decompress would return it.
        member.extend(encode_members(&second, 3).unwrap().remove(0));
        let out = decode_all(&[member], LIMIT).unwrap();
        let mut expected = first.join(&b'\x00');
        expected.extend(second.join(&b'\x00'));
        assert_eq!(out.len(), 4);
        assert_eq!(out.join(&b'\x00'), expected);
    }

    #[test]
    fn corrupt_frames_are_errors() {
        let member = encode_members(&payloads(50), 3).unwrap().remove(0);
        let mut rng = StdRng::seed_from_u64(11);
        let mut out = Vec::new();
        let mut cases: Vec<Vec<u8>> = vec![
            ZSTD_MAGIC.to_vec(),
            [&ZSTD_MAGIC[..], &[0xff; 16]].concat(),
            member[..member.len() - 1].to_vec(),
            member[..member.len() / 2].to_vec(),
            [&member[..], b"x"].concat(),
            [&member[..], &member[..5]].concat(),
        ];
        for _ in 0..2000 {
            let mut bad = member.clone();
            let at = rng.random_range(ZSTD_MAGIC.len()..bad.len());
            bad[at] ^= rng.random_range(1..=255u8);
            cases.push(bad);
            let len = rng.random_range(0..64);
            cases.push(
                [
                    &ZSTD_MAGIC[..],
                    &(0..len).map(|_| rng.random()).collect::<Vec<u8>>(),
                ]
                .concat(),
            );
        }
        let mut errors = 0;
        for case in &cases {
            out.clear();
            // Without a checksum some byte flips inside literals decode to other
            // bytes; what matters is that nothing panics or grows unbounded.
            match decode_member(case, LIMIT, &mut out) {
                Ok(()) => assert!(out.iter().map(Bytes::len).sum::<usize>() <= LIMIT),
                Err(e) => {
                    errors += 1;
                    assert!(out.is_empty(), "{e}");
                }
            }
        }
        for case in &cases[..6] {
            assert!(decode_member(case, LIMIT, &mut out).is_err(), "{case:?}");
        }
        assert!(errors > cases.len() / 2, "{errors} of {}", cases.len());
    }

    #[test]
    fn separator_search_matches_a_plain_scan() {
        let mut rng = StdRng::seed_from_u64(3);
        for len in 0..200 {
            for _ in 0..20 {
                let mut data: Vec<u8> = (0..len).map(|_| rng.random_range(1..=255u8)).collect();
                for _ in 0..rng.random_range(0..3) {
                    if len > 0 {
                        let at = rng.random_range(0..len);
                        data[at] = 0;
                    }
                }
                assert_eq!(
                    find_separator(&data),
                    data.iter().position(|&b| b == 0),
                    "{data:?}"
                );
            }
        }
    }

    #[test]
    fn error_messages_name_the_operation() {
        let err = decode_member(
            &[&ZSTD_MAGIC[..], &[0xff; 16]].concat(),
            LIMIT,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("zstd decompression"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        let err = CompressError::TooLarge { limit: 10 };
        assert_eq!(
            err.to_string(),
            "zstd decompression of a payload member exceeds the limit of 10 bytes"
        );
    }
}
