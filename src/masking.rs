//! WebSocket masking (RFC 6455 §5.3): the XOR the frame codec applies to client frames, and
//! that the traffic console's captures undo on payloads kept as they came off the wire. A leaf:
//! it depends on nothing of the crate.

/// XORs `data` with `key`, cycling from the key's first byte (RFC 6455 §5.3). Masking and
/// unmasking are the same operation.
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (byte, k) in chunks.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}
