//! How deep a message's headers can nest, and the stack that takes.
//!
//! AMQP header tables nest (a table or an array inside a table, inside an array, ...), and
//! lapin's decoder, like its encoder, `Clone`, `Debug` and the drop of the decoded value, walks
//! them by recursion. A publisher may nest them as deep as a frame holds: an array level costs
//! 5 bytes, so a 128 KiB frame holds about 26,000 levels, which overflows lapin's reading
//! thread (2 MiB by default) at about 250 levels in a debug build and 1,600 in a release
//! build. That aborts the process, the message is redelivered, and every worker that receives
//! it dies in turn: one message stops the service. Nothing in the message is seen before it
//! is decoded, so the message cannot be refused first; the defence is a bound on the depth
//! (the frame size this side accepts) and stacks that hold it:
//!
//! - [`frame_max`]: every connection asks for frames of at most [`MAX_FRAME`] (RabbitMQ's own
//!   default `frame_max`), which publishers are held to as well while the broker keeps that
//!   default. RabbitMQ does not hold the frames it sends to the negotiated size (it adds
//!   `x-death` or `x-delivery-count` to a full frame; a broker configured for larger frames
//!   passes them on), and lapin decodes a frame before it refuses it as too large: the bound
//!   holds only with the broker's `frame_max` at its default (docs/operations.md,
//!   `tests/it/review_s31.rs`).
//! - [`DEEP_STACK`]: the stack of every thread that may walk a message's headers (lapin's I/O
//!   thread, the runtime's) holds [`MAX_FRAME`] bytes of nesting. Measured (decoding, the
//!   deepest walk): about 1.6 KiB a level in a release build and 10 KiB in a debug build, so
//!   26,000 levels take 42 MiB and 260 MiB. Only the stack a message uses is ever touched:
//!   the rest is address space. `tests/it/deep_headers.rs` sends the deepest headers a frame
//!   holds, as tables and as arrays.

use lapin::uri::AMQPUri;

/// The largest frame a connection accepts: RabbitMQ's default `frame_max`.
pub const MAX_FRAME: u32 = 131_072;

/// The stack of every thread that may walk a message's headers (see the module's doc).
pub const DEEP_STACK: usize = if cfg!(debug_assertions) { 320 << 20 } else { 64 << 20 };

/// `uri` asking for frames of at most [`MAX_FRAME`] (a smaller `frame_max` in the URL is kept).
pub fn frame_max(mut uri: AMQPUri) -> AMQPUri {
    uri.query.frame_max = Some(match uri.query.frame_max {
        Some(asked) if asked > 0 => asked.min(MAX_FRAME),
        _ => MAX_FRAME,
    });
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(url: &str) -> Option<u32> {
        frame_max(url.parse().unwrap()).query.frame_max
    }

    #[test]
    fn frames_are_capped_at_the_brokers_default_and_a_smaller_asked_size_is_kept() {
        assert_eq!(asked("amqp://localhost"), Some(MAX_FRAME));
        assert_eq!(asked("amqp://localhost/%2f?frame_max=0"), Some(MAX_FRAME));
        assert_eq!(asked("amqp://localhost/%2f?frame_max=1048576"), Some(MAX_FRAME));
        assert_eq!(asked("amqp://localhost/%2f?frame_max=16384"), Some(16384));
    }
}
