//! AMQP 1.0 frames over an async byte stream (feature `tokio`), the model being
//! [`crate::mqtt_io::PacketStream`].
//!
//! [`FrameStream`] buffers what it reads, reads the 8-byte protocol headers with
//! [`FrameStream::read_header`] and cuts the rest into frames with [`decode_frame`]; it writes
//! headers and frames ([`Frame::encode`]). It adds no timeouts: callers wrap reads and writes
//! in their own (`tokio::time::timeout`).

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::amqp_frame::{decode_frame, Frame, FrameError};

/// Bytes of room made in the read buffer before each read from the stream.
const READ_CHUNK: usize = 4096;

/// Why a header or frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The peer sent bytes that are not a valid frame, or a frame over the size limit
    /// ([`FrameError::TooLarge`]).
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a protocol header or a frame.
    #[error("the connection closed in the middle of a frame")]
    Truncated,
    /// Reading or writing the stream failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A byte stream read and written as AMQP protocol headers and frames.
#[derive(Debug)]
pub struct FrameStream<S> {
    stream: S,
    buf: BytesMut,
    max_frame_size: u32,
}

impl<S> FrameStream<S> {
    /// Wraps `stream`; frames read larger than `max_frame_size` are refused with
    /// [`FrameError::TooLarge`] as soon as their size field arrives. No buffer is allocated
    /// until the first read.
    pub fn new(stream: S, max_frame_size: u32) -> Self {
        Self { stream, buf: BytesMut::new(), max_frame_size }
    }

    /// Changes the size limit for frames read (after open negotiates it).
    pub fn set_max_frame_size(&mut self, max_frame_size: u32) {
        self.max_frame_size = max_frame_size;
    }

