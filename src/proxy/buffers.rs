//! The buffers of each worker thread's legs: one scratch read buffer, and small pools of write
//! and partial-frame buffers.
//!
//! Legs take buffers from here when they have bytes to hold and give them back as soon as they
//! are empty, so an idle connection holds none, and a busy one does not go through the
//! allocator (glibc returns freed pages of worker-thread arenas to the kernel, and taking them
//! back costs a page fault each) for every batch.

use std::cell::RefCell;

use bytes::BytesMut;

/// The size of the scratch read buffer: the most one read takes in.
pub(crate) const SCRATCH: usize = 128 * 1024;

/// Buffers kept per kind and thread, and the largest one kept: at most 4 MiB per kind.
const POOLED: usize = 16;
const POOLED_CAPACITY: usize = 256 * 1024;

#[derive(Default)]
struct Pools {
    scratch: BytesMut,
    writes: Vec<Vec<u8>>,
    partials: Vec<BytesMut>,
}

thread_local! {
    static POOLS: RefCell<Pools> = RefCell::new(Pools::default());
}

/// Takes this thread's scratch buffer, empty and with [`SCRATCH`] bytes of room. Only one
/// leg holds it at a time: it is given back before the leg's poll returns.
pub(crate) fn take_scratch() -> BytesMut {
    let mut buf = POOLS.with(|p| std::mem::take(&mut p.borrow_mut().scratch));
    buf.clear();
    // Reclaims the whole capacity when the buffer is empty and unshared.
    buf.reserve(SCRATCH);
    buf
}

/// Gives the scratch buffer back.
pub(crate) fn give_back_scratch(buf: BytesMut) {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        if pools.scratch.capacity() < buf.capacity() {
            pools.scratch = buf;
        }
    });
}

/// An empty write buffer.
pub(crate) fn take_write() -> Vec<u8> {
    POOLS
        .with(|p| p.borrow_mut().writes.pop())
        .unwrap_or_default()
}

/// Returns an emptied write buffer to the pool (or frees it).
pub(crate) fn give_back_write(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > POOLED_CAPACITY {
        return;
    }
    buf.clear();
    keep_in(|p| &mut p.writes, buf);
}

/// An empty buffer with room for at least `size` bytes, for a partial frame.
pub(crate) fn take_partial(size: usize) -> BytesMut {
    let mut buf = POOLS
        .with(|p| p.borrow_mut().partials.pop())
        .unwrap_or_default();
    buf.reserve(size);
    buf
}

/// Returns an emptied partial-frame buffer to the pool (or frees it).
pub(crate) fn give_back_partial(mut buf: BytesMut) {
    if buf.capacity() == 0 || buf.capacity() > POOLED_CAPACITY {
        return;
    }
    buf.clear();
    keep_in(|p| &mut p.partials, buf);
}

/// Keeps `buf` in the pool `select` picks, unless that pool is full.
fn keep_in<T>(select: fn(&mut Pools) -> &mut Vec<T>, buf: T) {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let pool = select(&mut pools);
        if pool.len() < POOLED {
            pool.push(buf);
        }
    });
}
