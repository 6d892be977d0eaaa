//! The `/colony/msg/1` wire codec: length-prefixed raw bytes with a configurable cap.
//!
//! Request frame:  `[kind: u8][len: u32 big-endian][len bytes]`, kind 0 = one-way message,
//! kind 1 = request expecting a reply.
//! Response frame: `[len: u32 big-endian][len bytes]` (an empty response acknowledges a
//! one-way message).
//!
//! Lengths above the configured maximum are rejected before any payload is read, so a
//! peer can never make us allocate more than `max` bytes per stream.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{request_response, StreamProtocol};

/// The protocol name of the message protocol.
pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new("/colony/msg/1");

const KIND_MESSAGE: u8 = 0;
const KIND_REQUEST: u8 = 1;

/// Upper bound of the initial allocation when reading a frame; the buffer grows as bytes
/// actually arrive.
const INITIAL_READ_CAPACITY: usize = 64 * 1024;

/// What travels in the request direction of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WireRequest {
    /// Fire-and-forget; acknowledged with an empty response by the network task.
    Message(Vec<u8>),
    /// Answered by the application.
    Request(Vec<u8>),
}

/// Length-prefixed bytes codec with a maximum frame size.
#[derive(Debug, Clone)]
pub(crate) struct BytesCodec {
    max: usize,
}

impl BytesCodec {
    pub(crate) fn new(max: usize) -> Self {
        Self { max }
    }
}

fn too_large(len: usize, max: usize) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes exceeds limit of {max} bytes"))
}

async fn read_payload<T>(io: &mut T, max: usize) -> io::Result<Vec<u8>>
where
    T: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(too_large(len, max));
    }
    let mut buf = Vec::with_capacity(len.min(INITIAL_READ_CAPACITY));
    (&mut *io).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame truncated: got {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

async fn write_frame<T>(io: &mut T, kind: Option<u8>, payload: &[u8], max: usize) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
{
    if payload.len() > max {
        return Err(too_large(payload.len(), max));
    }
    let len = u32::try_from(payload.len()).map_err(|_| too_large(payload.len(), max))?;
    let mut header = [0u8; 5];
    let header: &[u8] = match kind {
        Some(k) => {
            header[0] = k;
            header[1..].copy_from_slice(&len.to_be_bytes());
            &header[..]
        }
        None => {
            header[..4].copy_from_slice(&len.to_be_bytes());
            &header[..4]
        }
    };
    io.write_all(header).await?;
    io.write_all(payload).await?;
    io.flush().await
}

impl request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = WireRequest;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<WireRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut kind = [0u8; 1];
        io.read_exact(&mut kind).await?;
        match kind[0] {
            KIND_MESSAGE => Ok(WireRequest::Message(read_payload(io, self.max).await?)),
            KIND_REQUEST => Ok(WireRequest::Request(read_payload(io, self.max).await?)),
            other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown frame kind {other}"))),
        }
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_payload(io, self.max).await
    }

    async fn write_request<T>(&mut self, _: &Self::Protocol, io: &mut T, req: WireRequest) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            WireRequest::Message(b) => write_frame(io, Some(KIND_MESSAGE), &b, self.max).await,
            WireRequest::Request(b) => write_frame(io, Some(KIND_REQUEST), &b, self.max).await,
        }
    }

    async fn write_response<T>(&mut self, _: &Self::Protocol, io: &mut T, res: Vec<u8>) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, None, &res, self.max).await
    }
}

#[cfg(test)]
mod tests {
    use futures::{executor::block_on, io::Cursor};
    use libp2p::request_response::Codec;

    use super::*;

    fn encode_request(max: usize, req: WireRequest) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        block_on(BytesCodec::new(max).write_request(&PROTOCOL, &mut out, req)).unwrap();
        out.into_inner()
    }

    #[test]
    fn request_round_trip() {
        for req in [
            WireRequest::Message(b"hello".to_vec()),
            WireRequest::Request(vec![0u8; 1000]),
            WireRequest::Message(Vec::new()),
        ] {
            let bytes = encode_request(4096, req.clone());
            let mut input = Cursor::new(bytes);
            let got = block_on(BytesCodec::new(4096).read_request(&PROTOCOL, &mut input)).unwrap();
            assert_eq!(got, req);
        }
    }

    #[test]
    fn response_round_trip() {
        let mut out = Cursor::new(Vec::new());
        block_on(BytesCodec::new(16).write_response(&PROTOCOL, &mut out, b"pong".to_vec())).unwrap();
        let mut input = Cursor::new(out.into_inner());
        let got = block_on(BytesCodec::new(16).read_response(&PROTOCOL, &mut input)).unwrap();
        assert_eq!(got, b"pong");
    }

    #[test]
    fn oversized_frames_are_rejected_both_ways() {
        let mut out = Cursor::new(Vec::new());
        let err = block_on(BytesCodec::new(4).write_request(&PROTOCOL, &mut out, WireRequest::Message(vec![1; 5])))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        // A peer claiming 4 GiB must be refused without allocating it.
        let mut input = Cursor::new(vec![KIND_MESSAGE, 0xff, 0xff, 0xff, 0xff]);
        let err = block_on(BytesCodec::new(1024).read_request(&PROTOCOL, &mut input)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let codec = || BytesCodec::new(1024);
        // Unknown kind.
        let mut input = Cursor::new(vec![7u8, 0, 0, 0, 0]);
        assert!(block_on(codec().read_request(&PROTOCOL, &mut input)).is_err());
        // Truncated payload.
        let mut input = Cursor::new(vec![KIND_REQUEST, 0, 0, 0, 10, 1, 2, 3]);
        let err = block_on(codec().read_request(&PROTOCOL, &mut input)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // Truncated header.
        let mut input = Cursor::new(vec![KIND_REQUEST, 0]);
        assert!(block_on(codec().read_request(&PROTOCOL, &mut input)).is_err());
        // Empty stream.
        let mut input = Cursor::new(Vec::new());
        assert!(block_on(codec().read_response(&PROTOCOL, &mut input)).is_err());
    }
}