    /// The size limit for frames read.
    pub fn max_frame_size(&self) -> u32 {
        self.max_frame_size
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably. Reading from it directly skips the bytes this reader
    /// has buffered; writing to it directly is fine between frames.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The underlying stream; bytes read but not yet returned are dropped.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Bytes read from the stream but not yet returned as a header or frame.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameStream<S> {
    /// Reads more bytes into the buffer; false at the end of the stream.
    async fn fill(&mut self) -> Result<bool, FrameIoError> {
        self.buf.reserve(READ_CHUNK);
        Ok(self.stream.read_buf(&mut self.buf).await? != 0)
    }

    /// Reads an 8-byte protocol header: `Ok(None)` when the stream ends before any byte,
    /// [`FrameIoError::Truncated`] when it ends inside the header. Bytes after the header
    /// stay buffered for [`FrameStream::read`].
    ///
    /// Cancel safe: a dropped call loses no byte.
    pub async fn read_header(&mut self) -> Result<Option<[u8; 8]>, FrameIoError> {
        loop {
            if let Some(h) = self.buf.get(..8) {
                let mut header = [0u8; 8];
                header.copy_from_slice(h);
                self.buf.advance(8);
                return Ok(Some(header));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameIoError::Truncated) };
            }
        }
    }

    /// Reads the next frame: `Ok(None)` when the stream ends cleanly between frames,
    /// [`FrameIoError::Truncated`] when it ends inside one.
    ///
    /// Cancel safe: when the future is dropped (a timeout, a `select!`), no byte is lost and
    /// the next call continues where this one stopped.
    pub async fn read(&mut self) -> Result<Option<Frame>, FrameIoError> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf, self.max_frame_size)? {
                self.buf.advance(used);
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameIoError::Truncated) };
            }
        }
    }

    /// Writes a protocol header and flushes. Not cancel safe (like all writes).
    pub async fn write_header(&mut self, h: &[u8; 8]) -> Result<(), FrameIoError> {
        self.stream.write_all(h).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Encodes `frame`, writes it and flushes the stream.
    ///
    /// Not cancel safe: dropped midway, part of the frame may have been written, and the
    /// stream should be closed.
    pub async fn write(&mut self, frame: &Frame) -> Result<(), FrameIoError> {
        self.write_all(std::slice::from_ref(frame)).await
    }

    /// Encodes `frames` into one buffer, writes it with one write and flushes. Not cancel safe.
    pub async fn write_all(&mut self, frames: &[Frame]) -> Result<(), FrameIoError> {
        let mut out = Vec::new();
        for f in frames {
            f.encode(&mut out);
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp_frame::{Close, Open, Performative, Sasl, AMQP_HEADER, SASL_HEADER};
    use tokio::io::{duplex, AsyncWriteExt};

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Sasl(Sasl::Mechanisms(vec!["PLAIN".into()])),
            Frame::Amqp {
                channel: 0,
                performative: Performative::Open(Open { container_id: "c".into(), ..Open::default() }),
                payload: vec![],
            },
            Frame::Heartbeat { channel: 0 },
            Frame::Amqp {
                channel: 3,
                performative: Performative::Transfer(Default::default()),
                payload: vec![b'x'; 10_000],
            },
            Frame::Amqp { channel: 0, performative: Performative::Close(Close::default()), payload: vec![] },
        ]
    }

    #[tokio::test]
    async fn header_and_frames_round_trip() {
        let (a, b) = duplex(64 * 1024);
        let mut writer = FrameStream::new(a, 1 << 20);
        let mut reader = FrameStream::new(b, 1 << 20);
        writer.write_header(&SASL_HEADER).await.unwrap();
        writer.write_all(&frames()).await.unwrap();
        writer.write_header(&AMQP_HEADER).await.unwrap();
        writer.write(&frames()[1]).await.unwrap();
        assert_eq!(reader.read_header().await.unwrap(), Some(SASL_HEADER));
        for f in frames() {
            assert_eq!(reader.read().await.unwrap(), Some(f));
        }
        assert_eq!(reader.read_header().await.unwrap(), Some(AMQP_HEADER));
        assert_eq!(reader.read().await.unwrap(), Some(frames()[1].clone()));
        drop(writer);
        assert_eq!(reader.read().await.unwrap(), None);
        assert_eq!(reader.read_header().await.unwrap(), None);
    }

    #[tokio::test]
    async fn bytes_after_the_header_stay_buffered() {
        let (mut a, b) = duplex(64 * 1024);
        let mut all = AMQP_HEADER.to_vec();
        for f in frames() {
            f.encode(&mut all);
        }
        a.write_all(&all).await.unwrap();
        drop(a);
        let mut reader = FrameStream::new(b, 1 << 20);
        assert!(reader.buffered().is_empty());
        assert_eq!(reader.read_header().await.unwrap(), Some(AMQP_HEADER));
        for f in frames() {
            assert_eq!(reader.read().await.unwrap(), Some(f));
        }
        assert_eq!(reader.read().await.unwrap(), None);
    }

    #[tokio::test]
    async fn frames_split_across_reads() {
        let (mut a, b) = duplex(7);
        let mut reader = FrameStream::new(b, 1 << 20);
        let writer = tokio::spawn(async move {
            let mut all = SASL_HEADER.to_vec();
            for f in frames() {
                f.encode(&mut all);
            }
            for piece in all.chunks(3) {
                a.write_all(piece).await.unwrap();
            }
        });
        assert_eq!(reader.read_header().await.unwrap(), Some(SASL_HEADER));
        for f in frames() {
            assert_eq!(reader.read().await.unwrap(), Some(f));
        }
        writer.await.unwrap();
        assert_eq!(reader.read().await.unwrap(), None);
    }

    #[tokio::test]
    async fn end_of_stream_inside_a_header_or_frame_is_truncated() {
        let (mut a, b) = duplex(1024);
        a.write_all(b"AMQ").await.unwrap();
        drop(a);
        let mut reader = FrameStream::new(b, 1024);
        assert!(matches!(reader.read_header().await, Err(FrameIoError::Truncated)));

        let (mut a, b) = duplex(1024);
        let bytes = frames()[1].to_bytes();
        a.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        drop(a);
        let mut reader = FrameStream::new(b, 1024);
        let err = reader.read().await.unwrap_err();
        assert!(matches!(err, FrameIoError::Truncated), "{err:?}");
        assert_eq!(err.to_string(), "the connection closed in the middle of a frame");
    }

    #[tokio::test]
    async fn clean_end_of_stream_is_none() {
        let (a, b) = duplex(1024);
        drop(a);
        let mut reader = FrameStream::new(b, 1024);
        assert_eq!(reader.read_header().await.unwrap(), None);
        assert_eq!(reader.read().await.unwrap(), None);
    }

    #[tokio::test]
    async fn too_large_is_refused_from_the_size_field() {
        let (mut a, b) = duplex(1024);
        a.write_all(&[0, 0, 0x10, 0]).await.unwrap();
        let mut reader = FrameStream::new(b, 512);
        assert_eq!(reader.max_frame_size(), 512);
        let err = reader.read().await.unwrap_err();
        assert!(matches!(err, FrameIoError::Frame(FrameError::TooLarge { size: 4096, max: 512 })), "{err:?}");
        reader.set_max_frame_size(1 << 20);
        assert_eq!(reader.max_frame_size(), 1 << 20);
        drop(a);
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        let (mut a, b) = duplex(1024);
        let mut reader = FrameStream::new(b, 1024);
        a.write_all(&AMQP_HEADER[..5]).await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), reader.read_header()).await;
        assert!(r.is_err(), "half a header: still waiting");
        a.write_all(&AMQP_HEADER[5..]).await.unwrap();
        let bytes = frames()[1].to_bytes();
        a.write_all(&bytes[..6]).await.unwrap();
        assert_eq!(reader.read_header().await.unwrap(), Some(AMQP_HEADER));
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), reader.read()).await;
        assert!(r.is_err(), "half a frame: still waiting");
        a.write_all(&bytes[6..]).await.unwrap();
        assert_eq!(reader.read().await.unwrap(), Some(frames()[1].clone()));
        let _ = reader.get_ref();
        let _ = reader.get_mut();
        drop(reader.into_inner());
    }
}
