//! WebSocket masking (RFC 6455 §5.3): the XOR the frame codec applies to client frames, and
//! that the traffic console's captures undo on payloads kept as they came off the wire. A leaf:
//! it depends on nothing of the crate.

/// XORs `data` with `key`, cycling from the key's first byte (RFC 6455 §5.3). Masking and
/// unmasking are the same operation.
///
/// Thirty-two bytes a step against the key repeated to that width: the compiler turns the
/// inner loop into vector XORs (SSE2 on any x86-64), about a third of the instructions of
/// eight bytes a step in a `u64`.
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    const STEP: usize = 32;
    let wide: [u8; STEP] = std::array::from_fn(|i| key[i % 4]);
    let mut chunks = data.chunks_exact_mut(STEP);
    for chunk in &mut chunks {
        for (byte, k) in chunk.iter_mut().zip(wide) {
            *byte ^= k;
        }
    }
    // STEP is a multiple of 4: the rest starts at the key's first byte again.
    for (byte, k) in chunks.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_length_like_the_byte_at_a_time_definition() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..100 {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut masked = data.clone();
            apply_mask(&mut masked, key);
            let expected: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(masked, expected, "length {len}");
            apply_mask(&mut masked, key);
            assert_eq!(masked, data, "length {len}: masking twice is the identity");
        }
    }
}
