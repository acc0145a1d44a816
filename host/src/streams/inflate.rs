//! Bounded buffers and raw-deflate inflation into them.
//!
//! A compressed stream's output size is chosen by the sender, so the inflater never writes
//! past the buffer's capacity and the buffer only grows through [`Budget::reserve`], which
//! refuses to pass the stream's limit or the stage's total. A deflate bomb therefore stops
//! after at most `max_stream_bytes` of output, whatever its input says.

use flate2::{Decompress, FlushDecompress, Status};

use super::StreamRejection;

/// How far one stream's buffer may grow right now.
#[derive(Clone, Copy, Debug)]
pub(super) struct Budget {
    /// [`StreamLimits::max_stream_bytes`](super::StreamLimits::max_stream_bytes).
    pub(super) stream_limit: usize,
    /// [`StreamLimits::max_buffered_bytes`](super::StreamLimits::max_buffered_bytes).
    pub(super) total_limit: usize,
    /// The largest capacity this buffer may have without the stage passing `total_limit`.
    pub(super) total_room: usize,
    /// The smallest capacity a growing buffer takes.
    pub(super) min_buffer: usize,
}

impl Budget {
    /// Whether a buffer of `len` bytes fits.
    pub(super) fn admit(&self, len: usize) -> Result<(), StreamRejection> {
        if len > self.stream_limit {
            return Err(StreamRejection::TooLarge {
                limit: self.stream_limit,
            });
        }
        if len > self.total_room {
            return Err(StreamRejection::BuffersFull {
                limit: self.total_limit,
            });
        }
        Ok(())
    }

    /// Makes room for `buffer` to hold `needed` bytes, doubling its capacity but never past
    /// the limits.
    pub(super) fn reserve(
        &self,
        buffer: &mut Vec<u8>,
        needed: usize,
    ) -> Result<(), StreamRejection> {
        if needed <= buffer.capacity() {
            return Ok(());
        }
        self.admit(needed)?;

        let target = needed
            .max(buffer.capacity().saturating_mul(2))
            .max(self.min_buffer)
            .min(self.stream_limit)
            .min(self.total_room);
        buffer.reserve_exact(target - buffer.len());
        Ok(())
    }
}

/// A raw-deflate (no zlib header) decompressor fed one piece of input at a time.
pub(super) struct BoundedInflater {
    inner: Decompress,
    finished: bool,
}

impl std::fmt::Debug for BoundedInflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedInflater")
            .field("total_in", &self.inner.total_in())
            .field("total_out", &self.inner.total_out())
            .field("finished", &self.finished)
            .finish()
    }
}

impl BoundedInflater {
    pub(super) fn new() -> Self {
        Self {
            inner: Decompress::new(false),
            finished: false,
        }
    }

    /// Whether the end of the deflate stream was seen.
    pub(super) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Inflates `input`, appending to `out`, which grows only within `budget`.
    ///
    /// Fails with `stream_too_large` / `buffers_full` when the output would pass the budget,
    /// and with `decompress_failed` for corrupt input or bytes after the end of the stream.
    pub(super) fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        budget: &Budget,
    ) -> Result<(), StreamRejection> {
        loop {
            if self.finished {
                return if input.is_empty() {
                    Ok(())
                } else {
                    Err(StreamRejection::DecompressFailed)
                };
            }

            if out.len() == out.capacity() {
                // Ask for a single byte before growing, so that a stream ending exactly at
                // the buffer's size never grows it, and a full buffer at the limit fails
                // only if there really is more output.
                let mut probe = [0u8; 1];
                let (consumed, produced, status) = self.step(input, &mut probe)?;
                input = &input[consumed..];
                self.finished = status == Status::StreamEnd;
                if produced == 1 {
                    budget.reserve(out, out.len() + 1)?;
                    out.push(probe[0]);
                } else if !self.finished && input.is_empty() {
                    return Ok(());
                } else if !self.finished && consumed == 0 {
                    return Err(StreamRejection::DecompressFailed);
                }
                continue;
            }

            let before = (self.inner.total_in(), self.inner.total_out());
            let status = self
                .inner
                .decompress_vec(input, out, FlushDecompress::None)
                .map_err(|_| StreamRejection::DecompressFailed)?;
            let consumed = (self.inner.total_in() - before.0) as usize;
            let produced = self.inner.total_out() - before.1;
            input = &input[consumed..];
            self.finished = status == Status::StreamEnd;

            // With room left in `out`, the inflater has written all it could: it needs more
            // input, which only the next chunk can give.
            if !self.finished && out.len() < out.capacity() {
                if input.is_empty() {
                    return Ok(());
                }
                if consumed == 0 && produced == 0 {
                    return Err(StreamRejection::DecompressFailed);
                }
            }
        }
    }

    fn step(
        &mut self,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(usize, usize, Status), StreamRejection> {
        let before = (self.inner.total_in(), self.inner.total_out());
        let status = self
            .inner
            .decompress(input, output, FlushDecompress::None)
            .map_err(|_| StreamRejection::DecompressFailed)?;
        let consumed = (self.inner.total_in() - before.0) as usize;
        let produced = (self.inner.total_out() - before.1) as usize;
        Ok((consumed, produced, status))
    }
}
