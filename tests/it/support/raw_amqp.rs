//! A publisher that writes AMQP 0-9-1 frames itself, for messages lapin would choke on while
//! encoding them (headers nested deeper than its thread's stack holds): a hostile publisher
//! needs no client library. Handshake, one confirmed publish on channel 1, close.

use std::time::Duration;

use fallback_worker::broker::frames::MAX_FRAME;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;
/// `basic` properties' flag for `headers`, and for `delivery-mode`.
const HEADERS_FLAG: u16 = 1 << 13;
const DELIVERY_MODE_FLAG: u16 = 1 << 12;

/// How a header nests: a table in a table (7 bytes a level), or an array in an array (5).
#[derive(Debug, Clone, Copy)]
pub enum Nesting {
    Tables,
    Arrays,
}

/// An encoded field table `{"x": <value nested `depth` levels deep around the string "leaf">}`.
pub fn nested_headers(nesting: Nesting, depth: u32) -> Vec<u8> {
    let leaf = [b'S', 0, 0, 0, 4, b'l', b'e', b'a', b'f'];
    let per_level = match nesting {
        Nesting::Tables => 7,
        Nesting::Arrays => 5,
    };
    let mut out = Vec::new();
    out.extend((2 + leaf.len() as u32 + per_level * depth).to_be_bytes());
    out.extend([1, b'x']);
    for level in (1..=depth).rev() {
        let inside = leaf.len() as u32 + per_level * (level - 1);
        match nesting {
            Nesting::Tables => {
                out.push(b'F');
                out.extend((2 + inside).to_be_bytes());
                out.extend([1, b'a']);
            }
            Nesting::Arrays => {
                out.push(b'A');
                out.extend(inside.to_be_bytes());
            }
        }
    }
    out.extend(leaf);
    out
}

/// The deepest `nesting` whose headers fit one content-header frame of `frame_max` bytes.
pub fn deepest(nesting: Nesting, frame_max: u32) -> u32 {
    // Frame overhead 8, class + weight + body size + flags 14, delivery mode 1, the table's
    // length 4, the key "x" 2, the leaf 9.
    let room = frame_max - 8 - 14 - 1 - 4 - 2 - 9;
    match nesting {
        Nesting::Tables => room / 7,
        Nesting::Arrays => room / 5,
    }
}

pub struct RawPublisher {
    stream: TcpStream,
    /// The broker's `frame_max` from its Tune.
    pub frame_max: u32,
}

