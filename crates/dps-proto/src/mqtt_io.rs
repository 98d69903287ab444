//! MQTT packets over an async byte stream (feature `tokio`): the one framed reader and writer
//! the server, the device library and the bench share.
//!
//! [`PacketStream`] buffers what it reads, cuts it into packets with [`decode`] and writes
//! packets with [`Packet::encode`]. It adds no timeouts: callers wrap [`PacketStream::read`]
//! and [`PacketStream::write`] in their own (`tokio::time::timeout`), as each has its own
//! deadlines and error messages.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::mqtt::{decode, DecodeError, EncodeError, Packet};

/// Bytes of room made in the read buffer before each read from the stream.
const READ_CHUNK: usize = 4096;

/// Why a packet could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer sent bytes that are not a valid packet, or a packet over the size limit
    /// ([`DecodeError::TooLarge`]).
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// The packet to write cannot be encoded.
    #[error("{0}")]
    Encode(#[from] EncodeError),
    /// The stream ended in the middle of a packet.
    #[error("the connection closed in the middle of a packet")]
    Truncated,
    /// Reading or writing the stream failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A byte stream read and written as MQTT packets.
#[derive(Debug)]
pub struct PacketStream<S> {
    stream: S,
    buf: BytesMut,
    max_packet_bytes: usize,
}

impl<S> PacketStream<S> {
    /// Wraps `stream`; packets read larger than `max_packet_bytes` (whole packet, fixed
    /// header included) are refused with [`DecodeError::TooLarge`] as soon as their header
    /// arrives. No buffer is allocated until the first read.
    pub fn new(stream: S, max_packet_bytes: usize) -> Self {
        Self { stream, buf: BytesMut::new(), max_packet_bytes }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably. Reading from it directly skips the bytes this reader
    /// has buffered; writing to it directly is fine between packets.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The underlying stream; bytes read but not yet returned as a packet are dropped.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// The size limit for packets read.
    pub fn max_packet_bytes(&self) -> usize {
        self.max_packet_bytes
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> PacketStream<S> {
    /// Reads the next packet: `Ok(None)` when the stream ends cleanly between packets,
    /// [`FrameError::Truncated`] when it ends inside one.
    ///
    /// Cancel safe: when the future is dropped (a timeout, a `select!`), no byte is lost and
    /// the next call continues where this one stopped.
    pub async fn read(&mut self) -> Result<Option<Packet>, FrameError> {
        loop {
            if let Some((packet, used)) = decode(&self.buf, self.max_packet_bytes)? {
                self.buf.advance(used);
                return Ok(Some(packet));
            }
            self.buf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Truncated) };
            }
        }
    }

    /// Encodes `packet`, writes it and flushes the stream.
    ///
    /// Not cancel safe: dropped midway, part of the packet may have been written, and the
    /// stream should be closed.
    pub async fn write(&mut self, packet: &Packet) -> Result<(), FrameError> {
        let bytes = packet.encode()?;
        self.stream.write_all(&bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{Connect, ConnectReturnCode, Publish};
    use tokio::io::{duplex, AsyncWriteExt};

    fn packets() -> Vec<Packet> {
        vec![
            Packet::Connect(Connect {
                protocol_name: "MQTT".into(),
                protocol_level: 4,
                clean_session: true,
                keep_alive: 60,
                client_id: "dev-1".into(),
                will: None,
                username: Some("0ne00000001/registrations/dev-1/api-version=2019-03-31".into()),
                password: Some(b"SharedAccessSignature sr=x&sig=y&se=1".to_vec()),
            }),
            Packet::ConnAck { session_present: false, code: ConnectReturnCode::Accepted },
            Packet::Subscribe { packet_id: 1, filters: vec![("$dps/registrations/res/#".into(), 1)] },
            Packet::Publish(Publish {
                dup: false,
                qos: 1,
                retain: false,
                topic: "$dps/registrations/PUT/iotdps-register/?$rid=1".into(),
                packet_id: Some(2),
                payload: vec![b'x'; 10_000],
            }),
            Packet::PubAck(2),
            Packet::PingReq,
            Packet::Disconnect,
        ]
    }

    #[tokio::test]
    async fn packets_round_trip() {
        let (a, b) = duplex(64 * 1024);
        let mut writer = PacketStream::new(a, 1 << 20);
        let mut reader = PacketStream::new(b, 1 << 20);
        for p in packets() {
            writer.write(&p).await.unwrap();
            assert_eq!(reader.read().await.unwrap(), Some(p));
        }
        drop(writer);
        assert_eq!(reader.read().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_packet_split_across_reads() {
        // A pipe of 7 bytes: every read returns at most 7 bytes of the 10 000-byte publish.
        let (mut a, b) = duplex(7);
        let mut reader = PacketStream::new(b, 1 << 20);
        let all = packets();
        let sent = all.clone();
        let writer = tokio::spawn(async move {
            for p in &sent {
                let bytes = p.encode().unwrap();
                for piece in bytes.chunks(3) {
                    a.write_all(piece).await.unwrap();
                }
            }
        });
        for p in all {
            assert_eq!(reader.read().await.unwrap(), Some(p));
        }
        writer.await.unwrap();
        assert_eq!(reader.read().await.unwrap(), None);
    }

    #[tokio::test]
    async fn two_packets_in_one_read() {
        let (mut a, b) = duplex(1024);
        let mut bytes = Packet::PingReq.encode().unwrap();
        bytes.extend(Packet::PubAck(9).encode().unwrap());
        a.write_all(&bytes).await.unwrap();
        drop(a);
        let mut reader = PacketStream::new(b, 1024);
        assert_eq!(reader.read().await.unwrap(), Some(Packet::PingReq));
        assert_eq!(reader.read().await.unwrap(), Some(Packet::PubAck(9)));
        assert_eq!(reader.read().await.unwrap(), None);
    }

    #[tokio::test]
    async fn clean_end_of_stream_is_none() {
        let (a, b) = duplex(1024);
        drop(a);
        let mut reader = PacketStream::new(b, 1024);
        assert_eq!(reader.read().await.unwrap(), None);
    }

    #[tokio::test]
    async fn end_of_stream_inside_a_packet_is_truncated() {
        let (mut a, b) = duplex(1024);
        let bytes = Packet::PubAck(9).encode().unwrap();
        a.write_all(&bytes[..3]).await.unwrap();
        drop(a);
        let mut reader = PacketStream::new(b, 1024);
        let err = reader.read().await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err:?}");
        assert_eq!(err.to_string(), "the connection closed in the middle of a packet");
    }

    #[tokio::test]
    async fn too_large_is_refused_from_the_header() {
        let (mut a, b) = duplex(1024);
        // A PUBLISH header announcing 1000 bytes; the body never comes.
        a.write_all(&[0x30, 0xe8, 0x07]).await.unwrap();
        let mut reader = PacketStream::new(b, 512);
        let err = reader.read().await.unwrap_err();
        assert!(matches!(err, FrameError::Decode(DecodeError::TooLarge { size: 1003, limit: 512 })), "{err:?}");
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("packet of 1003 bytes is larger than the limit of 512 bytes"));
        drop(a);
    }

    #[tokio::test]
    async fn malformed_bytes_and_unencodable_packets() {
        let (mut a, b) = duplex(1024);
        a.write_all(&[0xc1, 0x00]).await.unwrap();
        let mut reader = PacketStream::new(b, 1024);
        assert!(matches!(reader.read().await, Err(FrameError::Decode(DecodeError::Malformed(_)))));
        let bad = Packet::Publish(Publish {
            dup: false,
            qos: 0,
            retain: false,
            topic: "t".into(),
            packet_id: Some(1),
            payload: Vec::new(),
        });
        assert!(matches!(reader.write(&bad).await, Err(FrameError::Encode(_))));
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        let (mut a, b) = duplex(1024);
        let mut reader = PacketStream::new(b, 1024);
        let bytes = Packet::PubAck(5).encode().unwrap();
        a.write_all(&bytes[..2]).await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), reader.read()).await;
        assert!(r.is_err(), "half a packet: still waiting");
        a.write_all(&bytes[2..]).await.unwrap();
        assert_eq!(reader.read().await.unwrap(), Some(Packet::PubAck(5)));
    }
}