impl RawPublisher {
    /// Connects to the broker at `url` (its user, password and vhost) and opens channel 1 in
    /// confirm mode.
    pub async fn connect(url: &str) -> RawPublisher {
        let uri: lapin::uri::AMQPUri = url.parse().unwrap();
        let (host, port) = (&uri.authority.host, uri.authority.port);
        let mut stream = TcpStream::connect((host.as_str(), port)).await.expect("RabbitMQ is reachable");
        stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut publisher = RawPublisher { stream, frame_max: 0 };
        publisher.expect_method(10, 10).await; // Connection.Start
        let mut start_ok = Vec::new();
        start_ok.extend(0u32.to_be_bytes()); // client properties: none
        short_string(&mut start_ok, "PLAIN");
        let user = &uri.authority.userinfo;
        long_string(&mut start_ok, format!("\0{}\0{}", user.username, user.password).as_bytes());
        short_string(&mut start_ok, "en_US");
        publisher.send_method(0, 10, 11, &start_ok).await;
        let tune = publisher.expect_method(10, 30).await;
        let frame_max = u32::from_be_bytes(tune[2..6].try_into().unwrap());
        let mut tune_ok = tune[..2].to_vec();
        tune_ok.extend(frame_max.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats
        publisher.send_method(0, 10, 31, &tune_ok).await;
        publisher.frame_max = frame_max;
        let mut open = Vec::new();
        short_string(&mut open, &uri.vhost);
        short_string(&mut open, "");
        open.push(0);
        publisher.send_method(0, 10, 40, &open).await;
        publisher.expect_method(10, 41).await;
        publisher.send_method(1, 20, 10, &[0]).await; // Channel.Open
        publisher.expect_method(20, 11).await;
        publisher.send_method(1, 85, 10, &[0]).await; // Confirm.Select
        publisher.expect_method(85, 11).await;
        publisher
    }

    /// The deepest `nesting` one frame carries between this broker and a worker (which asks for
    /// frames of at most [`MAX_FRAME`]).
    pub fn deepest_headers(&self, nesting: Nesting) -> Vec<u8> {
        nested_headers(nesting, deepest(nesting, self.frame_max.min(MAX_FRAME)))
    }

    /// Publishes `body` to `queue` (persistent) with the encoded `headers` table, and waits for
    /// the broker's confirm.
    pub async fn publish(&mut self, queue: &str, body: &[u8], headers: &[u8]) {
        let mut publish = 0u16.to_be_bytes().to_vec();
        short_string(&mut publish, "");
        short_string(&mut publish, queue);
        publish.push(0);
        self.send_method(1, 60, 40, &publish).await;
        let mut header = Vec::new();
        header.extend(60u16.to_be_bytes());
        header.extend(0u16.to_be_bytes());
        header.extend((body.len() as u64).to_be_bytes());
        header.extend((HEADERS_FLAG | DELIVERY_MODE_FLAG).to_be_bytes());
        header.extend(headers);
        header.push(2);
        self.send_frame(FRAME_HEADER, 1, &header).await;
        self.send_frame(FRAME_BODY, 1, body).await;
        self.expect_method(60, 80).await; // Basic.Ack
    }

    /// Takes the next message of `queue` (Basic.Get, to be acknowledged) and closes the
    /// connection without acknowledging it: the broker requeues it, as it does any delivery a
    /// consumer lost (a worker's dropped connection, a killed process). Returns the size of the
    /// content-header frame it came in.
    pub async fn get_and_return(mut self, queue: &str) -> usize {
        let mut get = 0u16.to_be_bytes().to_vec();
        short_string(&mut get, queue);
        get.push(0); // no-ack off
        self.send_method(1, 60, 70, &get).await;
        let (kind, payload) = self.read_frame().await;
        assert_eq!((kind, &payload[..4]), (FRAME_METHOD, &[0, 60, 0, 71][..]), "Basic.Get-Ok");
        let (kind, header) = self.read_frame().await;
        assert_eq!(kind, FRAME_HEADER);
        let body_size = u64::from_be_bytes(header[4..12].try_into().unwrap());
        let mut read = 0u64;
        while read < body_size {
            let (kind, body) = self.read_frame().await;
            assert_eq!(kind, FRAME_BODY);
            read += body.len() as u64;
        }
        self.send_close().await;
        loop {
            let (kind, payload) = self.read_frame().await;
            if kind == FRAME_METHOD && payload[..4] == [0, 10, 0, 51] {
                break;
            }
        }
        header.len() + 8
    }

    /// The next frame: its type and payload.
    async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0u8; 7];
        tokio::time::timeout(Duration::from_secs(30), self.stream.read_exact(&mut head))
            .await
            .expect("the broker answers within 30 s")
            .expect("the broker keeps the connection open");
        let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size + 1];
        self.stream.read_exact(&mut payload).await.unwrap();
        payload.truncate(size);
        (head[0], payload)
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        self.send_close().await;
        self.expect_method(10, 51).await;
    }

    /// Connection.Close, reply 200.
    async fn send_close(&mut self) {
        let mut close = 200u16.to_be_bytes().to_vec();
        short_string(&mut close, "");
        close.extend([0, 0, 0, 0]);
        self.send_method(0, 10, 50, &close).await;
    }

    async fn send_method(&mut self, channel: u16, class: u16, method: u16, arguments: &[u8]) {
        let mut payload = class.to_be_bytes().to_vec();
        payload.extend(method.to_be_bytes());
        payload.extend(arguments);
        self.send_frame(FRAME_METHOD, channel, &payload).await;
    }

    async fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend(channel.to_be_bytes());
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame).await.unwrap();
    }

    /// The arguments of the next method frame, which must be `class`.`method` (a
    /// Connection.Close or Channel.Close from the broker fails the test with its text).
    async fn expect_method(&mut self, class: u16, method: u16) -> Vec<u8> {
        let (kind, payload) = self.read_frame().await;
        assert_eq!(kind, FRAME_METHOD, "a method frame");
        let got = (u16::from_be_bytes([payload[0], payload[1]]), u16::from_be_bytes([payload[2], payload[3]]));
        assert_eq!(got, (class, method), "the broker's answer: {}", String::from_utf8_lossy(&payload));
        payload[4..].to_vec()
    }
}

fn short_string(out: &mut Vec<u8>, text: &str) {
    out.push(u8::try_from(text.len()).unwrap());
    out.extend(text.as_bytes());
}

fn long_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u32).to_be_bytes());
    out.extend(bytes);
}
